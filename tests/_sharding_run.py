"""Runs tests/_sharding_checks.py once per test session and shares its report.

The 8-device subprocess takes about a minute. ``conftest.py`` starts :func:`run_once` in a
background thread on one xdist worker as soon as the tests are collected; the module fixture of
``tests/test_sharding.py`` calls it too and, through a file lock in the session directory, either
finds the report written or waits for (or, without the background start, does) the one run."""

import json
import os
import pathlib
import subprocess
import sys

import filelock

HERE = pathlib.Path(__file__).resolve().parent


def run_on_8_devices(script: str, *args: str) -> dict:
    """Runs ``tests/<script> *args`` in a subprocess with 8 fake CPU devices and returns the JSON of
    its last ``REPORT`` line; an ``AssertionError`` with the exit code and the end of stderr if it
    failed or printed none."""
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    r = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, env=env,
                       timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("REPORT ")]
    if r.returncode != 0 or not lines:
        raise AssertionError(f"exit code {r.returncode}\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("REPORT "):])


def run_once() -> tuple[dict, pathlib.Path]:
    """``(report, out_dir)`` of the session's one run of the 8-device checks."""
    shared = pathlib.Path(os.environ["GENFLOW_TEST_SESSION_DIR"])  # made by conftest.py, per session
    out, done, err = shared / "sharding", shared / "sharding_report.json", shared / "sharding_error.txt"
    with filelock.FileLock(str(shared / "sharding.lock")):
        if not done.exists() and not err.exists():
            out.mkdir(exist_ok=True)
            try:
                done.write_text(json.dumps(run_on_8_devices("_sharding_checks.py", str(out))))
            except AssertionError as e:
                err.write_text(str(e))
    if err.exists():
        raise AssertionError(err.read_text())
    return json.loads(done.read_text()), out
