"""Every notebook in notebooks/ runs top to bottom (executed from its jupytext .py source, so
the .py and the .ipynb cannot drift apart: the test also checks they hold the same code).

Set GENFLOW_WRITE_NOTEBOOKS=1 to write the executed notebook (with its plots) back; add
XLA_FLAGS=--xla_backend_optimization_level=2 to run it with XLA's default build rather than the
tests' fast-compiling one (tests/conftest.py), so that the timings it prints are a user's."""

import os
import pathlib

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
# Notebooks whose time goes into training run with fewer training steps in the tests: these values
# go into a cell inserted after the one tagged "parameters" (papermill's convention); every cell
# still runs, on less-trained models. GENFLOW_WRITE_NOTEBOOKS=1 runs them as written, so the
# committed outputs are the full runs. Measured for the quickstart, all cells, fresh compilation
# cache: 61 s with its two 2000-step trainings, 40 s with 500 steps. (With 500 steps it no longer
# gains from running with XLA's backend optimizations, which it did before: 58.8 s vs 57.3 s
# for its test, optimized vs not.) Halved again at stop 54, when the notebooks took 604 s of the
# suite's 3556 s of work on an AMD EPYC machine; all cells in one process, the values before ->
# these: quickstart 88.4 -> 64.3 s, images 102.2 -> 73.5 s, inverse 74.9 -> 59.6 s, samplers
# 149.0 -> 142.8 s (its time is compiling one program per solver and grid, not training).
PARAMETERS = {"quickstart": {"TRAIN_STEPS": 250},
              "samplers": {"TRAIN_STEPS": 250, "HARD_TEST": 512, "SEARCH_ITERS": 10},
              "inverse": {"TRAIN_STEPS": 250, "N_BIG": 2000},
              "likelihood": {"DIFFUSION_STEPS": 300, "FLOW_STEPS": 200, "GLOW_STEPS": 10, "FFJORD_STEPS": 30},
              "images": {"DIT_STEPS": 30, "MLP_STEPS": 150}}


def _with_parameters(nb, values):
    """``nb`` with a cell setting ``values`` after its cell tagged "parameters"."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters'; found {len(tagged)}"
    assert all(f"{k} = " in nb.cells[tagged[0]].source for k in values), "a parameter is not in the tagged cell"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items())))
    return nb


def _code(nb):
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("src", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(src, tmp_path):
    nb = jupytext.read(src)
    ipynb = src.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run jupytext --sync {src.name}"
    assert _code(nbformat.read(ipynb, as_version=4)) == _code(nb), f"{ipynb.name} is out of sync with {src.name}"
    write = bool(os.environ.get("GENFLOW_WRITE_NOTEBOOKS"))
    if src.stem in PARAMETERS and not write:
        nb = _with_parameters(nb, PARAMETERS[src.stem])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    if write:
        nbformat.write(nb, ipynb)


def test_quickstart_own_path_reaches_pure_noise_exactly():
    """The quickstart's path of one's own must have alpha(1) = 0 exactly (paths.py's contract:
    samplers, guidance and conversions detect pure noise by alpha == 0); jnp.cos(pi t / 2) gave
    -4.4e-8, so an eps model there was silently integrated from a sign-flipped x0 (rms error 0.040
    vs 5e-4) where the built-in linear path refuses it."""
    import jax.numpy as jnp
    import genflow as gf

    src = (ROOT / "notebooks" / "quickstart.py").read_text()
    start = src.index("def trig_alpha(t):")  # (the path's functions and its factory)
    end = src.index("\n\n\n", src.index("def trig():"))
    scope = {"gf": gf, "jnp": jnp}
    exec(src[start:end], scope)  # noqa: S102  (the notebook's own definition)
    path = scope["trig"]()
    assert path == scope["trig"]()  # (lambdas inside the factory: a new path, so a recompile, per get("trig"))
    assert float(path.alpha(jnp.float32(1.0))) == 0.0
    assert float(path.sigma(jnp.float32(0.0))) == 0.0
