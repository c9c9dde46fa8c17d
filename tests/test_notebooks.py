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
# Notebooks that spend their time running programs rather than compiling them run with XLA's
# optimizations on (conftest turns them off for the tests): the quickstart's two 2000-step
# trainings. Measured per notebook, all cells, fresh compilation cache: quickstart 87 s
# unoptimized vs 65 s optimized; images 63 vs 58, inverse 60 vs 54 (within this machine's
# noise), samplers 58 vs 67, likelihood 60 vs 68, optimizers 38 vs 46.
OPTIMIZED = {"quickstart"}


def _code(nb):
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("src", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(src, tmp_path, monkeypatch):
    nb = jupytext.read(src)
    ipynb = src.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run jupytext --sync {src.name}"
    assert _code(nbformat.read(ipynb, as_version=4)) == _code(nb), f"{ipynb.name} is out of sync with {src.name}"
    unoptimized = os.environ.get("GENFLOW_TEST_UNOPTIMIZED")  # the flag conftest added, if it did
    if src.stem in OPTIMIZED and unoptimized:  # the kernel inherits this process's environment
        monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"].replace(unoptimized, "").strip())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    if os.environ.get("GENFLOW_WRITE_NOTEBOOKS"):
        nbformat.write(nb, ipynb)
