"""``fit``: the jitted training loop, ``lax.scan`` over chunks of steps."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from genflow.train._state import TrainState

Array = jax.Array


class NonFiniteLossError(FloatingPointError):
    """Raised by :func:`fit` when a step produced a non-finite loss or gradient.

    Attributes:
      step: the (0-based) index of the offending update, i.e. ``state.step`` before it.
      state: the last good :class:`TrainState` (the update was not applied).
      history: metrics of the steps completed before it.
    """

    def __init__(self, step: int, state: TrainState, history: dict):
        super().__init__(
            f"non-finite loss or gradient at step {step}; training stopped and the last good state "
            f"(step {int(state.step)}) is in this exception's .state"
        )
        self.step = step
        self.state = state
        self.history = history


def _chunk_fn(step_fn, batch_fn, unroll: int = 1):
    """``run(state, xs, length)``: ``length`` steps in one ``lax.scan``; batches come from
    ``xs`` (stacked host batches) or, when ``xs`` is None, from ``batch_fn`` on device."""

    def run(state: TrainState, xs, length: int):
        def body(carry, x):
            st, halted = carry
            batch = batch_fn(jax.random.fold_in(st.rng, 1)) if x is None else x
            new, metrics = step_fn(st, batch)
            ok = metrics["finite"] & ~halted
            new = jax.lax.cond(ok, lambda: new, lambda: st)
            metrics = dict(metrics, finite=ok)
            return (new, ~ok), metrics

        (state, _), metrics = jax.lax.scan(body, (state, jnp.array(False)), xs, length=length, unroll=unroll)
        return state, metrics

    return run


def fit(
    state: TrainState,
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict]],
    data: Callable[[Array], Any] | Iterable,
    num_steps: int,
    *,
    chunk_size: int = 100,
    progress: bool = True,
    callback: Callable[[TrainState, dict], None] | None = None,
    desc: str = "train",
    unroll: int = 1,
) -> tuple[TrainState, dict]:
    """Run ``num_steps`` updates, ``chunk_size`` per compiled ``lax.scan`` call.

    Args:
      state: the initial :class:`TrainState` (its buffers are donated: do not reuse it).
      step_fn: ``step(state, batch) -> (state, metrics)`` from :func:`make_train_step`.
      data: either ``batch_fn(key) -> batch``, sampled on device inside the scan from a key
        derived from ``state.rng`` (toy data, device-resident datasets), or an iterable of host
        batches, of which ``chunk_size`` are stacked and transferred per call.
      num_steps: number of updates.
      chunk_size: updates per jitted call; metrics are fetched to the host once per chunk.
      progress: show a tqdm progress bar.
      callback: ``callback(state, chunk_metrics)`` after every chunk (checkpoints, logging).
      unroll: steps unrolled per scan iteration (``lax.scan(unroll=...)``); small models on CPU
        run faster with 2-8, at the cost of compile time.
    Returns:
      ``(state, history)`` with ``history[name]``: ``[num_steps]`` numpy arrays of the step
      metrics, plus ``history["wall_time"]`` (seconds spent running the compiled chunks,
      including the host transfer of metrics) and ``history["compile_time"]`` (seconds).
    Raises:
      NonFiniteLossError: a step had a non-finite loss; carries the last good state.
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative int; got {num_steps!r}")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    on_device = callable(data)
    iterator = None if on_device else iter(data)
    run = jax.jit(_chunk_fn(step_fn, data if on_device else None, unroll), static_argnums=2, donate_argnums=0)
    compiled: dict[int, Callable] = {}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc=desc, leave=False)
    history: dict[str, list] = {}
    done, compile_time, run_time = 0, 0.0, 0.0
    try:
        while done < num_steps:
            n = min(chunk_size, num_steps - done)
            xs = None
            if not on_device:
                batches = [next(iterator) for _ in range(n)]
                xs = jax.tree.map(lambda *b: np.stack(b), *batches)
            if n not in compiled:
                t0 = time.perf_counter()
                compiled[n] = run.lower(state, xs, n).compile()
                compile_time += time.perf_counter() - t0
            t0 = time.perf_counter()
            state, metrics = compiled[n](state, xs)
            metrics = jax.device_get(metrics)
            run_time += time.perf_counter() - t0
            finite = np.asarray(metrics["finite"])
            k = n if finite.all() else int(np.argmin(finite))
            for name, v in metrics.items():
                history.setdefault(name, []).append(np.asarray(v)[:k])
            if k < n:
                hist = {name: np.concatenate(v) for name, v in history.items()}
                raise NonFiniteLossError(done + k, state, hist)
            done += n
            if callback is not None:
                callback(state, metrics)
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{float(np.mean(metrics['loss'])):.4f}")
    finally:
        if bar is not None:
            bar.close()
    out = {name: np.concatenate(v) for name, v in history.items()}
    out["wall_time"] = run_time
    out["compile_time"] = compile_time
    return state, out
