"""One driver for every hand-written solver: a ``lax.scan`` over the time grid.

A solver is a :class:`Stepper` of three pure functions:

* ``scalars(grid, stages, i, **opts) -> dict`` -- everything a step needs that depends only on the
  grid (times, coefficients, flags), for step ``i`` from ``grid.t[i]`` to ``grid.t[i + 1]``
  (``grid``: a :class:`~genflow.sampling._exp.Grid`; ``stages``: the ``Grid`` of the step's
  intermediate points when the stepper has ``stages``, else None). The driver
  evaluates it for all steps at once (``vmap``) before the loop, so the loop body is just the
  network evaluations and one fused linear combination of the states;
* ``init(model, ts, x, **opts) -> carry`` -- the scan carry, a dict holding at least the state
  ``"x"`` at ``ts[i]``;
* ``step(model, carry, c, key, **opts) -> (carry, nfe)`` -- advance one step with the scalars
  ``c`` of that step; ``nfe`` counts the network evaluations it made.

:func:`run` samples with it; :func:`local_errors` replays it with the state forced onto a
reference trajectory before every step ("teacher forcing"), which gives the local truncation
error of each step -- the quantity :func:`genflow.sampling.optimize_schedule` minimizes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from genflow import _memo
from genflow.paths import Path
from genflow.sampling._exp import Grid, make_grid, stage_grid
from genflow.sampling._model import Model

Array = jax.Array
Carry = dict


class Stepper(NamedTuple):
    """A scan-based solver (see the module docstring).

    ``stages(grid, i, **opts) -> [k]``: optional, the log-SNRs ``lambda = log(alpha/sigma)`` of the
    intermediate points of step ``i`` (single-step stages, quadrature nodes, ...); their times and
    coefficients reach ``scalars`` as a :class:`~genflow.sampling._exp.Grid` of shape ``[k]``.
    ``force(carry, x_prev_ref, x_ref) -> carry`` puts the state on a reference trajectory (default:
    replace ``carry["x"]``).
    ``denoise_row(row, t, alpha, sigma, i, **opts) -> dict``: optional, the scalars of a step ``i``
    that evaluates the network once, on the state at time ``t`` (``alpha``, ``sigma``: the path's
    there), and returns its data prediction ``x0_hat`` (``row``: the last step's scalars, a template
    of their keys, shapes and dtypes). :func:`run` then makes a sampler's final denoising step one
    more iteration of its loop: the network's copy in the loop is the only one in the compiled
    program (a call after the loop was a second copy, which XLA compiled again: with a U-Net, about
    as long as the loop's)."""

    init: Callable[..., Carry]
    scalars: Callable[..., dict]
    step: Callable[..., tuple[Carry, Any]]
    force: Callable[[Carry, Array, Array], Carry] | None = None
    stages: Callable[..., Array] | None = None
    denoise_row: Callable[..., dict] | None = None


# A network of at least this many arrays (parameter tensors, roughly its layers) evaluates a step's
# stages in a lax.scan, so that it is traced and compiled once; a smaller one is called stage after
# stage. Measured on CPU (512 x 64 states, a null model): the scan's stage buffers cost dpm++3s 0.035
# -> 0.15 ms per step, while the copies of a network of a few layers compile in milliseconds; a
# U-Net's copies take seconds each (dpm++3s: 3.4 -> 1.7 s of XLA compile for ch=64 at 32x32).
SCAN_STAGES_FROM = 32


def scan_stages(model) -> bool:
    """Whether a step's several network evaluations run in a ``lax.scan`` (the network traced and
    compiled once): for a network of at least :data:`SCAN_STAGES_FROM` arrays."""
    return len(jax.tree.leaves(model.fn)) >= SCAN_STAGES_FROM


def x_init(model, ts, x, **_) -> Carry:
    """The carry of a solver without history."""
    return {"x": x}


def _force_x(carry: Carry, x_prev_ref: Array, x_ref: Array) -> Carry:
    del x_prev_ref
    return {**carry, "x": x_ref.astype(carry["x"].dtype)}


def _step_key(key, i):
    """The key of step ``i``: ``fold_in(key, i)`` (the same in the scan and in the loop of :func:`run`)."""
    return None if key is None else jax.random.fold_in(key, i)


def _keys(key, n: int):
    return None if key is None else jax.vmap(lambda i: _step_key(key, i))(jnp.arange(n))


_STAGE_AXES = Grid(0, 0, 0, 0, 0, None)


def _stage_lams(stepper: Stepper, g: Grid, length: int, **options) -> Array:
    return jax.vmap(lambda i: stepper.stages(g, i, **options))(jnp.arange(length))


def _all_scalars(stepper: Stepper, g: Grid, st: Grid | None, length: int, **options) -> dict:
    idx = jnp.arange(length)

    # A padded step (i >= n: the grid's bucket padding repeats its last time, h = 0) takes its grid
    # and stage points without derivative: its unused coefficients divide by h = 0, and 0 * inf in
    # their gradient made d/d ts[-1] NaN. This also covers the padded entries and the stage grid's
    # clip to the ends, which only padded steps read there.
    def own(i, tree):
        return jax.tree.map(lambda a: jnp.where(i < g.n, a, jax.lax.stop_gradient(a)), tree)

    if st is None:
        return jax.vmap(lambda i: stepper.scalars(own(i, g), None, i, **options))(idx)
    return jax.vmap(lambda i, s: stepper.scalars(own(i, g), own(i, s), i, **options), in_axes=(0, _STAGE_AXES))(idx, st)


def step_scalars(stepper: Stepper, path: Path, ts: Array, **options) -> dict:
    """``stepper.scalars`` for every step: a dict of arrays with leading dimension ``len(ts) - 1``
    (traceable; differentiable in ``ts``)."""
    n = ts.shape[0] - 1
    g = make_grid(path, ts)
    st = None
    if stepper.stages is not None:
        st = stage_grid(path, _stage_lams(stepper, g, n, **options), g.t[-1], g.t[0])
    return _all_scalars(stepper, g, st, n, **options)


# Compiled pieces of grid_scalars. Only _grid_jit and _stage_grid_jit see the path (and are
# shared by all solvers); the solver-specific ones see arrays only (and are shared by all paths).
@_memo.staged_jit
def _grid_jit(path: Path, tp: Array, n: Array) -> Grid:
    return make_grid(path, tp, n)


def pad_grid(ts: Array, length: int) -> Array:
    """``ts`` extended to ``length + 1`` points by repeating its last time (on the host when
    ``ts`` is concrete, so that no program is compiled per grid length)."""
    try:
        tn = np.asarray(ts)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return jnp.concatenate([ts, jnp.broadcast_to(ts[-1], (length + 1 - ts.shape[0],))])
    return jax.device_put(np.concatenate([tn, np.full(length + 1 - tn.shape[0], tn[-1], tn.dtype)]))


@_memo.staged_jit
def _stage_grid_jit(path: Path, lam: Array, lo: Array, hi: Array) -> Grid:
    return stage_grid(path, lam, lo, hi)


@_memo.staged_jit(static_argnames=("stepper", "options"))
def _stages_jit(g: Grid, arrays: dict, stepper: Stepper, options: tuple) -> Array:
    return _stage_lams(stepper, g, g.t.shape[0] - 1, **dict(options), **arrays)


@_memo.staged_jit(static_argnames=("stepper", "options"))
def _scalars_jit(g: Grid, st: Grid | None, arrays: dict, stepper: Stepper, options: tuple) -> dict:
    return _all_scalars(stepper, g, st, g.t.shape[0] - 1, **dict(options), **arrays)


def bucket(n: int) -> int:
    """The padded length of an ``n``-step grid: a power of two, at least 64."""
    return max(64, 1 << (n - 1).bit_length())


def grid_scalars(stepper: Stepper, path: Path, ts: Array, **options) -> dict:
    """:func:`step_scalars`, compiled in pieces and left padded (its first ``len(ts) - 1``
    entries are the steps; :func:`run` slices them): the path is evaluated once on the grid (padded to a
    power-of-two length >= 64, so one compilation serves many step counts) and at the stage
    points; the solver's coefficients are computed from those arrays alone, so they compile once
    per solver for every path. Array options are traced (a new value does not recompile); the
    others are static. Falls back to :func:`step_scalars` for unhashable ones."""
    n = ts.shape[0] - 1
    arrays = {k: v for k, v in options.items() if isinstance(v, jax.Array)}
    try:
        opts = tuple(sorted((k, v) for k, v in options.items() if k not in arrays))
        hash(opts)
    except TypeError:
        return step_scalars(stepper, path, ts, **options)
    g = _grid_jit(path, pad_grid(ts, bucket(n)), jnp.asarray(n, jnp.int32))
    st = None
    if stepper.stages is not None:
        try:  # (the ends read on the host: indexing the device grid compiled a slice per grid length)
            tn = np.asarray(ts)
            lo, hi = tn[-1], tn[0]
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            lo, hi = ts[-1], ts[0]
        st = _stage_grid_jit(path, _stages_jit(g, arrays, stepper, opts), lo, hi)
    return _scalars_jit(g, st, arrays, stepper, opts)  # padded: run() slices it inside the sampler's program


def run(model: Model, ts: Array, x: Array, key, *, stepper: Stepper, save_trajectory: bool = False,
        rtol=None, atol=None, max_steps=None, scalars: dict | None = None, num_steps=None, denoise: bool = False,
        **options):
    """Integrate from ``ts[0]`` to ``ts[-1]`` with one scan. Returns ``(x, nfe, trajectory, stats)``.

    ``scalars``: the precomputed :func:`grid_scalars` of ``ts`` (possibly padded; computed here if None).
    ``num_steps``: a traced step count ``n <= len(ts) - 1`` for a grid padded past its end (with
    ``scalars`` given): the first ``n`` steps run in a ``fori_loop``, so one compiled program
    serves every step count of a padding bucket (without a saved trajectory, whose length is static).
    Step ``i`` draws its noise from ``fold_in(key, i)`` either way.
    ``denoise``: finish with the denoising step ``x0_hat(x, ts[-1])`` (one more NFE) as one more
    iteration of the loop, with the stepper's ``denoise_row``. The trajectory and ``num_steps`` are
    the steps' (its last entry the state before the denoising step)."""
    del rtol, atol, max_steps
    if denoise and stepper.denoise_row is None:
        raise ValueError("denoise=True needs a stepper with a denoise_row")
    carry = stepper.init(model, ts, x, **options)
    if num_steps is not None and (save_trajectory or scalars is None):
        raise ValueError("num_steps needs precomputed scalars and no saved trajectory")
    n = ts.shape[0] - 1
    if scalars is None:
        scalars = step_scalars(stepper, model.path, ts, **options)
    elif num_steps is None:
        scalars = jax.tree.map(lambda v: v[:n], scalars)
    if denoise:
        scalars = _with_denoise_row(stepper, model.path, ts, scalars, n if num_steps is None else num_steps,
                                    padded=num_steps is not None, **options)

    def step(state, inp):
        (c, nfe), (_, (sc, k)) = state, inp
        c, used = stepper.step(model, c, sc, k, **options)
        return c, nfe + jnp.asarray(used, jnp.int32)

    keys = _keys(key, jax.tree.leaves(scalars)[0].shape[0])
    (carry, nfe), traj, steps = step_loop(step, (carry, jnp.zeros((), jnp.int32)), n + int(denoise),
                                          None if num_steps is None else num_steps + int(denoise),
                                          (lambda state: state[0]["x"]) if save_trajectory else None,
                                          xs=(scalars, keys))
    if save_trajectory:
        traj = jnp.concatenate([x[None], traj[:n]], axis=0)
    return carry["x"], nfe, traj, {"num_steps": steps - int(denoise)}


def _with_denoise_row(stepper: Stepper, path: Path, ts: Array, scalars: dict, last, *, padded: bool,
                      **options) -> dict:
    """``scalars`` with the stepper's denoising row at index ``last`` (the step count; traced where
    ``padded``: the rows past it are the padding's)."""
    template = jax.tree.map(lambda v: v[last - 1], scalars)
    t = ts[-1]
    row = stepper.denoise_row(template, t, path.alpha(t), path.sigma(t), last, **options)
    if jax.tree.structure(row) != jax.tree.structure(template) or any(
            jnp.shape(r) != v.shape for r, v in zip(jax.tree.leaves(row), jax.tree.leaves(template))):
        raise ValueError(f"denoise_row must return the structure and shapes of a step's scalars "
                         f"{jax.tree.map(jnp.shape, template)}; got {jax.tree.map(jnp.shape, row)}")

    def put(v, r):
        v = jnp.concatenate([v, jnp.asarray(r, v.dtype)[None]])
        return v.at[last].set(v[-1]) if padded else v

    return jax.tree.map(put, scalars, row)


def step_loop(step: Callable, carry, n: int, num_steps=None, save: Callable | None = None, xs=None):
    """``carry = step(carry, (i, xs[i]))`` for the steps ``i`` of a grid of ``n`` steps (``xs``: a
    pytree of per-step inputs with a leading axis, or None).

    ``num_steps`` (traced; the grid and ``xs`` padded past its end): the first ``num_steps`` steps
    in a ``fori_loop``, so one compiled program serves every step count of a padding bucket.
    Otherwise all ``n`` in a ``lax.scan`` of static length, which forward and reverse mode
    differentiate, stacking ``save(carry)`` after each step if ``save`` is given. Returns
    ``(carry, stacked saves or None, steps run as int32)``."""
    if num_steps is not None:
        body = lambda i, c: step(c, (i, jax.tree.map(lambda v: v[i], xs)))  # noqa: E731
        return jax.lax.fori_loop(0, num_steps, body, carry), None, jnp.asarray(num_steps, jnp.int32)

    def scan_body(c, inp):
        c = step(c, inp)
        return c, None if save is None else save(c)

    carry, saved = jax.lax.scan(scan_body, carry, (jnp.arange(n), xs))
    return carry, saved, jnp.asarray(n, jnp.int32)


def local_errors(model: Model, ts: Array, xs_ref: Array, key=None, *, stepper: Stepper, **options) -> Array:
    """Per-step local errors ``step(x_ref(ts[i])) - x_ref(ts[i + 1])`` with the solver's history
    built from evaluations on the reference trajectory.

    Args:
      xs_ref: ``[N + 1, B, ...]`` the exact states on the grid ``ts: [N + 1]``.
    Returns:
      ``[N, B, ...]`` local errors.
    """
    n = ts.shape[0] - 1
    force = stepper.force or _force_x
    cs = step_scalars(stepper, model.path, ts, **options)
    carry = stepper.init(model, ts, xs_ref[0], **options)

    def body(c, inp):
        i, sc, k = inp
        c = force(c, xs_ref[jnp.maximum(i - 1, 0)], xs_ref[i])
        c, _ = stepper.step(model, c, sc, k, **options)
        return c, c["x"] - xs_ref[i + 1]

    _, errs = jax.lax.scan(body, carry, (jnp.arange(n), cs, _keys(key, n)))
    return errs
