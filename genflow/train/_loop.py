"""``fit``: the jitted training loop, ``lax.scan`` over chunks of steps (optionally sharded and
checkpointed)."""

from __future__ import annotations

import collections
import collections.abc
import copy
import functools
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genflow import _memo
from genflow._checks import check_int
from genflow.train import _sharding as shd
from genflow.train._state import TrainState
from genflow.train._step import batch_key

Array = jax.Array


class NonFiniteLossError(FloatingPointError):
    """Raised by :func:`fit` when a step produced a non-finite loss, gradient or updated parameters.

    Attributes:
      step: the (0-based) index of the offending update, i.e. ``state.step`` before it.
      state: the last good :class:`TrainState` (the update was not applied).
      history: metrics of the steps completed before it.
    """

    def __init__(self, step: int, state: TrainState, history: dict):
        super().__init__(
            f"non-finite loss, gradient or updated parameters at step {step} (the update from step {step} to "
            f"{step + 1} was not applied); training stopped and the last good state (step {int(state.step)}, "
            f"after {int(state.step)} updates) is in this exception's .state"
        )
        self.step = step
        self.state = state
        self.history = history


def _chunk_fn(step_fn, batch_fn, unroll: int = 1, mesh=None):
    """``run(state, xs, length)``: ``length`` steps in one ``lax.scan``; batches come from
    ``xs`` (stacked host batches) or, when ``xs`` is None, from ``batch_fn`` on device (sharded
    over the mesh's batch axes when a mesh is given)."""

    def run(state: TrainState, xs, length: int):
        def body(carry, x):
            st, halted = carry
            if x is None:
                batch = batch_fn(batch_key(st.rng))
                if mesh is not None:
                    _check_divisible(batch, mesh)
                    batch = jax.lax.with_sharding_constraint(batch, shd.batch_sharding(mesh))
            else:
                batch = x
            if getattr(step_fn, "takes_skip", None) is step_fn:  # (make_train_step's, not a wrapper of it)
                # (make_train_step's step keeps its input state when told to skip: a second guard
                # here held a third copy of the state, parameters, optimizer state and EMA, in
                # XLA's plan -- 256 MiB against 128 for a 128 MiB Adam state; memory audit)
                new, metrics = step_fn(st, batch, skip=halted)
                ok = metrics["finite"]
            else:  # a step function of one's own: keep the last good state here
                new, metrics = step_fn(st, batch)
                ok = metrics["finite"] & ~halted
                new = jax.lax.cond(ok, lambda: new, lambda: st)
            metrics = dict(metrics, finite=ok)
            return (new, ~ok), metrics

        carry = (state, jnp.array(False))
        if length == 1:  # no loop at all (see the XLA:CPU note in fit's docstring)
            (state, _), metrics = body(carry, None if xs is None else jax.tree.map(lambda a: a[0], xs))
            return state, jax.tree.map(lambda m: m[None], metrics)
        (state, _), metrics = jax.lax.scan(body, carry, xs, length=length, unroll=unroll)
        return state, metrics

    return run


def _check_divisible(batch, mesh) -> None:
    """An on-device batch must split evenly over the mesh, as host batches must (shard_batch):
    XLA would otherwise pad it or split it over the data axis only, repeating work."""
    n = mesh.shape[shd.DATA] * mesh.shape[shd.FSDP]
    for leaf in jax.tree.leaves(batch):
        if jnp.ndim(leaf) == 0:  # (as shard_batch says for host batches)
            raise ValueError("every batch leaf needs a batch axis to split over the mesh; batch_fn returned a leaf "
                             "of shape ()")
        if jnp.shape(leaf)[0] % n:
            raise ValueError(f"the global batch must be divisible by the mesh size ({n} devices); batch_fn returned "
                             f"a leaf of shape {jnp.shape(leaf)}")


def _unaliased(tree):
    """``tree`` with repeated arrays copied: ``fit`` donates every buffer once, and a hand-built
    state may hold one array twice (an optimizer state that holds the parameters)."""
    seen = set()

    def leaf(x):
        if isinstance(x, jax.Array):
            if id(x) in seen:
                return jnp.copy(x)
            seen.add(id(x))
        return x

    return jax.tree.map(leaf, tree)


def _callbacks(callback) -> list[Callable]:
    if callback is None:
        return []
    if callable(callback):
        return [callback]
    return list(callback)


# Compiled chunks shared by successive ``fit`` calls with the same step function, data function,
# unroll, mesh, chunk length and argument types (a notebook that trains "a bit more", or training in
# segments with evaluations between them, compiles once). Held per step function, for as long as
# it lives (keyed by identity: for a bound method, its object's): an executable holds the arrays
# that the step's loss and the data function close over as constants, and a global LRU of 16 kept
# up to 16 dropped runs' datasets, each twice (a sweep with a device-resident dataset leaked it per
# run). At most _COMPILED_PER_STEP per step function, least recently used out.
_COMPILED = _memo.IdentityTables()
_COMPILED_PER_STEP = 8
_COMPILED_STRONG: collections.OrderedDict = collections.OrderedDict()  # (owners that cannot be weakly referenced)


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    def leaf(a):
        if isinstance(a, jax.Array):
            return (a.shape, a.dtype, bool(getattr(a, "weak_type", False)), a.sharding)
        return (np.shape(a), np.result_type(a), False, None)

    return (treedef,) + tuple(leaf(a) for a in leaves)


def _run_checked(run, n, state, xs):
    return run(state, xs, n)


def _compiled_chunk(run, run_checked, key, state, xs, n):
    """``run.lower(state, xs, n).compile()``, cached under ``key`` (the step function first) + the
    argument signature. Returns ``(executable, compile seconds)``."""
    if jax.config.jax_disable_jit or jax.config.jax_debug_nans or jax.config.jax_debug_infs:
        # run through jit itself: under disable_jit it runs the steps eagerly (for prints in a loss;
        # the AOT path refused with "Disable jit is not supported in the AOT path"), and with
        # debug_nans / debug_infs it checks the outputs and re-runs op by op to name the culprit
        return functools.partial(_run_checked, run_checked, n), 0.0
    owner, part = _memo.cache_owner(key[0])
    full = (part,) + tuple(_memo.without_owner(k, owner) for k in key[1:]) + (n, _signature(state), _signature(xs),
                                                                              _memo.config_key())
    size = _COMPILED_PER_STEP
    try:
        hash(full)
        table = _COMPILED.table(owner)
    except TypeError:  # (an owner that cannot be weakly referenced, e.g. a class with __slots__, or an
        # unhashable data function: a small strong cache keyed by the step function itself, as before)
        table, full, size = _COMPILED_STRONG, (key[0],) + full, 2 * _COMPILED_PER_STEP
        try:
            hash(full)
        except TypeError:  # an unhashable step or data function: compiled for this call only
            t0 = time.perf_counter()
            return run.lower(state, xs, n).compile(), time.perf_counter() - t0
    exe = _memo.lru_get(table, full)
    if exe is not None:
        return exe, 0.0
    t0 = time.perf_counter()
    exe = run.lower(state, xs, n).compile()
    _memo.lru_put(table, full, exe, size)
    return exe, time.perf_counter() - t0


def _chunk_means(metrics: dict) -> dict:
    """Means of the scalar step metrics over the steps given (``[n]`` each): the metrics saved
    with a checkpoint. Integer and bool metrics count too, as floats (an int aux metric named as
    ``best_metric`` was refused as "not a scalar step metric")."""
    out = {}
    for name, v in metrics.items():
        v = np.asarray(v)
        if name != "finite" and v.ndim == 1 and v.size and (np.issubdtype(v.dtype, np.number) or v.dtype == bool) and not np.iscomplexobj(v):
            out[name] = float(np.mean(v, dtype=np.float64))
    return out


def _stack_batches(batches: list, done: int):
    """Stack a chunk's host batches on a new leading axis, naming the batch that does not fit."""
    try:
        return jax.tree.map(lambda *b: np.stack(b), *batches)
    except ValueError:
        first = jax.tree.map(np.shape, batches[0])
        for i, b in enumerate(batches[1:], 1):
            if jax.tree.structure(b) != jax.tree.structure(batches[0]) or jax.tree.map(np.shape, b) != first:
                shapes = jax.tree.map(np.shape, b) if jax.tree.structure(b) == jax.tree.structure(batches[0]) \
                    else jax.tree.structure(b)
                raise ValueError(f"data: batch {done + i} has shapes {shapes} where batch {done} had {first}; "
                                 f"fit stacks the batches of a chunk, so every batch must have the same "
                                 f"structure and shapes (drop a smaller last batch, e.g. drop_remainder=True)"
                                 ) from None
        raise


def _stack(history: dict[str, list]) -> dict[str, np.ndarray]:
    """The per-chunk metric arrays joined into one ``[steps]`` array per metric."""
    return {name: np.concatenate(v) for name, v in history.items() if v}  # (a failed append left [])


def _settle_saves(checkpointer, e: BaseException, pending=None, redone: bool = False) -> None:
    """After ``fit`` failed with ``e``: commit the checkpoints still being written, and redo a save
    that the failure interrupted inside ``checkpointer.save`` (a Ctrl-C there abandons it). A
    failure of either is added to ``e`` as a note, so that ``e`` (with its state) is what propagates."""
    if checkpointer is None:
        return
    try:
        checkpointer.wait()
        if pending is not None and checkpointer.latest_step() != int(pending[0].step):
            state, data_state, means = pending
            checkpointer.save(state, data_state=data_state, metrics=means, force=True)
            checkpointer.wait()
            e.add_note(f"fit: the checkpoint of step {int(state.step)} "
                       + ("was due and has been saved" if redone else "that this error interrupted was saved again"))
    except BaseException as w:  # noqa: BLE001 (reported on e, which is re-raised)
        e.add_note(f"fit: a checkpoint save also failed ({type(w).__name__}: {w}); the checkpoints on disk end at "
                   f"step {_latest(checkpointer)}")


def _resume_hint(checkpointer) -> str:
    if checkpointer is None:
        return "no checkpointer: nothing to resume from"
    step = _latest(checkpointer)
    return "no checkpoint saved yet" if step is None else f"resume from the last checkpoint (step {step})"


def _latest(checkpointer):
    try:
        return checkpointer.latest_step()
    except Exception:  # noqa: BLE001
        return "unknown"


def _deleted(tree) -> bool:
    return any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(tree))


def _usable(state) -> bool:
    """Whether ``state`` can be handed back: not donated, and not the output of a chunk that failed
    while it ran (its buffers then hold the error: an asynchronous dispatch raises it only when
    the host waits, and attaching it gave an ``e.state`` whose every read raised again)."""
    if _deleted(state):
        return False
    try:
        jax.block_until_ready(state)
        return True
    except Exception:  # noqa: BLE001
        return False


def _log_chunk(history: dict[str, list], metrics: dict) -> int:
    """Append a chunk's host metrics to ``history`` up to its first non-finite step; returns
    how many steps were appended."""
    finite = np.asarray(metrics["finite"])
    k = finite.shape[0] if finite.all() else int(np.argmin(finite))
    for name, v in metrics.items():
        history.setdefault(name, []).append(np.asarray(v)[:k])
    return k


def _log_unlogged(history: dict[str, list], unlogged, chunks: int, e: BaseException) -> None:
    """The metrics of the chunk whose state ``e`` carries, fetched after the interrupt that cut
    their fetch short, into ``history`` after its first ``chunks`` chunks (an interrupt inside
    the append left part of them; noted on ``e``: the callbacks did not see that chunk)."""
    try:
        for v in history.values():
            del v[chunks:]
        _log_chunk(history, jax.device_get(unlogged))
        e.add_note("fit: the last chunk ran before this interruption: its metrics are in e.history, but the "
                   "callbacks (e.g. a MetricsWriter) did not see it")
    except Exception:  # noqa: BLE001 (only the history is at stake)
        pass


def _scalar_metrics(history: dict[str, list], start: int = 0) -> dict[str, np.ndarray]:
    """The per-step scalar metrics of ``history``'s chunks from ``start`` on, joined."""
    return {name: np.concatenate(v[start:]) for name, v in history.items()
            if v[start:] and all(np.ndim(a) == 1 for a in v[start:])}


def _run_rest(callbacks, start: int, args, e: BaseException) -> None:
    """``callbacks[start:]`` on ``args``, each failure noted on ``e`` (the others still run)."""
    for cb in callbacks[start:]:
        try:
            cb(*args)
        except BaseException as w:  # noqa: BLE001 (noted on e, which is re-raised)
            e.add_note(f"fit: a callback also failed after this error ({type(w).__name__}: {w})")


def _check_iterable_data(data) -> None:
    """Refuse the iterables that are not streams of batches: an array (a dataset array gave one
    example per step, and trained without an error; ``iter(x)`` still passes an array of stacked
    batches) and a mapping or string (their keys or characters became the batches: "data ran out
    after 1 batches")."""
    if callable(data):
        return
    hint = ("pass an iterable of batches (a generator of [B, ...] arrays, gf.data.image_loader, a grain "
            "iterator) or a batch_fn(key) -> batch that draws from the data on device, e.g. "
            "lambda key: x[jax.random.randint(key, (B,), 0, len(x))]")
    if isinstance(data, (np.ndarray, jax.Array)):
        raise TypeError(f"data is an array of shape {data.shape}: fit would iterate its leading axis, one "
                        f"example per step for a dataset array; {hint} (an array of stacked batches "
                        f"[num_batches, B, ...]: pass iter(x))")
    if isinstance(data, (collections.abc.Mapping, str, bytes)):
        what = "keys" if isinstance(data, collections.abc.Mapping) else "characters"
        raise TypeError(f"data is a {type(data).__name__}: fit would iterate its {what} as batches; for one "
                        f"fixed batch pass itertools.repeat(batch), else {hint}")


def _chunk_len(done: int, num_steps: int, chunk_size: int, step0: int, checkpointer) -> int:
    """The steps of the chunk after the first ``done``: ``chunk_size``, cut at the run's end and at
    the checkpointer's save steps."""
    n = min(chunk_size, num_steps - done)
    if checkpointer is not None:
        n = min(n, checkpointer.save_every - (step0 + done) % checkpointer.save_every)
    return n


def _gather(iterator, n: int, done: int, num_steps: int, mesh, checkpointer):
    """``(xs, position)``: the next ``n`` host batches stacked (and split over the mesh), and the
    iterator's position after them (:func:`_position`)."""
    batches = []
    for _ in range(n):
        try:
            batches.append(next(iterator))
        except StopIteration:
            raise ValueError(f"data ran out after {done + len(batches)} batches; fit was asked for "
                             f"num_steps={num_steps}") from None
    xs = _stack_batches(batches, done)
    if mesh is not None:
        xs = shd.shard_batch(xs, mesh, stacked=True)
    return xs, _position(iterator, checkpointer)


def _save_args(state, data_state, history, saved_chunks):
    """``(state, data_state, metrics)`` of a checkpoint of ``state``: the iterator's position after
    the batches ``state`` was trained on (read before the next chunk's were gathered) and the means
    of the step metrics since the previous save (``chunk_size < save_every``), not the last chunk's."""
    return state, data_state, _chunk_means(_scalar_metrics(history, saved_chunks))


def _position(iterator, checkpointer):
    """The iterator's ``get_state()`` (a copy: the iterator moves on while a save of it may still be
    pending), where a checkpoint will record it; else None."""
    if checkpointer is None or not hasattr(iterator, "get_state"):
        return None
    position = iterator.get_state()
    try:
        return copy.deepcopy(position)
    except Exception:  # noqa: BLE001 (e.g. a mappingproxy: the checkpointer validates what it gets)
        return position


def _due_save(checkpointer, state, data_state, history, saved_chunks):
    """:func:`_save_args` for the save that ``state``'s step was due but did not get (a callback
    raised before it), else None: ``_settle_saves`` then makes it (up to ``save_every`` steps
    were lost when a script exited on that error)."""
    try:
        if checkpointer.latest_step() == int(state.step):
            return None
        return _save_args(state, data_state, history, saved_chunks)
    except Exception:  # noqa: BLE001 (the save is a courtesy: the original error matters)
        return None


def fit(
    state: TrainState,
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict]],
    data: Callable[[Array], Any] | Iterable,
    num_steps: int,
    *,
    chunk_size: int = 100,
    progress: bool = True,
    callback: Callable[[TrainState, dict], None] | Sequence[Callable] | None = None,
    desc: str = "train",
    unroll: int = 1,
    mesh: jax.sharding.Mesh | None = None,
    min_shard_size: int = shd.MIN_SHARD_SIZE,
    checkpointer=None,
) -> tuple[TrainState, dict]:
    """Run ``num_steps`` updates, ``chunk_size`` per compiled ``lax.scan`` call.

    Args:
      state: the initial :class:`TrainState` (its buffers are donated: do not reuse it).
      step_fn: ``step(state, batch) -> (state, metrics)`` from :func:`make_train_step`, or one's
        own with a bool ``metrics["finite"]``: ``fit`` then keeps the input state of a step that
        reports ``False`` itself, which costs XLA one more copy of the state per chunk
        (``make_train_step``'s step keeps it, told by its ``skip=`` argument).
      data: either ``batch_fn(key) -> batch``, sampled on device inside the scan from
        :func:`batch_key` ``(state.rng)``, a key the train step never uses (toy data,
        device-resident datasets), or an iterable of host
        batches, of which ``chunk_size`` are stacked and transferred per call; the next chunk's
        batches are gathered while a chunk runs (never past ``num_steps`` batches; two chunks of
        batches are then held at once), before that chunk's callbacks: a callback that changes the
        data source (a curriculum) takes effect a chunk later. With a mesh, host
        batches are this process's share (``B_local`` rows; the global batch has
        ``B_local * process_count``). An iterator with ``get_state()`` (grain,
        ``gf.ot.CoupledBatches``) has its position after the saved state's batches recorded in
        every checkpoint.
      num_steps: number of updates.
      chunk_size: updates per jitted call; metrics are fetched to the host once per chunk.
        Compiled chunks are reused by later ``fit`` calls with the same ``step_fn``, ``data``
        function, chunk length and argument types (training in segments compiles once); up to 8
        are kept per step function, for as long as it lives, with the arrays their data
        functions close over (a data function that holds the step function's own object, other
        than as its bound method, e.g. a partial or a lambda over it, keeps that object alive).
        As with ``jax.jit``, values that ``step_fn``, its loss or ``data`` read from closures or globals
        are constants of the compiled chunk: a later call does not see them rebound (a new
        target, another dataset). Build a new step function (:func:`make_train_step` again) or
        carry such values in the batch or the state.
      progress: show a tqdm progress bar (process 0 only).
      desc: the progress bar's label.
      callback: ``callback(state, chunk_metrics)`` (or a list of them) after every chunk, before
        its checkpoint is saved (e.g. a :class:`MetricsWriter`: with ``resume_step``, its log then
        holds every step once after a resume); ``chunk_metrics`` also holds ``"steps_per_s"``. The
        state's buffers are donated to the next chunk: a callback that keeps parameters must copy
        them (``jax.device_get`` or ``jax.tree.map(jnp.copy, ...)``).
      unroll: steps unrolled per scan iteration (``lax.scan(unroll=...)``); small models on CPU
        run faster with 2-8, at the cost of compile time. On XLA:CPU, convolution *gradients*
        inside a loop body take a path ~20x slower than outside one (jax-ml/jax#12868; measured
        here on a small U-Net: 18 s vs 0.85 s per step), so train conv nets on CPU with
        ``unroll=chunk_size`` (no loop left) and a small ``chunk_size``: unrolling multiplies
        the compile time by the steps unrolled (a small Glow: 96 s to compile at ``chunk_size=10,
        unroll=10``, 7 s at ``chunk_size=1``, which leaves no loop either).
      mesh: a ``("data", "fsdp")`` mesh (:func:`make_mesh`): the state is placed by
        :func:`tree_shardings` (replicated, or FSDP-sharded when ``fsdp > 1``), batches are split
        over all devices, and the chunk is jitted with these explicit in/out shardings.
      min_shard_size: arrays with fewer elements are replicated even when ``fsdp > 1``.
      checkpointer: a :class:`Checkpointer`; chunks are cut at its save steps, and the state (with
        the data-iterator position) is saved asynchronously every ``save_every`` steps and at the
        last step of the run, with the means of the step metrics (``loss``, ``grad_norm``, the
        loss's scalar aux) over the steps since the previous save as metrics. Pending saves are committed before ``fit`` returns or raises; a save that an
        exception interrupted (a Ctrl-C while ``save`` waits for the previous write) is made again
        before the exception propagates, and a save that fails is added to the exception as a
        note. Its directory must not hold a step later than ``state.step`` (another run's).
    Returns:
      ``(state, history)`` with ``history[name]``: ``[num_steps]`` numpy arrays of the step
      metrics, plus ``history["wall_time"]`` (seconds spent running the compiled chunks, including
      the transfer of metrics and the gathering of host batches not overlapped with a running
      chunk; compilation excluded), ``history["data_time"]`` (seconds spent gathering host
      batches, most of it while a chunk ran) and ``history["compile_time"]`` (seconds).
      With nothing to run (``num_steps = 0``) the step metrics' names are unknown: ``history``
      holds only these three entries.
    Raises:
      NonFiniteLossError: a step had a non-finite loss; carries the last good state. The
        checkpoints on disk are left as they were (the last one is the last good save). An
        iterable ``data`` has been read to the end of the chunk after the failing one (up to
        ``2 * chunk_size - 1`` batches past ``e.step``): resume from a checkpoint (it records the
        iterator position) or with a re-positioned iterator, not with the same live one. (The
        same holds after any exception: the live iterator may be up to a chunk past ``e.state``.)
      ValueError: an iterable ``data`` ran out before ``num_steps`` batches.
      Any exception from the data iterator, a callback or the checkpointer (or a
      ``KeyboardInterrupt``) is re-raised with the last good state attached as ``e.state`` (its
      step as ``e.step``) and the metrics so far as ``e.history``, so nothing done is lost; if a
      callback raised at a save step (or at the last step), the callbacks after it run and that
      save is made first. A Ctrl-C while a chunk's metrics are fetched leaves that chunk's state
      unsaved (its metrics are in ``e.history``; the callbacks did not see it).
      An error raised while a compiled chunk runs (e.g. from a host callback inside the loss)
      leaves no state to attach: the chunk's input was donated to it. Resume from the last
      checkpoint (the exception's note names its step).
    """
    num_steps, chunk_size = check_int("num_steps", num_steps, 0), check_int("chunk_size", chunk_size)
    unroll = check_int("unroll", unroll)
    if not isinstance(state, TrainState):  # (params given here failed while tracing: "'dict' has no attribute 'rng'")
        raise TypeError(f"state must be a genflow.train.TrainState (gf.train.init_state(params, optimizer, key)); "
                        f"got {type(state).__name__}")
    if not callable(step_fn):
        raise TypeError(f"step_fn must be a function step(state, batch) -> (state, metrics) (make_train_step); got "
                        f"{type(step_fn).__name__}")
    on_device = callable(data)
    if not on_device and not isinstance(data, Iterable):
        raise TypeError(f"data must be a callable batch_fn(key) -> batch or an iterable of batches; "
                        f"got {type(data).__name__}")
    _check_iterable_data(data)
    iterator = None if on_device else iter(data)
    state = _unaliased(state)
    chunk = _chunk_fn(step_fn, data if on_device else None, unroll, mesh)
    jit_kw = {}
    if mesh is not None:
        shd.check_auto_axes(mesh)
        state_sh = shd.tree_shardings(state, mesh, min_shard_size)
        state = shd.place(state, state_sh)
        xs_sh = None if on_device else shd.batch_sharding(mesh, stacked=True)
        jit_kw = dict(in_shardings=(state_sh, xs_sh), out_shardings=(state_sh, shd.replicated(mesh)))
    run = jax.jit(chunk, static_argnums=2, donate_argnums=0, **jit_kw)
    # (for jax.disable_jit / debug_nans / debug_infs: jax.jit itself, without donation -- under
    # debug_infs JAX keeps donating, and its op-by-op re-run then read deleted buffers)
    run_checked = jax.jit(chunk, static_argnums=2, **jit_kw)
    compiled: dict[int, Callable] = {}
    cache_key = (step_fn, data if on_device else None, unroll, mesh, min_shard_size if mesh is not None else None)
    callbacks = _callbacks(callback)
    step0 = int(state.step) if checkpointer is not None else 0
    if checkpointer is not None and getattr(checkpointer, "_closed", False):
        checkpointer._check_open()  # (before training: it failed in orbax after a whole chunk)
    if checkpointer is not None and (checkpointer.latest_step() or 0) > step0:
        raise ValueError(f"checkpointer's directory already holds step {checkpointer.latest_step()}, later than the "
                         f"state's step {step0}: training on would mix two runs in it (a save at an existing step "
                         f"fails, and restore_or would pick the other run's latest). Resume from its latest step, or "
                         f"give this run a new directory (or delete the steps after {step0})")

    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc=desc, leave=False)
    history: dict[str, list] = {}
    done, compile_time, wall_time, data_time = 0, 0.0, 0.0, 0.0
    unlogged = None  # the device metrics of a chunk that ran but is not in ``history`` yet
    cb_rest = None  # (index, args) of the callbacks that a raising callback kept from running
    due = None  # the step whose save is due once the callbacks have run
    logged_chunks = 0  # chunks in ``history`` before the last one was appended
    pending = None  # (state, data_state, metrics) of a save call that has not returned yet
    saved_chunks = 0  # chunks in ``history`` up to the last save (chunks are cut at saves)
    ahead = None  # the next chunk's (xs, position), or the error that gathering it raised
    data_state = None  # the iterator's position after the batches of the chunk last run
    try:
        while done < num_steps:
            n = _chunk_len(done, num_steps, chunk_size, step0, checkpointer)
            xs = None
            if not on_device:
                if ahead is None:  # (the first chunk: nothing runs to overlap its gathering with)
                    t0 = time.perf_counter()
                    ahead = _gather(iterator, n, done, num_steps, mesh, checkpointer)
                    dt = time.perf_counter() - t0
                    data_time, wall_time = data_time + dt, wall_time + dt
                if isinstance(ahead, BaseException):
                    raise ahead
                (xs, position), ahead = ahead, None
            # (keyed by the batches' shapes too: a smaller last host batch at chunk_size=1, or batches
            # that grow during training, reused the first executable and failed with an x64 hint)
            ck = (n, _signature(xs))
            if ck not in compiled:
                compiled[ck], dt_compile = _compiled_chunk(run, run_checked, cache_key, state, xs, n)
                compile_time += dt_compile
            t0 = time.perf_counter()
            logged_chunks = len(history.get("finite", []))  # ("finite" is in every chunk's metrics)
            state, unlogged = compiled[ck](state, xs)
            if not on_device:
                data_state = position
                if done + n < num_steps:
                    # the next chunk's batches are gathered while this one runs (dispatch is
                    # asynchronous; the host used to gather them with the device idle: with a
                    # loader taking 1 ms a batch, the toy MLP trained at 250 steps/s, now 308, its
                    # rate on device data). An error gathering them is raised once this chunk is
                    # logged, called back and saved, as it was before.
                    t1 = time.perf_counter()
                    try:
                        ahead = _gather(iterator, _chunk_len(done + n, num_steps, chunk_size, step0, checkpointer),
                                        done + n, num_steps, mesh, checkpointer)
                    except Exception as err:  # noqa: BLE001 (raised at the next chunk)
                        ahead = err
                    data_time += time.perf_counter() - t1
            # (a Ctrl-C lands here, while the host waits for the chunk: the handler then logs the
            # metrics of the chunk whose state it returns -- e.state was one chunk ahead of e.history)
            metrics = jax.device_get(unlogged)
            dt = time.perf_counter() - t0
            wall_time += dt
            k = _log_chunk(history, metrics)
            unlogged = None
            if k < n:
                hist = _stack(history)
                raise NonFiniteLossError(int(state.step), state, hist)
            done += n
            if checkpointer is not None and logged_chunks == 0:  # (after the first chunk: a typo failed
                # only at the first save, save_every steps in, with nothing saved)
                best, names = getattr(checkpointer, "best_metric", None), _chunk_means(_scalar_metrics(history))
                if best is not None and best not in names:
                    raise ValueError(f"checkpointer.best_metric={best!r} is not a scalar step metric; "
                                     f"expected one of {sorted(names)}")
            # (and the last step of the run, if it is no multiple of save_every: a rerun to the same
            # step count re-trained from the last multiple, and a longer one too)
            if checkpointer is not None and (checkpointer.should_save(step0 + done) or done == num_steps):
                due = step0 + done  # saved below, after the callbacks; an error before then saves it
            # callbacks before the save: a log a callback writes (MetricsWriter) then holds every
            # checkpointed step even if the callback is interrupted (it used to miss that chunk's row
            # for good, as the resume started after it)
            cb_args = (state, dict(metrics, steps_per_s=n / dt))
            for i, cb in enumerate(callbacks):
                cb_rest = (i + 1, cb_args)  # the callbacks still to run if this one raises
                cb(*cb_args)
            cb_rest = None
            if due is not None:
                pending = _save_args(state, data_state, history, saved_chunks)
                saved_chunks = len(history["finite"])  # (a hand-written step_fn may have no "loss")
                _, data_state, means = pending
                checkpointer.save(state, data_state=data_state, metrics=means, force=True)
                pending = due = None
            if bar is not None:
                bar.update(n)
                if "loss" in metrics:  # (a hand-written step_fn may have no "loss": a KeyError here)
                    bar.set_postfix(loss=f"{float(np.mean(metrics['loss'])):.4f}")
        if checkpointer is not None:
            checkpointer.wait()  # a failed background write surfaces here, and is handled below
    except NonFiniteLossError as e:
        _settle_saves(checkpointer, e)
        raise
    except BaseException as e:  # data, callbacks, checkpointer, Ctrl-C: keep what was done
        # ``state`` is the last state a chunk returned (the caller's own was donated). It is
        # attached unless the failing call was a compiled chunk itself (its input is donated).
        redone = False  # whether ``pending`` is a due save that the callbacks' error kept from starting
        if _usable(state):
            e.state = state
            try:  # (a step spanning other processes' devices cannot be read here: it masked the error)
                e.step = int(state.step)
            except Exception:  # noqa: BLE001
                e.step = None
            if unlogged is not None:  # (no save then: the callbacks did not see that chunk)
                _log_unlogged(history, unlogged, logged_chunks, e)
            elif pending is None and due is not None and e.step == due:
                # only the state whose save was due when the error came (the callbacks raised): not
                # the run's input state, and not one whose iterator has moved into the next chunk
                pending = _due_save(checkpointer, state, data_state, history, saved_chunks)
                if pending is not None and cb_rest is not None:
                    # the callbacks after the one that raised see the chunk before its save, as in a
                    # run without errors (a MetricsWriter's log then holds every checkpointed step)
                    _run_rest(callbacks, *cb_rest, e)
                redone = pending is not None
        else:
            e.add_note("fit: the error arose while a compiled chunk ran, and that chunk's input state was donated "
                       "to it: no state can be attached to this error; " + _resume_hint(checkpointer))
            state = None  # (nothing of it is usable)
        if isinstance(ahead, BaseException) and ahead is not e:
            e.add_note(f"fit: gathering the next chunk's batches had failed too ({type(ahead).__name__}: {ahead})")
        e.history = _stack(history)
        _settle_saves(checkpointer, e, pending, redone=redone)
        raise
    finally:
        if bar is not None:
            bar.close()
    out = _stack(history)
    out["wall_time"] = wall_time
    out["data_time"] = data_time
    out["compile_time"] = compile_time
    return state, out
