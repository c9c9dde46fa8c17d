"""Log-likelihood by the instantaneous change of variables along an ODE.

For ``dx/dt = v(x, t)`` carrying densities ``p_t`` (the continuity equation), the log-density
along a trajectory obeys ``d log p_t(x_t) / dt = -div v(x_t, t)`` (Chen et al. 2018, "Neural
Ordinary Differential Equations"; Grathwohl et al. 2019, FFJORD). Integrating the augmented
state ``(x_t, delta_t)`` with ``d delta / dt = div v`` from the data end ``t0`` to ``t1``::

    log p_t0(x) = log p_t1(x_t1) + int_t0^t1 div v(x_t, t) dt

For a diffusion / flow model, ``v`` is the probability-flow velocity
``alpha' x0_hat + sigma' eps_hat`` (Song et al. 2021, "Score-Based Generative Modeling through
SDEs", Sec. 4.3), and ``p_t1`` is the path's prior ``N(0, sigma(1)^2 I)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from genflow import _memo, param
from genflow._checks import (check_finite_rows, check_int, check_key, check_model_fn, concrete_real, flat_batch, is_int,
                             real_or_traced)
from genflow.likelihood._trace import PROBES, exact_divergence, hutchinson_divergence, sample_probes
from genflow.paths import Path, check_orientation, check_path
from genflow.sampling._diffrax import explicit_axes_as_auto, per_sample_norm, solve_checked

Array = jax.Array

__all__ = ["LogProbInfo", "GaussianPrior", "PathVelocity", "SOLVERS", "ode_log_prob", "log_prob",
           "gaussian_log_prob"]

# name -> (diffrax solver class, model evaluations per step, evaluations at the start, adaptive)
SOLVERS: dict[str, tuple[type, int, int, bool]] = {
    "euler": (diffrax.Euler, 1, 0, False),
    "heun": (diffrax.Heun, 2, 0, False),
    "midpoint": (diffrax.Midpoint, 2, 0, False),
    "ralston": (diffrax.Ralston, 2, 0, False),
    "bosh3": (diffrax.Bosh3, 3, 1, True),
    "tsit5": (diffrax.Tsit5, 6, 1, True),
    "dopri5": (diffrax.Dopri5, 6, 1, True),
    "dopri8": (diffrax.Dopri8, 13, 1, True),
}
TRACES = ("exact", "hutchinson")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogProbInfo:
    """What a likelihood solve did.

    Attributes:
      nfe: evaluations of the augmented ODE's right-hand side (int32). Each is one model
        evaluation plus ``jvps_per_eval`` Jacobian-vector products through it (``D`` for the
        exact trace, the number of probes for Hutchinson).
      prior_logp: ``[B]`` ``log p_t1(x_t1)`` under the prior.
      delta_logp: ``[B]`` the integrated divergence ``int_t0^t1 div v dt``.
      z: ``[B, ...]`` the end state ``x_t1`` (the latent).
      num_steps: solver steps taken (accepted and rejected).
      jvps_per_eval: JVPs per right-hand-side evaluation (static).
    """

    nfe: Array
    prior_logp: Array
    delta_logp: Array
    z: Array
    num_steps: Array
    jvps_per_eval: int = dataclasses.field(default=0, metadata=dict(static=True))


def gaussian_log_prob(z: Array, std) -> Array:
    """``log N(z; 0, std^2 I)`` summed over the features of ``z: [B, ...]``; returns ``[B]`` in
    float32 or wider. ``std``: a scalar (concrete or traced), or ``[B]``, one per example (a
    per-feature std is refused: a ``[D]`` one would pair with the batch axis)."""
    _check_x(z, floating=False, name="z")  # (a single example [D] was read as D one-dimensional examples)
    real_or_traced("std", std, "a real > 0")  # (a bool or string std is refused by name)
    if jnp.shape(std) not in ((), (1,), (z.shape[0],)):  # (a [D] std with B != D: an unnamed broadcasting error)
        raise ValueError(f"std must be a scalar or one per example, [B] = ({z.shape[0]},); got shape "
                         f"{jnp.shape(std)}")
    if not isinstance(std, jax.core.Tracer) and not np.all(np.asarray(std) > 0):  # (0 gave NaN, < 0 nonsense)
        raise ValueError(f"std must be > 0; got {std!r}")
    d = math.prod(z.shape[1:])
    # in float32 or wider: in bfloat16 a sum over 3,072 features came out 50 nats off
    dt = jnp.promote_types(z.dtype, jnp.float32)
    zz = jnp.sum(jnp.square(flat_batch(z).astype(dt)), axis=-1)
    std = jnp.asarray(std, dt)
    return -0.5 * zz / (std * std) - d * (jnp.log(std) + 0.5 * math.log(2 * math.pi))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianPrior:
    """The isotropic prior ``N(0, std^2 I)``: ``prior(z: [B, ...]) -> [B]``."""

    std: Array

    def __call__(self, z: Array) -> Array:
        return gaussian_log_prob(z, self.std)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PathVelocity:
    """The probability-flow velocity ``v(x, t)`` of a model ``fn`` of kind ``prediction`` on ``path``.

    ``v = alpha' x0_hat + sigma' eps_hat`` (:func:`genflow.param.convert` to ``"velocity"``),
    evaluated with ``t`` in the dtype of ``x`` (a float64 solve keeps float64 times).
    """

    fn: Callable
    path: Path
    prediction: str = dataclasses.field(metadata=dict(static=True))

    def __call__(self, x: Array, t: Array) -> Array:
        out = param.check_model_output(self.fn(x, t), x)
        return param.convert(out, x, t, self.path, self.prediction, "velocity").astype(x.dtype)


def is_zero(value) -> bool:
    """True if a concrete scalar is exactly 0 (False under tracing, where it cannot be checked)."""
    try:
        return float(value) == 0.0
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return False


def _check_x(x, floating: bool = True, name: str = "x", nonempty: bool = False) -> None:
    """``x`` must be an array ``[B, ...]`` with a feature axis (and, if ``floating``, of a float dtype;
    if ``nonempty``, with ``B >= 1``: the ELBO's mean over an empty batch failed as "n must be a
    positive int", naming its time sampler's argument)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array [B, ...]; got {type(x).__name__}")
    if x.ndim < 2 or (nonempty and x.shape[0] == 0):
        raise ValueError(f"{name} must have shape [B, ...] with at least one feature axis"
                         f"{' and B >= 1' if nonempty else ''}; got shape {x.shape}")
    if floating and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")


def _check_options(trace, solver, steps, probe, num_probes, key, rtol=1e-5, atol=1e-5) -> int | None:
    """Checks the options; returns ``steps`` as a Python int (a NumPy integer would be traced)."""
    if trace not in TRACES:
        raise ValueError(f"unknown trace {trace!r}; expected one of {list(TRACES)}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")
    if steps is None and not SOLVERS[solver][3]:
        raise ValueError(f"solver {solver!r} has a fixed step: pass steps=N (or use an adaptive solver "
                         f"{sorted(k for k, v in SOLVERS.items() if v[3])})")
    if steps is not None and not is_int(steps):
        raise ValueError(f"steps must be a positive int or None; got {steps!r}")
    for name, value, low in (("rtol", rtol, 0.0), ("atol", atol, 0.0)):  # (negative ones were accepted)
        v = concrete_real(value)
        if (v is None or not v >= low or not math.isfinite(v)  # (inf was accepted: every step passed)
                or (name == "rtol" and steps is None and not v > 0)):
            raise ValueError(f"{name} must be a finite real {'> 0' if name == 'rtol' else '>= 0'}; got {value!r}")
    if trace == "hutchinson":
        if key is None:
            raise ValueError("trace='hutchinson' draws random probes: pass key=jax.random.key(...)")
        check_key(key)
        if probe not in PROBES:
            raise ValueError(f"unknown probe {probe!r}; expected one of {list(PROBES)}")
        check_int("num_probes", num_probes)
    return None if steps is None else int(steps)


def ode_log_prob(
    velocity: Callable[[Array, Array], Array],
    x: Array,
    *,
    log_prior: Callable[[Array], Array],
    t0: float = 0.0,
    t1: float = 1.0,
    trace: str = "exact",
    key: Array | None = None,
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
    chunk_size: int | None = None,
    max_steps: int = 16_384,
) -> tuple[Array, LogProbInfo]:
    """``log p_t0(x)`` for the ODE ``dx/dt = velocity(x, t)`` with density ``exp(log_prior)`` at ``t1``.

    Solves the augmented ODE ``d(x, delta)/dt = (v, div v)`` from ``t0`` to ``t1`` and returns
    ``log_prior(x_t1) + delta_t1``.

    Args:
      velocity: ``v(x: [B, ...], t: [B]) -> [B, ...]``, acting on each sample independently: a
        pytree callable (:class:`jax.tree_util.Partial`, a registered dataclass), a
        ``functools.partial`` or a plain function. The arrays a function uses through its closure,
        defaults or module globals are traced, read at every call (:func:`genflow.param.as_pytree_fn`):
        new parameters reuse the compiled solve, and every adjoint differentiates with respect to
        them. Other callables are static arguments, kept by identity: the arrays they hold are
        constants of the compiled program.
      x: ``[B, ...]`` points at time ``t0``. The solve runs in ``x.dtype`` (at least float32). A
        batch sharded over a device mesh (Auto or Explicit axes) gives results sharded as it.
      log_prior: ``log p_t1(z: [B, ...]) -> [B]``.
      t0, t1: integration interval, from ``t0`` to ``t1`` (usually ``t0 < t1``; either order is integrated).
      trace: ``"exact"`` (D Jacobian columns by forward mode) or ``"hutchinson"``.
      key: PRNG key for the Hutchinson probes (fixed along the whole trajectory; drawn for the
        whole batch, so a sample's estimate depends on its position and batch size -- unbiased in
        each, but not reproducible in another batch).
      num_probes: probes per right-hand-side evaluation (Hutchinson).
      probe: ``"rademacher"`` or ``"gaussian"``.
      solver: one of :data:`SOLVERS`; adaptive ones (PID control with ``rtol``, ``atol``) unless
        ``steps`` is given, which selects ``steps`` uniform steps.
      adjoint: a Diffrax adjoint for gradients (default ``RecursiveCheckpointAdjoint``, i.e.
        discretise-then-optimise; ``diffrax.BacksolveAdjoint(...)`` is FFJORD's
        optimise-then-discretise with O(1) memory; with an adaptive FSAL solver it refuses the
        pre-evaluated first stage, so ``info.nfe`` can be one low if the first step is rejected).
      chunk_size: Jacobian columns per batched JVP for the exact trace.
      max_steps: cap on the steps of adaptive solvers (fixed-step solves use exactly ``steps``).
    Returns:
      ``(logp: [B], info: LogProbInfo)``.
    """
    _check_x(x)
    for name, value in (("t0", t0), ("t1", t1)):  # (NaN integrated nothing: log_prior(x) came back)
        v = concrete_real(value)
        if not isinstance(value, jax.core.Tracer) and (v is None or not math.isfinite(v)):
            raise ValueError(f"{name} must be a finite real; got {value!r}")
    if concrete_real(t0) is not None and concrete_real(t0) == concrete_real(t1):
        raise ValueError(f"t0 and t1 must differ (the ODE runs from t0 to t1); got t0 = t1 = {t0!r}")
    steps = _check_options(trace, solver, steps, probe, num_probes, key, rtol, atol)
    if steps is None:  # (an adaptive solve ran to max_steps on a NaN row and said only that; a
        check_finite_rows("x", x)  # fixed-step one keeps a NaN row's NaN in its own row, by design)
    check_int("max_steps", max_steps)  # (0 failed inside Diffrax: "Must have at least one checkpoint")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    probes = None
    if trace == "hutchinson":
        probes = sample_probes(key, (num_probes,) + x.shape, dtype, probe)
    t0 = jnp.asarray(t0, dtype)
    t1 = jnp.asarray(t1, dtype)
    adjoint = diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint
    if steps is not None:
        max_steps = steps  # exact for a fixed grid: keeps RecursiveCheckpointAdjoint's checkpoints small
        rtol = atol = 0.0  # (unused on a fixed grid: a new value recompiled the solve)
    else:  # traced: a sweep over tolerances compiled the solve once per value
        rtol, atol = (jnp.asarray(v, dtype) for v in (rtol, atol))  # (the state's: float64 promoted its controller)
    return _solve(param.as_pytree_fn(velocity), param.as_pytree_fn(log_prior), x, probes, t0, t1, adjoint, solver,
                  rtol, atol, steps, chunk_size, int(max_steps))


@_memo.filter_jit
def _solve(velocity, log_prior, x, probes, t0, t1, adjoint, solver, rtol, atol, steps, chunk_size, max_steps):
    jvps = math.prod(x.shape[1:]) if probes is None else probes.shape[0]  # (static: LogProbInfo.jvps_per_eval)

    def specs(spec):  # (the outputs' partition specs from the batch's: per-sample results sharded as it)
        none, rows = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(spec[0] if len(spec) else None)
        return rows, LogProbInfo(nfe=none, prior_logp=rows, delta_logp=rows, z=spec, num_steps=none,
                                 jvps_per_eval=jvps)

    return explicit_axes_as_auto(
        lambda x, velocity, log_prior, probes, t0, t1, adjoint, rtol, atol: _solve_sharded(
            velocity, log_prior, x, probes, t0, t1, adjoint, solver, rtol, atol, steps, chunk_size, max_steps, jvps),
        x, specs, (velocity, log_prior, probes, t0, t1, adjoint, rtol, atol))


def _solve_sharded(velocity, log_prior, x, probes, t0, t1, adjoint, solver, rtol, atol, steps, chunk_size, max_steps,
                   jvps):
    b = x.shape[0]

    def rhs(t, y, args):
        # The velocity (with its parameters) travels in ``args`` so that every adjoint, including
        # BacksolveAdjoint, differentiates with respect to it.
        vel, z_probes = args
        xt, _ = y
        f = lambda z: vel(z, jnp.full((b,), t, xt.dtype)).astype(xt.dtype)  # noqa: E731
        if z_probes is None:
            v, div = exact_divergence(f, xt, chunk_size)
        else:
            v, div = hutchinson_divergence(f, xt, z_probes)
        return v, div.astype(xt.dtype)

    cls, per_step, init, fsal = SOLVERS[solver]
    term, args, state = diffrax.ODETerm(rhs), (velocity, probes), None
    y0 = (x, jnp.zeros((b,), x.dtype))
    if steps is None:
        # (per sample: each example's log-density meets the tolerance whatever its batch)
        controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=per_sample_norm)
        dt0 = (t1 - t0) / 32.0
        if fsal and isinstance(adjoint, diffrax.RecursiveCheckpointAdjoint):
            # the first stage evaluated once, here (counted by ``init``): without it, a rejected
            # first step re-evaluated it uncounted (info.nfe one low), as in gf.sample's ode_solve
            state = (jnp.array(False), term.vf(t0, y0, args))
    else:
        # the ends set exactly: t0 + (t1 - t0) * 1 rounds away from t1 (0.15 -> 0.999 in float32), and
        # Diffrax then refused the grid at run time ("Must have `t0==ts[0]` and `t1==ts[-1]`")
        ts = t0 + (t1 - t0) * jnp.linspace(0.0, 1.0, steps + 1, dtype=x.dtype)
        ts = ts.at[0].set(t0).at[-1].set(t1)
        controller = diffrax.StepTo(ts)
        dt0 = None  # FSAL solvers still make their first evaluation (init) under StepTo
        if isinstance(adjoint, diffrax.BacksolveAdjoint) and "stepsize_controller" not in adjoint.kwargs:
            # its backward solve reuses the forward controller, whose increasing grid Diffrax
            # refuses from t1 to t0: jax.grad failed at run time (ffjord_loss's default steps=8)
            # (with t0 > t1 Diffrax solves in negated time, -t, so the grid it checks is -ts: the
            # reversed ts failed at run time, "must be strictly increasing")
            back = jnp.where(t1 > t0, ts[::-1], -ts[::-1])
            adjoint = diffrax.BacksolveAdjoint(**{**adjoint.kwargs, "stepsize_controller": diffrax.StepTo(back)})
    (zs, deltas), n, _ = solve_checked(term, cls(), t0=t0, t1=t1, dt0=dt0, y0=y0, args=args,
                                       stepsize_controller=controller, adjoint=adjoint, max_steps=max_steps,
                                       solver_state=state)
    z, delta = zs[-1], deltas[-1]
    prior = log_prior(z)
    if jnp.shape(prior) != (x.shape[0],):  # (a [B, 1] prior broadcast the result to [B, B])
        raise ValueError(f"log_prior(z) must return shape [B] = ({x.shape[0]},); got {jnp.shape(prior)}")
    prior = prior.astype(x.dtype)
    info = LogProbInfo(nfe=jnp.asarray(init + per_step * n, jnp.int32), prior_logp=prior, delta_logp=delta,
                       z=z, num_steps=n, jvps_per_eval=jvps)
    return prior + delta, info



def _unit_float(name: str, t) -> float:
    """``float(t)`` for a concrete real number in ``[0, 1]`` (Python, NumPy or a 0-d array); a traced
    scalar (a sweep over t_min under jit / vmap) passes unchecked, as in ``vdm_elbo``."""
    if isinstance(t, jax.core.Tracer) and jnp.ndim(t) == 0:
        return t
    v = concrete_real(t)  # None for a tracer, an array of several times, a string
    if v is None or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1]; got {t!r}")
    return v

def log_prob(
    fn: Callable[[Array, Array], Array],
    path: Path,
    x: Array,
    *,
    prediction: str,
    trace: str = "exact",
    key: Array | None = None,
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    t_min: float | None = None,
    t_max: float = 1.0,
    prior: Callable[[Array], Array] | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
    chunk_size: int | None = None,
    max_steps: int = 16_384,
) -> tuple[Array, LogProbInfo]:
    """Log-density of ``x`` under a diffusion / flow model, through its probability-flow ODE.

    ``log p_tmin(x) = log prior(x_tmax) + int_tmin^tmax div v(x_t, t) dt`` with
    ``v = alpha' x0_hat + sigma' eps_hat`` the probability-flow velocity of ``fn`` (Song et al.
    2021, Sec. 4.3 and App. D.2; Grathwohl et al. 2019). The prior defaults to the path's
    ``N(0, sigma(t_max)^2 I)``; where ``alpha(t_max) > 0`` (VP paths) the true marginal there is
    ``N(alpha mu, alpha^2 Cov + sigma^2 I)``, and the difference is a prior-mismatch term.

    It returns after the device has finished (so that runtime checks, such as an adaptive solve
    reaching ``max_steps``, can raise). A plain function (lambda, closure) as ``fn`` is keyed by
    identity and its compiled program stays in JAX's compile cache after the function is gone
    (bounded by JAX's LRU cache; ``jax.clear_caches()`` frees it): in a loop, reuse one function or
    pass a ``functools.partial`` / :func:`genflow.nets.model_fn` over the parameters (one shared
    program).

    Args:
      fn: model ``fn(x: [B, ...], t: [B]) -> [B, ...]`` of kind ``prediction``: a pytree callable
        (:func:`genflow.nets.model_fn`, :class:`jax.tree_util.Partial`), a ``functools.partial``
        or a plain function, whose arrays (through its closure, defaults or module globals) are
        traced and read at every call (:func:`genflow.param.as_pytree_fn`): new parameters reuse
        the compiled program. Other callables are static arguments, kept by identity: the arrays
        they hold are constants of the compiled program.
      path: the Gaussian path the model was trained with.
      x: ``[B, ...]`` data points (float64 for tight tolerances).
      prediction: ``"eps" | "x0" | "v" | "score" | "velocity"``.
      trace: ``"exact"`` or ``"hutchinson"`` (then ``key``, ``num_probes``, ``probe``; the probes are
        drawn for the whole batch: a sample's estimate depends on its batch, see :func:`ode_log_prob`).
      solver, rtol, atol, steps, adjoint, chunk_size, max_steps: see :func:`ode_log_prob`.
      t_min: data end of the integration (default ``path.t_min``); the result is ``log p_tmin``.
      t_max: noise end (default 1). Eps / score models on a path with ``alpha(t_max) = 0``
        (``linear`` at t = 1) need ``t_max < 1``: their conversion to a velocity is 0/0 there.
      prior: ``log p_tmax(z: [B, ...]) -> [B]`` (default ``N(0, sigma(t_max)^2 I)``).
    Returns:
      ``(logp: [B], info: LogProbInfo)`` in nats.

    Example::

        logp, info = gf.log_prob(fn, gf.paths.linear(), x, prediction="velocity")
        logp, info = gf.log_prob(fn, path, x, prediction="eps", trace="hutchinson", key=key, num_probes=4)
    """
    from genflow.sampling import as_pytree_fn

    param.check_kind(prediction)
    check_path(path)
    _check_x(x)
    t_min = path.t_min if t_min is None else t_min
    t_min, t_max = _unit_float("t_min", t_min), _unit_float("t_max", t_max)
    lo, hi = concrete_real(t_min), concrete_real(t_max)  # (None when traced)
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"need t_min < t_max; got t_min={t_min}, t_max={t_max}")

    def check_ends():
        if lo is not None and hi is not None:
            check_orientation(path, lo, hi)  # (a path with noise at t=0 gave NaN log-densities)
        if prediction in ("eps", "score") and is_zero(path.alpha(jnp.asarray(t_max))):
            raise ValueError(f"prediction={prediction!r} cannot be converted to a velocity at t_max={t_max} on path "
                             f"{path.name!r} (alpha = 0 there); pass t_max slightly below 1, e.g. 0.999")
        if prediction == "x0" and is_zero(path.sigma(jnp.asarray(t_min))):
            raise ValueError(f"prediction='x0' cannot be converted to a velocity at t_min={t_min} on path "
                             f"{path.name!r} (sigma = 0 there); pass t_min > 0, e.g. 1e-3")
        why = param.singular_velocity(path, t_min, prediction)
        if why is not None:  # (vp_linear at t_min = 0: NaN log-densities, or max_steps for an adaptive solver)
            raise ValueError(f"t_min={t_min} has {why}, and every solver evaluates it at t_min; "
                             f"{param.singular_t_min_advice(path, t_min, 't_min')}, or pass a velocity model")
        return True

    # (memoised under the path's value, the ends and the kind: ~0.3 ms of eager path evaluations
    # per call, for a loop scoring batch after batch)
    _memo.memoised("gf.log_prob", (_memo.path_key(path), _memo.value_key(t_min), _memo.value_key(t_max)),
                   (prediction,), check_ends)
    if prior is None:
        prior = GaussianPrior(path.sigma(jnp.asarray(t_max, jnp.promote_types(x.dtype, jnp.float32))))
    velocity = PathVelocity(as_pytree_fn(check_model_fn(fn)), path, prediction)
    return ode_log_prob(velocity, x, log_prior=prior, t0=t_min, t1=t_max, trace=trace, key=key,
                        num_probes=num_probes, probe=probe, solver=solver, rtol=rtol, atol=atol, steps=steps,
                        adjoint=adjoint, chunk_size=chunk_size, max_steps=max_steps)
