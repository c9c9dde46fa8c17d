"""Shared fixtures. Tests run on CPU; each module compiles its functions once."""

import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite is dominated by XLA compiling programs it runs once or a few times. Tests therefore
# compile without LLVM's optimizations and with XLA:CPU's older elemental emitters instead of its
# MLIR fusion emitters (the same HLO, the same algorithms; results can differ from the default
# build in the last bits). Measured on a 2-core CPU machine like CI's, all tests passing each time:
# the whole suite 1322 s -> 1001 s with the first flag (an earlier suite), and 1139 s -> 828 s
# (2237 -> 1577 s of work over the two workers) with the second added. Set XLA_FLAGS with
# --xla_backend_optimization_level=3 (or any level) to test the default build; subprocesses the
# tests start inherit the setting. A third flag compiles each program's LLVM module in one piece
# rather than split for a parallel codegen the two busy workers cannot use (the same machine code
# per function): on a 2-core AMD EPYC, test_sampling_schedules + test_likelihood + test_guidance
# with 2 workers took 226 s against 262 s, and test_sampling_core + _golden + test_guidance in one
# process 151 / 153 s against 169 / 161 s (backend compilation 68 / 67 s against 79 / 75 s).


def _xla_accepts(flag: str) -> bool:
    """Whether this jaxlib knows ``flag`` (XLA aborts the whole process on an unknown one, and the
    set of XLA:CPU flags changes between releases)."""
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    return subprocess.run(probe, env=env, capture_output=True, timeout=300).returncode == 0


if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    _flags = [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
    _wanted = [f for f in ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")
               if f.split("=")[0][2:] not in _flags[0]]
    # (one probe for all of them; one per flag only when a jaxlib refuses one)
    if _wanted:
        _flags += _wanted if _xla_accepts(" ".join(_wanted)) else [f for f in _wanted if _xla_accepts(f)]
    os.environ["XLA_FLAGS"] = " ".join(_flags).strip()

# One persistent compilation cache per test session, shared by the xdist workers and by every
# subprocess the tests start (experiments, notebook kernels, the checkpoint worker): a program
# that several processes compile (the same module fixture on both workers, the checkpoint worker
# restarted four times) is compiled once and loaded from disk afterwards. It starts empty, so a
# session measures nothing from an earlier one; set JAX_COMPILATION_CACHE_DIR to keep your own.
# GENFLOW_TEST_SESSION_DIR: this session's scratch directory, made by the controlling process (the
# xdist workers inherit it) and removed at its end.
_OWN_DIR = None
if "PYTEST_XDIST_WORKER" not in os.environ:
    _OWN_DIR = os.environ["GENFLOW_TEST_SESSION_DIR"] = tempfile.mkdtemp(prefix="genflow-tests-")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_OWN_DIR, "jax-cache"))
    # Temporary files go there too, for the workers and subprocesses as well (TMPDIR): tfds'
    # mock_data left an empty directory in /tmp per dataset it mocked (DatasetInfo.
    # initialize_from_bucket's mkdtemp; 24 from the tfds tests of test_data and
    # test_images_experiment alone). pytest's own tmp_path directories stay where they were (kept
    # for a look after a failure).
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    os.environ["TMPDIR"] = os.path.join(_OWN_DIR, "tmp")
    os.mkdir(os.environ["TMPDIR"])
    tempfile.tempdir = None  # (re-read from TMPDIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import genflow as gf  # noqa: E402

ALL_PATHS = {name: gf.paths.get(name) for name in gf.paths.names()}


def count_compiles(run) -> int:
    """The number of XLA programs compiled while ``run()`` runs (from JAX's compile log)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles(True):
            run()
    finally:
        logging.getLogger("jax").removeHandler(handler)
    return sum("Compiling" in r.getMessage() for r in records)


def many_arrays(fn):
    """``fn(x, t)`` as a pytree function of more (unused) arrays than
    ``genflow.sampling._driver.SCAN_STAGES_FROM``: a network of many layers to gf.sample, whose
    multi-stage steps then evaluate it in a scan over their stages (a small one stage by stage)."""
    from genflow.sampling._driver import SCAN_STAGES_FROM

    return jax.tree_util.Partial(lambda ws, x, t: fn(x, t), [jnp.zeros(()) for _ in range(SCAN_STAGES_FROM + 8)])


def assert_same_under_strict_rank_promotion(run, rtol=1e-5, atol=1e-6) -> None:
    """``run()`` (a list of arrays) gives the same values with ``jax_numpy_rank_promotion='raise'``
    as with the setting of the moment (restored after)."""
    ref = run()
    old = jax.config.jax_numpy_rank_promotion
    jax.config.update("jax_numpy_rank_promotion", "raise")
    try:
        got = run()
    finally:
        jax.config.update("jax_numpy_rank_promotion", old)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.fixture(params=sorted(ALL_PATHS))
def path(request):
    return ALL_PATHS[request.param]


@pytest.fixture(scope="session")
def gauss2():
    """A 2-D Gaussian with non-diagonal covariance."""
    return gf.oracles.Gaussian.full(jnp.array([0.7, -1.2]), jnp.array([[0.8, 0.3], [0.3, 0.5]]))


def pytest_collection_finish(session):
    """The 8-device sharding checks run in a subprocess that takes ~1 min: start it in the background
    as soon as the tests are known (on one xdist worker), so no worker sits waiting for it later."""
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0" and any(
            item.path.name == "test_sharding.py" and "report" in getattr(item, "fixturenames", ())
            for item in session.items):  # (only when a selected test reads its report: a -k run of the others
        # left the subprocess running on its own for minutes after pytest had exited)
        import threading

        from _sharding_run import run_once
        threading.Thread(target=run_once, daemon=True, name="sharding-checks").start()


def pytest_unconfigure(config):
    if _OWN_DIR is not None:
        shutil.rmtree(_OWN_DIR, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each module, drop the compiled programs it left in JAX's and genflow's caches. A worker
    that had compiled ~460 tests' programs crashed XLA:CPU's compiler (a segfault, reproducible with
    this suite's XLA flags, in a test that passes on its own); each module compiles what it needs
    anyway (its functions are jitted once per module)."""
    yield
    import gc

    from genflow import ot as _ot
    from genflow.sampling import _core
    from genflow.train import _loop

    _core._PREPARED.clear()
    _loop._COMPILED.clear()
    _loop._COMPILED_STRONG.clear()
    _ot._DRAWS.clear()
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _leave_no_registrations():
    """Unregister whatever a test added to the path, solver and optimizer registries (they are
    global: a test that failed before its own unregister left names that broke later tests)."""
    before = (set(gf.paths.names()), set(gf.sampling.solvers()), set(gf.optim.names("user")))
    yield
    for name in set(gf.paths.names()) - before[0]:
        gf.paths.unregister(name)
    for name in set(gf.sampling.solvers()) - before[1]:
        gf.sampling.unregister(name)
    for name in set(gf.optim.names("user")) - before[2]:
        gf.optim.unregister(name)
