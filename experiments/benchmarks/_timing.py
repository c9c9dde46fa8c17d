"""Timing helpers shared by the benchmarks.

These machines are shared and noisy, so contenders are timed round-robin (interleaved), after
warm-up, several times; we report the median with min and max, and compare ratios measured in
the same run. Compilation is measured separately by the caller.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _cli import write_json  # noqa: E402  (standard JSON for the benchmarks: NaN / inf -> null)

__all__ = ["interleaved", "markdown_table", "write_json"]


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1,
                block: Callable[[object], object] | None = None) -> dict[str, dict[str, float]]:
    """Time each zero-argument callable ``repeats`` times, round-robin.

    ``block(result)`` waits for asynchronous work; by default ``jax.block_until_ready`` (which
    waits on every array of a tuple / dict result and passes other leaves through: a result's own
    ``block_until_ready`` alone missed a tuple's arrays, timed at dispatch).
    Returns ``{name: {"median": s, "min": s, "max": s, "runs": [...]}}`` in seconds.
    """

    def wait(r):
        if block is not None:
            block(r)
        else:
            import jax  # (imported here: the torch-only callers need not load it first)

            jax.block_until_ready(r)

    for _ in range(warmup):
        for f in contenders.values():
            wait(f())
    runs: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, f in contenders.items():
            t0 = time.perf_counter()
            wait(f())
            runs[name].append(time.perf_counter() - t0)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for k, v in runs.items()}


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table; floats are printed with 4 significant digits, ``|`` in a cell is escaped."""

    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x).replace("|", "\\|")  # "mean |err|" would split the cell (no table renders)

    lines = ["| " + " | ".join(fmt(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def commit() -> str:
    """The repository's HEAD (with ``+dirty`` for uncommitted changes), or ``unknown``."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)experiments/benchmarks/results"], cwd=here,  # (not the outputs themselves)
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def run_meta() -> dict:
    """Which run produced a result: the commit, UTC start, CPU count and model, and XLA flags
    (timings move with the machine: compare only rows of one run)."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"commit": commit(), "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpus": os.cpu_count(),
            "cpu_model": model, "xla_flags": os.environ.get("XLA_FLAGS", "")}
