"""Every notebook in notebooks/ runs top to bottom (executed from its jupytext .py source, so
the .py and the .ipynb cannot drift apart: the test also checks they hold the same code).

Set GENFLOW_WRITE_NOTEBOOKS=1 to write the executed notebook (with its plots) back."""

import os
import pathlib

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def _code(nb):
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("src", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(src, tmp_path):
    nb = jupytext.read(src)
    ipynb = src.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run jupytext --sync {src.name}"
    assert _code(nbformat.read(ipynb, as_version=4)) == _code(nb), f"{ipynb.name} is out of sync with {src.name}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    if os.environ.get("GENFLOW_WRITE_NOTEBOOKS"):
        nbformat.write(nb, ipynb)
