"""A typed command line from a config dataclass: one ``--field value`` flag per field.

Booleans accept ``--flag`` alone or ``--flag true/false/1/0/yes/no``. ``quick`` overrides (a
dict) are applied when ``--quick`` is given, except for the fields also given on the command
line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import sys
from typing import get_type_hints


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def _field_comments(config_cls) -> dict:
    """``{field: its trailing # comment}`` from the dataclass's source (empty where unreadable)."""
    try:
        src = inspect.getsource(config_cls)
    except (OSError, TypeError):
        return {}
    out, last = {}, None
    for line in src.splitlines():
        m = re.match(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            last, out[m.group(1)] = m.group(1), m.group(2).strip()
        elif last and re.match(r"^\s+#\s*(.+)$", line):  # (a comment continued on the next line)
            out[last] += " " + line.strip()[1:].strip()
        else:
            last = None
    return {k: v.rstrip(";,") for k, v in out.items()}


def parse(config_cls, argv=None, doc: str | None = None, quick: dict | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of the dataclass ``config_cls``.
    ``--help`` shows each field's trailing ``#`` comment with its default."""
    # (no abbreviations: "--step 7" would not count as a given --steps, and --quick would override it)
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    hints = get_type_hints(config_cls)
    comments = _field_comments(config_cls)  # (--help showed only the defaults; the meanings were in the source)
    for f in dataclasses.fields(config_cls):
        default = f.default if hints[f.name] is bool else repr(f.default)
        # (argparse formats help with %: a literal % must be doubled)
        text = (f"{comments[f.name]}; " if f.name in comments else "") + f"default: {default}"
        text = text.replace("%", "%%")
        if hints[f.name] is bool:
            p.add_argument(f"--{f.name}", nargs="?", const=True, default=f.default, type=_bool, help=text)
        else:
            p.add_argument(f"--{f.name}", type=hints[f.name], default=f.default, help=text)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = vars(p.parse_args(argv))
    if quick and args.get("quick"):
        given = {a.split("=")[0][2:] for a in argv if a.startswith("--")}
        args.update({k: v for k, v in quick.items() if k not in given})
    cfg = config_cls(**args)
    _check_common(cfg)
    return cfg


def _check_common(cfg) -> None:
    """The flags every entry point shares: ``--out`` (an existing file failed as a bare
    FileExistsError, one inside a file as a NotADirectoryError, an empty one as os.makedirs'
    FileNotFoundError) and ``--seed`` (the scripts derive keys from ``seed + k`` for k up to a few
    hundred: a seed near 2**63 failed with an OverflowError after the first task)."""
    out = getattr(cfg, "out", None)
    if out is not None and not out:
        raise SystemExit("--out must be a non-empty path")
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out!r} exists and is not a directory")
    if out and not os.path.exists(out):  # the nearest existing folder above it must be one
        parent = os.path.dirname(os.path.abspath(out))
        while not os.path.exists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise SystemExit(f"--out {out!r} cannot be made: {parent!r} exists and is not a directory")
    seed = getattr(cfg, "seed", None)
    if seed is not None and not 0 <= seed < 2 ** 31:
        # (jax.random.key keeps 32 bits: --seed 4294967296 silently re-ran --seed 0, and -1 was 2**32 - 1;
        # below 2**31, the scripts' derived seeds such as seed + 100 stay distinct too)
        raise SystemExit(f"--seed must lie in [0, 2**31); got {seed}")


MARKER = ".genflow_run"  # (in --out: the name of the script whose outputs it holds)


def make_out(out: str, script: str) -> None:
    """Create ``--out`` for the entry point ``script`` (e.g. ``"images"``) and mark it as that
    script's, or refuse (``SystemExit`` naming ``--out``) one another script has marked: the
    scripts share output names (metrics.json, results.json, samples.png, loss.png), and a second
    script's run overwrote the first's and left the rest beside its own (images.py then read
    toy2d's failure record as its own training loss). Call it after the flags are checked and
    before any work."""
    marker = os.path.join(out, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            owner = f.read().strip()
        if owner and owner != script:
            raise SystemExit(f"--out {out!r} holds the outputs of {owner}.py; pass another --out for {script}.py")
    os.makedirs(out, exist_ok=True)
    if not os.path.isfile(marker):
        with open(marker, "w") as f:
            f.write(script + "\n")


def terminate_as_interrupt() -> None:
    """Make SIGTERM (a scheduler's pre-emption, ``timeout``, ``docker stop``) raise
    ``KeyboardInterrupt`` as Ctrl-C does, so an entry point's interrupt handling (failure records,
    ``stale_outputs_removed``, a pending checkpoint save) runs: it was skipped, and a killed run
    left an earlier run's results beside its own. Entry points call it under ``__main__`` only
    (a process that imports them keeps its own handler)."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def stale_outputs_removed(out: str, names):
    """On an error (or Ctrl-C) in the block after it wrote something under ``out``, remove the files
    ``names`` under ``out`` that this run did not write (older than the block's start): an earlier
    run's results would otherwise pass for this one's beside its partial outputs (log rows,
    checkpoints). A run refused before it wrote anything (a flag that disagrees with the
    checkpoints there, a network that fails to build) leaves them: they still describe what
    ``out`` holds (they were deleted). The error is re-raised."""
    def stamp(f):
        st = os.stat(f)
        return st.st_mtime_ns, st.st_ino, st.st_size

    def tree():
        found = {}
        for root, dirs, files in os.walk(out):
            for n in dirs + files:
                f = os.path.join(root, n)
                try:
                    found[f] = stamp(f)
                except OSError:  # (removed meanwhile: a checkpointer's temporary directory)
                    pass
        return found

    everything = tree()
    before = {n: everything[f] for n in names if os.path.isfile(f := os.path.join(out, n))}
    try:
        yield
    except BaseException:
        if tree() != everything:  # (this run wrote, or removed, something there)
            for name, st in before.items():  # (unchanged since the block started: not this run's)
                f = os.path.join(out, name)
                if os.path.isfile(f) and stamp(f) == st:
                    os.remove(f)
        raise


def require_min(cfg, **lows) -> None:
    """``SystemExit`` naming the first flag of ``cfg`` below its lower bound in ``lows``."""
    for flag, low in lows.items():
        value = getattr(cfg, flag)
        if value < low:
            raise SystemExit(f"--{flag} must be >= {low}; got {value}")


def require_finite(cfg, *flags, low: float = 0.0, strict: bool = False) -> None:
    """``SystemExit`` naming the first of ``flags`` of ``cfg`` that is not a finite number ``>= low``
    (``> low`` if ``strict``; NaN fails both)."""
    for flag in flags:
        value = getattr(cfg, flag)
        if not ((value > low) if strict else (value >= low)) or not value < float("inf"):
            raise SystemExit(f"--{flag} must be a finite number {'>' if strict else '>='} {low:g}; got {value}")


def dry_run_sampling(path_name: str, prediction: str, shape: tuple, runs) -> None:
    """Path / prediction / solver compatibility is checked by ``gf.sample`` on concrete times: a
    dry run with a zero model on ``shape`` fails before training, not after it. ``runs``:
    ``(flag, solver, gf.sample keywords)`` triples; a refusal is a ``SystemExit`` naming the flag."""
    import jax
    import jax.numpy as jnp

    import genflow as gf

    path = gf.paths.get(path_name)
    x = path.prior_sample(jax.random.key(0), shape)
    zero = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    for flag, solver, kw in runs:
        try:
            gf.sample(zero, path, x, prediction=prediction, solver=solver, key=jax.random.key(0), **kw)
        except ValueError as e:
            raise SystemExit(f"--{flag} {solver!r} cannot sample --path {path_name!r} with --prediction "
                             f"{prediction!r}: {e}") from None


def _json_safe(obj):
    """``obj`` with non-finite floats as None and NumPy scalars and arrays as Python values."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):  # NumPy / JAX scalars and arrays
        return _json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path, obj, indent: int = 2, default=None) -> None:
    """Write ``obj`` as standard JSON: a NaN or infinite metric (a diverged run) is written as null,
    not as the ``NaN`` / ``Infinity`` that Python's json emits and strict parsers (jq, JavaScript)
    refuse. ``default`` converts other objects, as in ``json.dump``; the parent folder is created."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_json_safe(obj), f, indent=indent, allow_nan=False,
                  default=None if default is None else (lambda o: _json_safe(default(o))))
