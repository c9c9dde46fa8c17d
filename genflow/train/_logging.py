"""Metrics to a JSON-lines file (one object per chunk of steps), usable as a :func:`fit` callback."""

from __future__ import annotations

import json
import os
import time
import warnings

import jax
import numpy as np


class MetricsWriter:
    """Append ``{"step": s, "time": t, <metric>: value, ...}`` lines to ``path`` (JSONL).

    As a :func:`genflow.train.fit` callback (``callback=writer``) it writes, after every chunk, the
    chunk means of the step metrics, the chunk's steps/s and the step reached. Only process 0
    writes. Read it back with :func:`read_jsonl`. (No TensorBoard writer: without TensorFlow or
    tensorboardX no event-file writer is available here.)
    """

    def __init__(self, path: str, resume_step: int | None = None):
        """``resume_step``: the step training resumes from; rows of later steps already in the
        file (written before an interruption, or by an earlier run into the same directory) are
        dropped, so that a resumed run does not log those steps twice (0 empties the file)."""
        self.path = path
        self.active = jax.process_index() == 0
        if self.active:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if os.path.exists(path) and (resume_step is not None or not _ends_with_newline(path)):
                # (a row cut off by a crash: read_jsonl skips it, and the next row would be glued onto it)
                keep = [r for r in read_jsonl(path) if resume_step is None or r.get("step", 0) <= int(resume_step)]
                with open(path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in keep)

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), "time": time.time()}
        row.update({k: float(np.mean(v)) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def __call__(self, state, metrics: dict) -> None:
        self.write(int(state.step), {k: v for k, v in metrics.items() if k != "finite"})


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL file. A last line cut off by a crash (not valid JSON) is skipped with a
    warning; any other bad line raises a ``ValueError`` naming its line number. (Non-finite
    metrics are stored as ``NaN`` / ``Infinity``, which Python's ``json`` reads; strict parsers
    such as ``jq`` do not.)"""
    with open(path) as f:
        lines = [(i, ln) for i, ln in enumerate(f, 1) if ln.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k == len(lines) - 1 and not line.endswith("\n"):
                warnings.warn(f"{path}: skipped its last line {i}, cut off before its end (an interrupted write): "
                              f"{line[:80]!r}", stacklevel=2)
                break
            raise ValueError(f"{path}: line {i} is not valid JSON ({e.msg}): {line[:80]!r}") from None
    return rows
