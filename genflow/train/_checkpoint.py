"""Preemption-safe checkpoints of the full train state with orbax ``CheckpointManager``.

A checkpoint holds the whole :class:`TrainState` (step, parameters, optimizer state, PRNG key, EMA
copies) as sharded array files (tensorstore/OCDBT, never pickle) and, beside it, the JSON state
of the host data iterator (e.g. a grain iterator's position), so that a run restored from it
continues bit-identically. Saves are asynchronous and atomic (written to a temporary directory,
renamed on commit): a process killed mid-save leaves the previous checkpoints intact, and the
half-written one is ignored (and cleaned up) on restart.

    ckpt = gf.train.Checkpointer("runs/x/ckpt", save_every=1000, keep=3)
    state, data_state = ckpt.restore_or(state)          # resume if a checkpoint exists
    if data_state:                                      # None without a checkpoint, {} for a batch_fn(key)
        loader.set_state(data_state)                    # the data iterator continues where it was
    state, hist = gf.train.fit(state, step, loader, num_steps - int(state.step), checkpointer=ckpt)
"""

from __future__ import annotations

import atexit
import base64
import math
import os
import threading
import warnings
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from genflow._checks import check_int
from genflow.train._state import TrainState, is_typed_key as _is_key


def _ocp():
    import orbax.checkpoint as ocp  # imported on first use: orbax is slow to import

    return ocp


def _key_impl(ref):
    if isinstance(ref, jax.Array):
        return jax.random.key_impl(ref)
    return ref.dtype._impl  # (a ShapeDtypeStruct: jax.random.key_impl refuses it)


def _empty(x) -> bool:
    return hasattr(x, "shape") and math.prod(np.shape(x)) == 0


def _to_savable(tree):
    """Typed PRNG keys -> their raw ``uint32`` data (orbax stores plain arrays); zero-size arrays
    (e.g. optax.contrib.galore's projectors of unprojected parameters), which orbax refuses ->
    a one-element placeholder of their dtype, rebuilt from the target on restore."""
    def leaf(x):
        if _is_key(x):
            return jax.random.key_data(x)
        return np.zeros((1,), x.dtype) if _empty(x) else x

    return jax.tree.map(leaf, tree)


def _from_savable(tree, like, shardings=None):
    """The restored ``tree`` in ``like``'s types: PRNG keys re-wrapped, zero-size leaves rebuilt
    (placed on ``shardings``, default ``like``'s)."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), like)

    def leaf(x, ref, s):
        if _is_key(ref):
            return jax.random.wrap_key_data(x, impl=_key_impl(ref))
        if _empty(ref):
            empty = jnp.zeros(np.shape(ref), ref.dtype)
            return empty if s is None else jax.device_put(empty, s)
        return x

    return jax.tree.map(leaf, tree, like, shardings)


def _abstract(tree, shardings=None):
    """``ShapeDtypeStruct`` s (with target shardings) describing ``tree`` as it is stored."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)

    def spec(x, s):
        x = jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x  # (arrays and abstract keys alike)
        if _empty(x):  # stored as a host placeholder (see _to_savable)
            return jax.ShapeDtypeStruct((1,), x.dtype)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)

    return jax.tree.map(spec, tree, shardings)


_BYTES_STATE = "__genflow_bytes_data_state__"


def _data_state_json(data_state):
    """A data iterator's ``get_state()`` as JSON: a dict as it is; ``bytes`` (grain's
    ``DataLoader`` iterators) wrapped as base64 (``dict(bytes)`` failed: nothing was saved)."""
    if data_state is None:
        return {}
    if isinstance(data_state, (bytes, bytearray)):
        return {_BYTES_STATE: base64.b64encode(bytes(data_state)).decode("ascii")}
    try:  # (any mapping, as before: a FrozenDict, a mappingproxy, a list of pairs)
        return dict(data_state)
    except (TypeError, ValueError):
        raise TypeError(f"the data iterator's get_state() must return a dict (JSON) or bytes to be checkpointed; "
                        f"got {type(data_state).__name__}") from None


def _data_state_from_json(stored):
    """The inverse of :func:`_data_state_json`: the dict, or the ``bytes`` that were saved."""
    stored = dict(stored or {})
    if set(stored) == {_BYTES_STATE}:
        return base64.b64decode(stored[_BYTES_STATE])
    return stored


_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()  # (open checkpointers, closed at exit)
_HOOK = threading.Lock()
_HOOKED: list = []  # ([True] once the exit hook is registered)


def _close_at_exit(ckpt) -> None:
    """Close ``ckpt`` (committing its pending saves) when the interpreter exits, if it is still
    open then. A script that saved and returned without ``close()`` left only a
    ``<step>.orbax-checkpoint-tmp`` directory (orbax's commit thread could no longer schedule its
    futures: "cannot schedule new futures after interpreter shutdown"), so the save was lost.
    One hook for all checkpointers (held weakly; one hook per instance piled up in a sweep), run
    in ``threading``'s exit hooks, before ``concurrent.futures`` shuts its workers down (a plain
    ``atexit`` hook runs after them)."""
    with _HOOK:
        _OPEN.add(ckpt)
        if not _HOOKED:
            register = getattr(threading, "_register_atexit", None)  # (CPython >= 3.9; else atexit, best effort)
            try:
                (register or atexit.register)(_close_open)
                _HOOKED.append(True)
            except RuntimeError:  # (registering while the interpreter is already shutting down)
                pass


def _close_manager(manager, directory) -> None:
    """Close the orbax manager of a Checkpointer collected without ``close()`` (its pending save
    committed); a failure is a warning, as at exit."""
    try:
        manager.close()
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"Checkpointer({directory!r}) was dropped without close() and failed to close, its pending "
                      f"save may be lost: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=1)


def _close_open() -> None:
    for c in list(_OPEN):
        if not c._closed:
            try:  # (threading runs these hooks unguarded: a raise here skipped every later one,
                c.close()  # other checkpointers' commits included, and the process still exited 0)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"Checkpointer({c.directory!r}) failed to close at exit, its pending save may be lost: "
                              f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=1)


class Checkpointer:
    """Save every ``save_every`` steps (async), keep the last ``keep`` and the best, restore anywhere.

    Args:
      directory: checkpoint root (one sub-directory per saved step).
      save_every: save when ``state.step`` is a multiple of it (``fit`` aligns its chunks to it).
      keep: the number of most recent checkpoints kept.
      best_metric: a metric name (e.g. ``"loss"``); the checkpoint with the best value is kept
        too, beyond the last ``keep`` (a step saved without that metric, or with NaN, ranks worst). ``None``
        keeps only the most recent ones.
      best_mode: ``"min"`` or ``"max"``.
      async_save: write in a background thread (the train loop continues meanwhile).
      **options: extra ``orbax.checkpoint.CheckpointManagerOptions`` fields.
    """

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, best_metric: str | None = "loss",
                 best_mode: str = "min", async_save: bool = True, **options: Any):
        save_every, keep = check_int("save_every", save_every), check_int("keep", keep)
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max'; got {best_mode!r}")
        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            # (orbax accepted it, logged a NotADirectoryError from its background thread, and failed at the first save)
            raise ValueError(f"directory must be a directory (or a path to create one at); {directory!r} is a file")
        self.save_every = save_every
        self.best_metric, self.best_mode = best_metric, best_mode
        # (orbax refused these only as "preservation_policy and delete options are mutually
        # exclusive", naming neither the option given nor genflow's own)
        ours = {"max_to_keep": "keep=", "keep_period": "keep= / best_metric=", "keep_time_interval": "keep=",
                "preservation_policy": "keep= / best_metric=", "save_interval_steps": "save_every=",
                "enable_async_checkpointing": "async_save="}
        clash = sorted(set(options) & set(ours))
        if clash:
            raise TypeError(f"Checkpointer sets {clash[0]!r} itself; use {ours[clash[0]]} instead (options passes "
                            f"other CheckpointManagerOptions fields only)")
        ocp = _ocp()
        cm = ocp.checkpoint_managers
        policies = [cm.LatestN(keep)]
        if best_metric is not None:
            policies.append(cm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1))
            # best_fn makes orbax write the metrics beside each step (read back after a restart)
            options = {"best_fn": lambda m: m[best_metric], "best_mode": best_mode, **options}
        opts = ocp.CheckpointManagerOptions(save_interval_steps=save_every,
                                            preservation_policy=cm.AnyPreservationPolicy(policies),
                                            enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
                                            **options)
        # handlers named up front: with item_names alone, a new process (a resume) could not read the
        # stored metadata (the shape check below silently did nothing) and absl warned "Item 'state'
        # was found in the checkpoint, but could not be restored" on every restore
        self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                             item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                            "data": ocp.JsonCheckpointHandler()})
        _close_at_exit(self)
        # (dropped without close(), it left the exit hook's weak set, and its pending save was lost
        # at exit; the finalizer holds only the manager, and commits the save when it is collected)
        self._finalizer = weakref.finalize(self, _close_manager, self.manager, self.directory)

    # -- saving -------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(self, state: TrainState, *, data_state: dict | bytes | None = None, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Start saving ``state`` (and the data-iterator state) at step ``state.step``; returns
        whether a save was started (only on multiples of ``save_every`` unless ``force``)."""
        self._check_open()
        step = int(state.step)
        if not force and not self.should_save(step):
            return False
        metrics = {} if metrics is None else {k: float(v) for k, v in metrics.items()}
        if self.best_metric is not None and math.isnan(metrics.get(self.best_metric, math.nan)):
            # the worst value: orbax keeps a step without the tracked metric forever (never GC'd), and
            # ranked a NaN one best, deleting the real best checkpoint
            metrics[self.best_metric] = math.inf if self.best_mode == "min" else -math.inf
        metrics = metrics or None
        ocp = _ocp()
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_savable(state)),
                                  data=ocp.args.JsonSave(_data_state_json(data_state)))
        return self.manager.save(step, args=args, metrics=metrics, force=True)  # the decision is ours

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    _closed = False

    def _check_open(self) -> None:
        """(A closed checkpointer failed in orbax, "cannot schedule new futures after shutdown",
        and only after fit had trained a whole chunk.)"""
        if self._closed:
            raise ValueError(f"Checkpointer({self.directory!r}) is closed (close() or the end of its `with` block); "
                             f"make a new one for this directory")

    def close(self) -> None:
        """Commit pending saves and release orbax's threads (also done at interpreter exit)."""
        if not self._closed:
            self._closed = True
            _OPEN.discard(self)
            self._finalizer.detach()
            self.manager.close()

    # -- inspecting -----------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (None without metrics)."""
        if self.best_metric is None:
            return None
        sign = 1.0 if self.best_mode == "max" else -1.0
        scored = [(sign * m[self.best_metric], s) for s in self.all_steps()
                  if (m := self.manager.metrics(s)) is not None and self.best_metric in m
                  and math.isfinite(m[self.best_metric])]  # (inf: saved without the metric)
        return max(scored)[1] if scored else None  # ties: the later step, as orbax's BestN keeps

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- restoring ------------------------------------------------------------------------------
    def restore(self, target: TrainState, step: int | None = None, shardings: Any = None) -> tuple[TrainState, dict]:
        """Restore the checkpoint at ``step`` (default: the latest).

        Args:
          target: a train state of the right structure and shapes (e.g. a freshly initialised
            one); its values are not used. Its dtypes are the restored ones: orbax casts each
            stored array to the target's dtype without a warning (a bfloat16 checkpoint restored
            into a float32 target comes back float32, and the reverse rounds).
          shardings: target ``Sharding`` s (a pytree like ``target``, e.g. from
            :func:`genflow.train.tree_shardings` on another mesh): the checkpoint is re-sharded
            onto them, whatever mesh it was written from. Default: the shardings of ``target``.
        Returns:
          ``(state, data_state)``: ``data_state`` as the iterator's ``get_state()`` returned it
          when saved (a dict, or ``bytes`` for grain's ``DataLoader``; ``{}`` if none), for its
          ``set_state``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if shardings is not None:
            try:  # (a None where target has an array is allowed: orbax's default placement)
                jax.tree.map(lambda *_: None, target, shardings)
            except ValueError:  # (a single NamedSharding or the params' shardings: an anonymous pytree error)
                raise ValueError("shardings must be a pytree of Shardings like target (e.g. "
                                 "gf.train.tree_shardings(target, mesh)); its structure differs from target's") from None
        abstract, ocp = _abstract(target, shardings), _ocp()
        # (checked before orbax's restore: its own shape error named neither the leaf nor the step,
        # and its failed restore left unawaited writes)
        mismatch = self._shape_mismatch(step, abstract)
        if mismatch is not None:
            raise ValueError(f"cannot restore step {step} of {self.directory} into this target: {mismatch}")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                     data=ocp.args.JsonRestore()))
        except Exception as e:
            if isinstance(e, ValueError) and "tree structures do not match" in str(e):
                # (orbax's message asked for a partial_restore=True that restore does not take)
                detail = str(e).split("If this mismatch is intentional")[0].strip()
                detail = detail.replace("Source:", "target:").replace("Target:", "stored:")
                raise ValueError(f"cannot restore step {step} of {self.directory} into this target: its tree "
                                 f"structure differs from the stored state's (another optimizer, other EMA decays or "
                                 f"other parameters?). {detail}") from None
            save_failed = None
            try:  # (a pending save of this Checkpointer first: reload read back steps it was deleting)
                self.wait()
            except Exception as w:  # noqa: BLE001 (orbax raises it once: reported on this error below)
                save_failed = f"genflow: a pending save of this Checkpointer also failed ({type(w).__name__}: {w})"
            self.manager.reload()  # (its cached step list misses other processes' saves)
            on_disk = self.all_steps()
            if step not in on_disk:
                missing = FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; its kept steps are "
                                            f"{on_disk}")
                if save_failed:
                    missing.add_note(save_failed)
                raise missing from None
            # a damaged step: tensorstore's / json's words named neither the step nor a way out
            others = [s for s in on_disk if s != step]
            way_out = (f"The other kept steps are {others}: restore one with restore(target, step=...), or move step "
                       f"{step}'s directory out of {self.directory} and make a new Checkpointer, whose restore_or then "
                       f"starts from the latest of them." if others else
                       "It is the only step kept: without it, restore_or starts from scratch.")
            e.add_note(f"genflow: step {step} of {self.directory} could not be read: it may be damaged (a disk error, "
                       f"or a copy cut short). {way_out}")
            if save_failed:
                e.add_note(save_failed)
            raise
        return _from_savable(out["state"], target, shardings), _data_state_from_json(out["data"])

    def _shape_mismatch(self, step: int, abstract) -> str | None:
        """The first leaf whose stored shape differs from the target's, in words (None if none
        is found, or the stored metadata cannot be read)."""
        try:
            stored = {getattr(m, "name", None): tuple(m.shape)
                      for m in jax.tree.leaves(self.manager.item_metadata(step)["state"]) if hasattr(m, "shape")}
        except Exception:  # noqa: BLE001 (only a better message is at stake)
            return None
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
            name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
            if name in stored and stored[name] != tuple(leaf.shape):
                return f"{name} is stored with shape {stored[name]}, the target's has shape {tuple(leaf.shape)}"
        return None

    def restore_or(self, target: TrainState, shardings: Any = None) -> tuple[TrainState, dict | None]:
        """The latest checkpoint if there is one, else ``(target, None)`` (start from scratch)."""
        if self.latest_step() is None:
            return target, None
        return self.restore(target, shardings=shardings)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
