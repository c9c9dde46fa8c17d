"""``genflow.sample``: draw from a diffusion / flow model with any solver, path and prediction kind."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from genflow import _memo, param
from genflow.param import as_pytree_fn  # (defined there: the model wrappers of gf.param use it too)
from genflow._checks import (check_denoise, check_finite_rows, check_int, check_key, check_model_fn, concrete_real,
                             is_int)
from genflow.paths import Path, check_path
from genflow.sampling import _diffrax, _driver, _registry
from genflow.sampling._grid import default_denoise, noisy_end, sampler_grid, velocity_determines_x0
from genflow.sampling._model import Model

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleInfo:
    """What a sampler call did.

    Attributes:
      nfe: model evaluations actually made: calls of ``fn`` (int32 array; exact for adaptive
        solvers too). A guided ``fn`` counts once per call although it may run its network more
        than once (``gf.guidance.cfg``: twice; ``interval``: twice inside its interval).
      ts: ``[steps + 1]`` the time grid (adaptive solvers integrate between its endpoints and, with
        ``save_trajectory``, save at its times; they never step on it).
      trajectory: ``[steps + 1, B, ...]`` states on ``ts`` if ``save_trajectory`` else None.
      stats: solver-specific counters (e.g. accepted / rejected steps).
    """

    nfe: Array
    ts: Array
    trajectory: Array | None = None
    stats: dict = dataclasses.field(default_factory=dict)


def _check_x(x1) -> None:
    if not hasattr(x1, "shape") or not hasattr(x1, "dtype"):
        raise TypeError(f"x1 must be an array [B, ...]; got {type(x1).__name__}")
    if x1.ndim < 1:
        raise ValueError(f"x1 must have a batch dimension, shape [B, ...]; got shape {x1.shape}")
    if not jnp.issubdtype(x1.dtype, jnp.floating):
        raise TypeError(f"x1 must be a floating-point array; got dtype {x1.dtype}")


# (solver, option) -> (valid(value), what is expected): options whose bad values would otherwise
# give silently wrong samples (unipc order 4 ran as first order, ddim eta > 1 the wrong marginal)
# or a wrong NFE (pc with negative corrector steps).
_ETA_CHECK = (lambda v: (f := concrete_real(v)) is not None and 0.0 <= f <= 1.0, "a float in [0, 1]")


def _real(low: float, high: float = np.inf, low_open: bool = False, what: str = "", finite: bool = False):
    """A check for a real option in ``[low, high]`` (``(low, high]`` with ``low_open``; ``finite``:
    and not +-inf); traced values pass (they are checked by nobody, as any traced input)."""

    def ok(v):
        if isinstance(v, jax.core.Tracer):
            return True
        f = concrete_real(v)
        return (f is not None and (f > low if low_open else f >= low) and f <= high
                and (not finite or bool(np.isfinite(f))))

    return ok, what


_BROWNIAN_TOL = (lambda v: v is None or _real(0.0, low_open=True, finite=True)[0](v), "None or a float > 0")
# churn decides in Python whether the EDM step draws noise, so (as eta) it must be concrete
_CHURN_CHECK = (lambda v: (f := concrete_real(v)) is not None and f >= 0.0, "a float >= 0")
_OPTION_CHECKS = {
    ("unipc", "order"): (lambda v: is_int(v, 1, 3), "an int in 1..3"),
    ("deis", "order"): (lambda v: is_int(v, 1), "an int >= 1"),
    ("ddim", "eta"): _ETA_CHECK,
    ("ddpm", "eta"): _ETA_CHECK,
    ("pc", "corrector_steps"): (lambda v: is_int(v, 0), "an int >= 0"),
    ("pc", "snr"): _real(0.0, what="a float >= 0", finite=True),  # (inf: NaN samples)
    ("restart", "restart_times"): (lambda v: is_int(v, 1), "an int >= 1"),
    ("restart", "restart_steps"): (lambda v: is_int(v, 1), "an int >= 1"),
    ("dpm++2m_hb", "beta"): _real(0.0, 1.0, low_open=True, what="a float in (0, 1] (1: no momentum)"),
    ("euler_maruyama", "brownian_tol"): _BROWNIAN_TOL,  # 0 gave NaN samples, < 0 never returned
    ("shark", "brownian_tol"): _BROWNIAN_TOL,
    # (edm_heun takes the same options: churn=-1 was accepted there and silently never churned)
    # (s_noise = inf gave NaN samples; s_tmax = inf is edm_heun's default: no upper bound)
    **{(s, k): _real(0.0, what="a float >= 0", finite=k != "s_tmax") for s in ("edm_heun", "edm_heun_churn")
       for k in ("s_tmin", "s_tmax", "s_noise")},
    **{(s, "churn"): _CHURN_CHECK for s in ("edm_heun", "edm_heun_churn")},
    # (0: ZeroDivisionError; inf: NaN samples)
    ("restart", "rho"): _real(0.0, low_open=True, what="a float > 0", finite=True),
    # (a string failed with "Only integer scalar arrays can be converted to a scalar index", NaN gave NaN samples)
    **{(s, "d2_weight"): _real(0.0, what="a finite float >= 0 (2: third order, 1: the reference code)", finite=True)
       for s in ("dpm++3m", "dpm++3m_ref")},
    ("restart", "restart_interval"): (
        lambda v: (isinstance(v, (tuple, list)) or getattr(v, "shape", None) == (2,)) and len(v) == 2
        and all(concrete_real(e) is not None for e in v) and 0.0 < float(v[0]) < float(v[1]),
        "a pair (lo, hi) of noise levels with 0 < lo < hi"),
}


def check_solver_options(spec, solver: str, options: dict) -> dict:
    """``options`` of solver ``spec`` (asked for as ``solver``): unknown names and bad values
    refused, NumPy integers as Python ints."""
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for solver {solver!r}; it accepts {list(spec.options)}")
    checked_as = _checked_as(spec)
    if checked_as not in _registry._BUILTIN:  # (a user's own solver: only what its spec declares)
        return _user_options(spec, options)
    return _check_options(spec.name, options, checked_as)


def _user_options(spec, options: dict) -> dict:
    """A registered solver's ``options``: those in ``spec.traced_options`` as 0-d float arrays, the
    others static (NumPy and concrete 0-d JAX scalars as Python scalars: they would be traced, e.g.
    a value from an ``np.linspace`` sweep). genflow's own rules by option name (``rho``, ``snr`` and
    the like traced, ``eta`` / ``churn`` made Python floats) are not applied to it: a user solver
    whose ``rho`` decided a Python branch failed with an anonymous TracerBoolConversionError, and
    one whose option was named otherwise recompiled per value."""
    out = {}
    for name, value in options.items():
        if name not in spec.traced_options:
            scalar = isinstance(value, (np.ndarray, np.generic, jax.Array)) and jnp.ndim(value) == 0 \
                and not jax.dtypes.issubdtype(value.dtype, jax.dtypes.extended)  # (a typed PRNG key has no item())
            if scalar and not _is_traced(value):  # (a traced one passes as it is: _run_solver)
                value = value.item()
        elif not isinstance(value, jax.Array):
            if concrete_real(value) is None:
                raise ValueError(f"solver {spec.name!r}: option {name} is traced (spec.traced_options) and must be a "
                                 f"real number; got {value!r}")
            value = jnp.asarray(value, dtype=float)
        out[name] = value
    return out


def _checked_as(spec) -> str:
    """The name whose option checks hold for ``spec``: a built-in's own, or that of the built-in
    whose ``run`` it shares (a variant registered as ``dataclasses.replace(spec, name=...)`` took
    ``unipc``'s ``order=4`` and ran first order, and ``dpm++3m``'s ``d2_weight=nan``)."""
    if not _BUILTIN_RUNS:  # (built-ins cannot be replaced: filled once, by identity of their run)
        _BUILTIN_RUNS.update({id(_registry.SOLVERS[name].run): name for name in _registry._BUILTIN})
    return _BUILTIN_RUNS.get(id(spec.run), spec.name)


_BUILTIN_RUNS: dict[int, str] = {}


# Real options that enter the solvers' arithmetic only: passed to the compiled sampler as arrays
# (traced), so a sweep over their values compiles once, like guidance scales. (The
# _WHY_STATIC ones below decide Python branches or the program's length and must be concrete: a
# traced one is refused by name; brownian_tol sizes Diffrax's Brownian tree and may be either.)
TRACED_OPTIONS = frozenset({"beta", "d2_weight", "s_tmin", "s_tmax", "s_noise", "snr", "rho"})
# Built-in options that must be concrete: they fix the structure of the compiled sampler.
_WHY_STATIC = {
    "eta": "it chooses between the deterministic and the stochastic step when the sampler is built",
    "churn": "it chooses between the deterministic and the stochastic step when the sampler is built",
    "order": "it chooses the solver's update formula when the sampler is built",
    "corrector_steps": "it sets the number of model evaluations per step",
    "restart_times": "it sets the number of model evaluations",
    "restart_steps": "it sets the number of model evaluations",
    "restart_interval": "it sets where the restarts go on the grid when the sampler is built",
}


def _is_traced(value) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(value))


def _check_options(solver: str, options: dict, checked_as: str | None = None) -> dict:
    """``options`` checked (a traced value of a :data:`_WHY_STATIC` option refused by name), with
    NumPy integers as Python ints (a NumPy scalar would be traced),
    a concrete NumPy / JAX ``eta`` / ``churn`` as a Python float (the DDIM/DDPM steps branch on
    ``eta == 0``) and the :data:`TRACED_OPTIONS` as arrays (new values do not recompile)."""
    out = {}
    for name, value in options.items():
        check = _OPTION_CHECKS.get((checked_as or solver, name))
        if check is not None and name in _WHY_STATIC and _is_traced(value):
            kind = "float" if name in ("eta", "churn") else "value"
            raise TypeError(f"solver {solver!r}: option {name} must be a concrete Python {kind} ({_WHY_STATIC[name]}); "
                            f"got a traced value: close over it (or mark it static) instead of passing it as a jit "
                            f"argument")
        if check is not None and not check[0](value):
            raise ValueError(f"solver {solver!r}: option {name} must be {check[1]}; got {value!r}")
        if isinstance(value, np.integer):
            value = int(value)
        elif name in ("eta", "churn") and not _is_traced(value):  # (a user solver's traced eta passes as is)
            # (not None: the check above passed). np.float64 is a float subclass, but jit traces
            # it like an array: `if churn > 0` / `eta == 0` then failed on a tracer
            value = concrete_real(value)
        elif name in TRACED_OPTIONS and not isinstance(value, jax.Array):
            value = jnp.asarray(value, dtype=float)  # (a Python float is static under jit: one compile per value)
        out[name] = value
    lo, hi = (concrete_real(options.get(k)) for k in ("s_tmin", "s_tmax"))
    if lo is not None and hi is not None and lo > hi:  # (churn then silently never happened)
        raise ValueError(f"solver {solver!r}: options s_tmin and s_tmax bound the noise levels that churn; "
                         f"s_tmin={options['s_tmin']!r} > s_tmax={options['s_tmax']!r} churns none")
    return out


def _check_brownian_tol(ts: Array, tol) -> None:
    """A Brownian tree coarser than the grid's smallest step interpolates the Brownian path inside
    its leaves: the increments lose variance and the samples have the wrong law (Diffrax: ``tol``
    "must be smaller than the time step")."""
    tol = concrete_real(tol)
    if tol is None:
        return
    try:
        tn = np.asarray(ts)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return
    step = float(np.min(tn[:-1] - tn[1:]))
    if tol > step:
        raise ValueError(f"brownian_tol={tol} is larger than the smallest step of the time grid ({step:.3g}): "
                         f"the Brownian tree would interpolate inside its leaves and the samples would have the "
                         f"wrong law; pass brownian_tol <= {step:.3g} (e.g. half the smallest step)")


def _evaluates_at_end(spec) -> bool:
    """Whether ``spec`` evaluates the model at the end of a step: its ``evaluates_at_end`` (set on
    the built-in heun / tsit5 / dopri5 / dopri8 and, from the tableau, by :func:`diffrax_solver`),
    or a Diffrax Runge-Kutta solver whose tableau has a stage at ``c = 1`` or an FSAL last stage in
    a spec that says otherwise (a registered ``diffrax.Heun()`` / ``Bosh3()`` / ``Tsit5()`` gave inf
    / NaN samples silently where the built-in ones are refused)."""
    if spec.evaluates_at_end:
        return True
    run = spec.run
    return (isinstance(run, functools.partial) and run.func is _diffrax.ode_solve
            and _registry._tableau_evaluates_at_end(run.keywords.get("solver")))


def _check_start(path: Path, ts: Array, prediction: str, spec) -> None:
    """:func:`_check_start_concrete`; a path with traced parameters (``jax.grad`` in a path's
    hyper-parameter) passes unchecked, as in :func:`check_clean_runs` (it failed with an unnamed
    ConcretizationTypeError)."""
    try:
        _check_start_concrete(path, ts, prediction, spec)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return


def _check_start_concrete(path: Path, ts: Array, prediction: str, spec) -> None:
    """Refuse a start where the needed conversion is 0/0 (alpha(t_start) = 0, e.g. t=1 on the
    linear path): eps/score -> x0 and the reverse-SDE drift f = alpha'/alpha are singular; velocity
    -> x0 where also alpha'(t_start) = 0; and an
    end where an x0 model's velocity is 0/0 (sigma(t_end) = 0) for a solver that evaluates there."""
    tn = np.asarray(ts)  # on the host: indexing a device array compiles per grid length
    t0, t1 = tn[0], tn[-1]
    a0 = float(path.alpha(jnp.asarray(t0)))
    if a0 < 0.0:  # (-4.4e-8 from a float32 cos(pi / 2): 0/0 conversions ran on garbage x0, without an error)
        raise ValueError(
            f"t_start={float(t0)} has alpha={a0:.3g} < 0 on path {path.name!r}: a rounding of alpha = 0? Write the "
            f"path so that alpha is exactly 0 there (as genflow.paths.vp_cosine does), or start earlier")
    uses_drift = spec.target == "sde" or _checked_as(spec) == "pc"  # (a registered copy of pc: NaN samples)
    if a0 == 0.0 and (uses_drift or prediction in ("eps", "score")):
        why = "the reverse-SDE drift alpha'/alpha" if uses_drift else f"the {prediction} -> x0 conversion"
        raise ValueError(
            f"t_start={float(t0)} has alpha=0 on path {path.name!r}, where {why} is singular; "
            f"start slightly earlier (e.g. t_start=0.999, drawing x1 from the marginal there)"
        )
    if prediction == "velocity" and (uses_drift or _is_scan(spec)):
        tj = jnp.asarray(t0)
        det = a0 * float(path.d_sigma(tj)) - float(path.sigma(tj)) * float(path.d_alpha(tj))
        if det == 0.0:  # alpha = alpha' = 0 (e.g. alpha = cos(pi t / 2)^2 at t = 1): NaN samples
            raise ValueError(
                f"t_start={float(t0)} has alpha sigma' - sigma alpha' = 0 on path {path.name!r}, where solver "
                f"{spec.name!r}'s velocity -> x0 conversion divides by it (0/0); start slightly earlier (e.g. "
                f"t_start=0.999, drawing x1 from the marginal there) or use an ODE solver that integrates the "
                f"velocity itself (euler, heun, midpoint, tsit5, ...)"
            )
    if prediction == "x0" and _evaluates_at_end(spec) and float(path.sigma(jnp.asarray(t1))) == 0.0:
        raise ValueError(
            f"t_end={float(t1)} has sigma=0 on path {path.name!r}: solver {spec.name!r} evaluates the "
            f"velocity of the x0 model there, (x - alpha x0_hat) / sigma = 0/0; pass t_end > 0 (e.g. 1e-3) "
            f"or a solver that does not evaluate at the end (euler, midpoint, ddim, dpm++2m, unipc, ...)"
        )
    if spec.target == "sde" and _checked_as(spec) != "euler_maruyama":
        g2 = float(path.diffusion_sq(jnp.asarray(t1)))
        if not np.isfinite(g2):  # (ShARK evaluates it at the end: NaN samples, where heun is refused)
            raise ValueError(
                f"t_end={float(t1)} has g^2 = diffusion_sq = {g2} on path {path.name!r} (sigma = 0 with sigma' = inf "
                f"there?): solver {spec.name!r} evaluates the reverse SDE at the end of its steps; "
                f"{param.singular_t_min_advice(path, t1, 't_end')}, give the path a diffusion_sq_fn with its finite "
                f"limit, or use 'euler_maruyama'")
    why = param.singular_velocity(path, t1, prediction) if _evaluates_at_end(spec) else None
    if why is not None:  # (vp_linear at t = 0: NaN samples)
        raise ValueError(
            f"t_end={float(t1)} has {why}: solver {spec.name!r} evaluates it there; "
            f"{param.singular_t_min_advice(path, t1, 't_end')}"
            f", or use a solver that does not evaluate at the end (euler, midpoint, ddim, dpm++2m, unipc, ...)"
        )


def _is_scan(spec) -> bool:
    """Whether ``spec`` runs on genflow's scan driver (precomputed grid scalars, padded grid and a
    traced step count), not only declares a ``stepper``: a registered ``run`` of the user's own is
    called with the grid as is."""
    run = spec.run
    return spec.stepper is not None and isinstance(run, functools.partial) and run.func is _driver.run


def _reuses_last_evaluation(spec) -> bool:
    """Whether ``spec`` is an adaptive Diffrax ODE solve (built-in or :func:`diffrax_solver`) whose
    solver is first-same-as-last, so that it ends holding the velocity at its end point
    (:func:`genflow.sampling._diffrax.reuses_last_evaluation`): the denoising step then costs no
    evaluation."""
    return _ends_only(spec) and _diffrax.reuses_last_evaluation(spec.run.keywords.get("solver"))


def _ends_only(spec) -> bool:
    """Whether ``spec.run`` reads only the first and last time of the grid when it saves no
    trajectory: the adaptive Diffrax ODE solves (built-in or :func:`diffrax_solver`)."""
    run = spec.run
    return spec.adaptive and isinstance(run, functools.partial) and run.func is _diffrax.ode_solve


def _traces_steps(spec) -> bool:
    """Whether ``spec.run`` takes a grid padded to its bucket and a traced ``num_steps``: genflow's
    scan solvers and fixed-step Diffrax ODE solves (built-in or :func:`diffrax_solver`). A user's
    own ``run`` (``register``'s documented signature) gets the ``steps + 1`` times and no
    ``num_steps``: stepping the padding's repeated times gave NaN (h / h_prev = 0/0) and
    ``bucket`` evaluations per call."""
    run = spec.run
    return _is_scan(spec) or (not spec.adaptive and isinstance(run, functools.partial)
                              and run.func is _diffrax.ode_solve)


def sample(
    fn: Callable[[Array, Array], Array],
    path: Path,
    x1: Array,
    *,
    prediction: str,
    solver: str = "heun",
    steps: int = 50,
    key: Array | None = None,
    schedule: Any = "uniform",
    t_start: float | None = None,
    t_end: float | None = None,
    denoise: bool | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 16_384,
    save_trajectory: bool = False,
    **solver_options,
) -> tuple[Array, SampleInfo]:
    """Integrate from noise at ``t_start`` to data at ``t_end`` with one compiled program.

    The time grid and the solver's grid coefficients are built on the host and kept for repeat
    calls with equal arguments (path, steps, schedule name or grid values, ends, solver and
    options), so a loop over batches pays for them once. Under ``jax.jit`` (or ``jax.vmap`` over the
    path's hyper-parameters) the ``"logsnr"`` and ``"karras"`` schedules need a concrete path
    (closed over, not an argument of the jitted function; else a ``ConcretizationTypeError`` says
    so); its grid is then a constant. A grid array built outside works with a traced path.

    Blocking and compile cache: ``gf.sample`` (like :func:`genflow.log_prob` and
    :func:`genflow.inverse.posterior_sample`) returns after the device has finished, so that its
    runtime checks (``max_steps``, guidance label range) can raise; it does not return a pending
    result. A plain function (lambda, closure) as ``fn`` is keyed by identity, and its compiled
    program stays in JAX's compile cache after the function is gone (bounded by JAX's LRU cache;
    ``jax.clear_caches()`` frees it): in a loop, reuse one function, or pass a
    ``functools.partial`` / :func:`genflow.nets.model_fn` over the parameters, which shares one
    program across parameter sets.

    Args:
      fn: model ``fn(x: [B, ...], t: [B]) -> [B, ...]`` of kind ``prediction``: a
        :func:`functools.partial` / :class:`jax.tree_util.Partial` (e.g. from
        :func:`genflow.nets.model_fn`) or a plain function such as
        ``lambda x, t: net.apply(params, x, t)``. The arrays (JAX, or NumPy floating ones) a
        function uses through its closure, defaults or module globals are traced and read at
        every call (:func:`genflow.param.as_pytree_fn`): the compiled sampler keeps no copy of
        them, and new values are seen. A partial shares one program across parameter sets; a plain
        function is keyed by identity, as by ``jax.jit`` (a new lambda per call compiles anew).
        Other callables (an object with
        ``__call__`` that is no pytree) are static arguments, kept by identity: the arrays they
        hold are constants of the compiled program, and rebinding them is not seen by later calls.
      path: the Gaussian path the model was trained with.
      x1: ``[B, ...]`` starting state at ``t_start`` (for a Gaussian path
        ``path.prior_sample(key, shape)``). The solver state is kept in at least float32; the
        samples are returned in ``x1.dtype``. A batch sharded over a device mesh (Auto or
        Explicit axes) is sampled where it lies and the samples come back sharded as ``x1``. A
        runtime check that fires there (an adaptive solve reaching ``max_steps``, classifier
        guidance's label range) raises its error; under your own ``jax.jit`` it can only do so
        on Explicit axes: with Auto axes the check runs on one device and a firing one hangs the
        others until XLA aborts the process. Inside your own :func:`jax.shard_map` the dedicated
        solvers run as they are; Diffrax's adaptive and SDE solvers (``tsit5``, ``dopri5``,
        ``euler_maruyama``, ``shark``) need ``check_vma=False`` (Diffrax's loops fail its
        manual-axis type checks), and a ``key`` is used as given on every shard: fold in
        ``jax.lax.axis_index`` for independent noise per shard.
      prediction: ``"eps" | "x0" | "v" | "score" | "velocity"``.
      solver: a name from :func:`genflow.sampling.solvers`.
      steps: number of steps of fixed-step solvers (ignored by adaptive ones). Called eagerly
        without a saved trajectory, the dedicated solvers and Diffrax's fixed-step ODE solvers
        trace the step count: one compiled program serves every count up to its padding bucket
        (64, 128, ...); under a transformation it is static (see below).
        The adaptive solvers compile once for every step count (without a saved trajectory, they
        read only the grid's ends); the reverse-SDE solvers (``euler_maruyama``, ``shark``) once
        per grid length.
      key: PRNG key, required by stochastic solvers.
      schedule: time discretization: a name (see :func:`genflow.sampling.time_grid`), an array of
        times ``[steps + 1]`` (e.g. from :func:`genflow.sampling.optimize_schedule`; then ``steps``
        is its length - 1 and changing its values does not recompile), or a callable
        ``(path, steps, t_start=, t_end=) -> times``. The default ``"uniform"`` is the flow-matching
        convention; for the multistep / exponential-integrator solvers at 10-50 NFE pass
        ``"karras"`` or ``"logsnr"`` (on the 64-d mixture of ``experiments/benchmarks/samplers.py``
        DPM++ 2M at 20 NFE: 2.8e-1 uniform, 1.2e-1 logsnr, 5.1e-2 karras relative error).
        ``edm_heun`` / ``restart`` step in ``sigma / alpha``: on a VP path from ``t = 1`` their
        first uniform step spans a noise level of ~1800 down to ~6 (vp_cosine, 10 steps: relative
        error 3.5 where heun's is 2.6e-3), so give them ``"karras"``. A grid with two consecutive
        times at ``sigma = 0`` (or ``alpha = 0``) in its float width is refused (a step from clean
        data to clean data: NaN for most solvers with an x0 model); it arises where sigma
        underflows, e.g. ``edm(sigma_min=0)`` with a 1,000-step quadratic grid in float32.
      t_start, t_end: integration interval (default 1 and ``path.t_min``; with an explicit
        schedule, its first and last times: given ones must agree with them).
      denoise: finish with one Tweedie step ``x0_hat(x, t_end)`` (one more NFE, except as below); defaults to
        ``path.denoise_at_end`` for a grid that ends at the path's end (``t_end <= path.t_min +
        1e-6``) or is traced, and to False for a partial solve that ends above it (its result is the
        state at ``t_end``). The multistep solvers, EDM Heun and Restart take it as the last
        iteration of their loop where ``sigma(t_end) > 0`` (no second copy of the network in the
        compiled program); the adaptive first-same-as-last solvers (tsit5, dopri5, dopri8, and
        those registered with ``diffrax_solver``, e.g. ``Bosh3``) take it from the velocity that
        their last step evaluated at ``(x, t_end)``, converted to ``x0_hat`` (equal up to a few
        ulp): no extra NFE, and no extra copy, where that conversion does not cancel (``sigma > 0``
        and ``alpha'``, ``sigma'`` not nearly cancelling at ``t_end``; every built-in path).
      rtol, atol: tolerances of adaptive solvers, held by every sample of the batch (the error
        norm is the largest per-sample RMS; with a bfloat16 model use ~1e-2: tolerances below
        the model's own resolution make the step-size controller reject steps, e.g. 10,805
        NFE for dopri8 at the default 1e-5).
      max_steps: cap on the number of steps of adaptive solvers.
      save_trajectory: also return the states on the grid in ``info.trajectory``.
      **solver_options: passed to the solver function. Its real-valued ones that enter only the
        arithmetic (``beta``, ``d2_weight``, ``s_tmin``, ``s_tmax``, ``s_noise``, ``snr``, ``rho``)
        are traced: a new value reuses the compiled sampler. ``eta``, ``churn``,
        ``restart_interval``, ``brownian_tol`` and integer options are static.
    Returns:
      ``(x0, info)``: ``x0: [B, ...]`` samples and a :class:`SampleInfo`.

    Differentiation and other transformations: under ``jax.grad`` / ``jax.vjp`` / ``jax.jvp``,
    ``jax.jit`` or ``jax.vmap`` (gf.sample itself, or a function that calls it), the steps of the
    fixed-step solvers run in a ``lax.scan`` of static length, so both reverse and forward mode work
    with respect to ``x1`` and to model parameters, whether ``fn`` holds them or closes over them.
    Called eagerly, they trace the step count instead, so one compiled sampler serves every step
    count of a padding bucket. Exceptions:

    * the adaptive solvers (``tsit5``, ``dopri5``, ``dopri8``) differentiate in reverse mode only
      (Diffrax's checkpointed adjoint; ``jax.jvp`` fails with "can't apply forward-mode autodiff
      (jvp) to a custom_vjp function");
    * the Diffrax SDE solvers (``euler_maruyama``, ``shark``) differentiate in reverse mode only
      with ``brownian_tol`` set (without it ``jax.grad`` fails with JAX's "Reverse-mode
      differentiation does not work for lax.while_loop": Diffrax refuses reverse mode through its
      default fixed-grid Brownian path), and ``shark`` with ``brownian_tol`` in reverse mode only.

    The stochastic scan solvers (``ddpm``, ``ddim`` with ``eta``, ``edm_heun_churn``, ``restart``,
    ``pc``) differentiate both ways, for a fixed key. With respect to the times of an explicit
    ``schedule`` (a grid learnt by gradient): the scan solvers and Diffrax's ODE solvers; an end
    where ``alpha`` or ``sigma`` is 0 has no derivative (its coefficients are taken as constants),
    and the Diffrax SDE solvers refuse it ("t0 cannot be autodifferentiated").
    """
    param.check_kind(prediction)
    spec = _registry.get(solver)
    _check_x(x1)
    # (rtol < 0 or atol < 0 were accepted, max_steps < 1 failed inside Diffrax, denoise="no" was
    # truthy; a traced tolerance failed as an unnamed ConcretizationTypeError at float(rtol) below)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, jax.core.Tracer):
            raise ValueError(f"{name} must be a concrete real >= 0 (it is checked before the solve); got a "
                             f"traced value")
        if not _real(0.0, finite=True)[0](value):  # (inf was accepted: every step passed the controller)
            raise ValueError(f"{name} must be a finite real >= 0; got {value!r}")
    if spec.adaptive and float(concrete_real(rtol)) == 0.0 and float(concrete_real(atol)) == 0.0:
        # (the controller then rejects every step: max_steps attempts, then "Try increasing max_steps")
        raise ValueError(f"rtol and atol are both 0: solver {solver!r} could never accept a step; pass rtol > 0 "
                         f"or atol > 0")
    max_steps = check_int("max_steps", max_steps)
    check_denoise(denoise)
    check_path(path)
    solver_options = check_solver_options(spec, solver, solver_options)
    if spec.stochastic and key is None:
        raise ValueError(f"solver {solver!r} is stochastic: pass key=jax.random.key(...)")
    if key is not None:  # (checked whenever given: ddim with eta > 0 and edm_heun with churn > 0 draw noise too)
        check_key(key)
    if spec.adaptive:  # (a NaN row made the step-size controller reject steps until max_steps, and say only that)
        check_finite_rows("x1", x1)
    # a model that wraps another (gf.inverse.posterior_model: x0 from an eps model) is singular
    # where the wrapped one is, and where the kind it is sampled as is (heun's x0 at sigma = 0)
    inner = getattr(fn, "model", None)
    kinds = tuple(dict.fromkeys([prediction] + ([inner.prediction] if isinstance(inner, Model) else [])))
    # (under a user's grad / jit / vmap the step count stays static: a traced one is a fori_loop of
    # dynamic length, which reverse mode cannot differentiate, and a user's own jit gains nothing
    # from sharing gf.sample's compiled program across step counts)
    pad = not save_trajectory and not _under_transformation()
    ts, ts_run, grid_options, foldable = _prepare(path, steps, schedule, t_start, t_end, spec, kinds, solver_options,
                                                  pad)
    solver_options = {**solver_options, **grid_options}
    if denoise is None:
        denoise = default_denoise(path, ts, t_end)
    if not spec.adaptive:
        # fixed-grid Diffrax solves take one step per interval (an adaptive solve's cap is
        # max_steps itself, whatever `steps`); tolerances are unused (a new value recompiled)
        max_steps = max(max_steps, int(ts.shape[0]))
        rtol = atol = 0.0
    else:  # traced: a sweep over tolerances compiled the solve once per value (~4 s each on a CPU)
        # (in the solver state's dtype: a float64 tolerance promoted a float32 state's controller under x64)
        rtol, atol = (jnp.asarray(v, jnp.promote_types(x1.dtype, jnp.float32)) for v in (rtol, atol))
    model = Model(as_pytree_fn(check_model_fn(fn)), _run_path(path), prediction)
    x, info = _sample_jit(model, ts_run, x1, key, spec, bool(denoise), rtol, atol, int(max_steps),
                          bool(save_trajectory), solver_options, bool(denoise) and foldable)
    return x, dataclasses.replace(info, ts=ts)


def _check_run_output(spec, out, x, ts, save_trajectory: bool) -> None:
    """A registered ``run``'s result, checked at trace time against :func:`register`'s contract
    (a state of another shape was returned silently, a bare state failed as "too many values to
    unpack")."""
    where = f"solver {spec.name!r}: run must return (x [B, ...], nfe, trajectory, stats)"
    if not isinstance(out, tuple) or len(out) != 4:
        raise TypeError(f"{where}; got {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, tuple) else ""))
    y, nfe, traj, _ = out
    if getattr(y, "shape", None) != x.shape:
        raise ValueError(f"{where}: x of the input's shape {x.shape}; got {getattr(y, 'shape', type(y).__name__)}")
    if not (isinstance(nfe, int) and not isinstance(nfe, bool)
            or getattr(nfe, "shape", None) == () and jnp.issubdtype(getattr(nfe, "dtype", float), jnp.integer)):
        raise TypeError(f"{where}: nfe an int (or an integer scalar array); got {nfe!r}")
    if save_trajectory and getattr(traj, "shape", None) != (ts.shape[0],) + x.shape:
        raise ValueError(f"{where}: with save_trajectory, the states at ts [{ts.shape[0]}, *{x.shape}]; got "
                         f"{getattr(traj, 'shape', traj)!r}")


def _run_path(path: Path) -> Path:
    """``path`` with its Python / NumPy float hyper-parameters as kept 0-d arrays
    (:func:`genflow._memo.kept_scalar`: as its own flatten would make them, weakly typed, in the x64
    mode of the moment, on the default device)."""
    if not any(isinstance(v, (float, np.floating)) for v in path.params.values()):
        return path
    return dataclasses.replace(path, params={k: _memo.kept_scalar(v) if isinstance(v, (float, np.floating)) else v
                                             for k, v in path.params.items()})


def _under_transformation() -> bool:
    """Whether the caller runs under a JAX transformation (grad, jit, vmap, ...). JAX has no public
    query for this; the private one is guarded, and without it the answer is False (the step
    count is then traced as before, which only reverse mode minds)."""
    try:
        from jax._src import core as _jax_core

        return not _jax_core.trace_state_clean()
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without it
        return False


def _prepare_uncached(path, steps, schedule, t_start, t_end, spec, kinds, solver_options, pad):
    """``(ts, ts_run, grid_options, foldable)``: the checked time grid, the grid the compiled sampler
    steps on (with ``pad``, padded to its bucket for the solvers that trace the step count), the
    options that the grid determines (the scan solvers' precomputed ``scalars``, a traced
    ``num_steps``) and whether the denoising step may run inside the solve: as the loop's last
    iteration (a scan solver with a ``denoise_row``, on a grid that ends at ``sigma > 0``:
    :func:`noisy_end`), or from the last evaluation of an adaptive first-same-as-last solve (where
    that velocity gives ``x0_hat`` without cancellation: :func:`velocity_determines_x0`)."""
    ts = sampler_grid(path, steps, schedule, t_start, t_end)
    _check_brownian_tol(ts, solver_options.get("brownian_tol"))
    for kind in kinds:
        _check_start(path, ts, kind, spec)
    grid_options = {}
    if _is_scan(spec):
        # grid-only coefficients: compiled once per (solver, path, options) for many step counts
        options = {**spec.run.keywords, **solver_options}
        options.pop("stepper")
        grid_options["scalars"] = _driver.grid_scalars(spec.stepper, path, ts, **options)
    ts_run = ts
    if pad and _traces_steps(spec):
        # scan solvers and Diffrax's fixed-step ODE solvers: the grid padded to its bucket and the
        # step count traced, so one compiled sampler serves every step count up to the bucket size
        n = ts.shape[0] - 1
        ts_run = _driver.pad_grid(ts, _driver.bucket(n))
        grid_options["num_steps"] = jnp.asarray(n, jnp.int32)
    elif pad and _ends_only(spec):
        # an adaptive ODE solve without a trajectory reads only the grid's ends: given the whole
        # grid it compiled once per step count it ignores (~10 MB of programs per value in a sweep)
        ts_run = jnp.asarray(np.asarray(ts)[[0, -1]])  # (on the host: an eager gather compiled per grid length)
    foldable = ((_is_scan(spec) and spec.stepper.denoise_row is not None and noisy_end(path, ts))
                or (_reuses_last_evaluation(spec) and velocity_determines_x0(path, ts)))
    return ts, ts_run, grid_options, foldable


# Prepared grids of recent gf.sample calls (genflow._memo: the memo and its key rules, shared with
# gf.inverse's samplers), keyed by everything they depend on.
_PREPARED = _memo.PREPARED
_PREPARED_SIZE = _memo.PREPARED_SIZE


def _prepare(path, steps, schedule, t_start, t_end, spec, kinds, solver_options, pad):
    """:func:`_prepare_uncached`, memoised (:func:`genflow._memo.memoised`) for named schedules and
    explicit grids with hashable arguments (traced option values or grids and callable schedules
    are prepared afresh, and nothing that holds a trace's arrays is kept). A kept entry whose
    arrays were deleted (e.g. a donated ``info.ts``) is prepared again."""
    key = _memo.value_key
    options = tuple((k, key(v)) for k, v in sorted(solver_options.items()))
    parts = (_memo.path_key(path), _memo.schedule_key(schedule), key(steps), key(t_start), key(t_end),
             options if all(k is not None for _, k in options) else None)
    return _memo.memoised("gf.sample", parts, (spec, kinds, bool(pad)),
                          lambda: _prepare_uncached(path, steps, schedule, t_start, t_end, spec, kinds,
                                                    solver_options, pad))


class _Dynamic:
    """The place of an array leaf in :func:`_leaf_jit`'s static key."""

    def __repr__(self):
        return "<array>"


_DYNAMIC = _Dynamic()


class _StaticOut:
    """The non-array part of a compiled function's output, carried in the output's tree structure
    (a registered solver's ``stats`` may hold Python values)."""

    def __init__(self, value):
        self.value = value


jax.tree_util.register_pytree_node(_StaticOut, lambda s: ((), s.value), lambda value, _: _StaticOut(value))


class _QuietCallbackFailure(logging.Filter):
    """Drops JAX's "jax.pure_callback failed" log of an ``eqx.error_if`` check that fired (as
    equinox.filter_jit does): the error is re-raised with its own message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "jax._src.callback" and record.getMessage() == "jax.pure_callback failed")


_QUIET = _QuietCallbackFailure()


def _call_mesh(batch, dynamic):
    """The mesh the runtime checks run on (:func:`genflow._memo.checked_twin`): the batch's, where it
    spans several devices; else, with several devices, the first found among all array leaves (a
    model on a mesh sampled from one-device noise); none on a one-device machine. (The batch
    first: each leaf looked at costs ~0.2 us.)"""
    if jax.device_count() == 1:
        return None
    mesh = _memo.spanning_mesh(jax.tree_util.tree_leaves(batch))
    return mesh if mesh is not None else _memo.spanning_mesh(dynamic)


def _leaf_jit(fun, batch_argnum: int = 2):
    """``fun`` compiled as :func:`equinox.filter_jit` does it -- array leaves of the arguments traced,
    every other leaf static (hashed), non-array outputs passed through, the call waited for, and a
    fired ``eqx.error_if`` (Diffrax's max_steps, a guidance label check) re-raised as equinox's
    readable error -- with less Python per call: one ``tree_flatten`` and a ``jax.jit`` keyed by
    the tree structure and the static leaves (equinox's partition and signature binding were
    ~0.07 ms of a ~0.6 ms 20-step ``gf.sample`` call). Argument ``batch_argnum`` is the batch,
    whose mesh, where it spans several devices, the runtime checks run on
    (:func:`genflow._memo.checked_twin`)."""

    def run(dynamic, treedef, static):
        it = iter(dynamic)
        leaves = [next(it) if leaf is _DYNAMIC else leaf for leaf in static]
        arrays, other = eqx.partition(fun(*jax.tree_util.tree_unflatten(treedef, leaves)), eqx.is_array)
        return arrays, _StaticOut(other)

    run.__name__ = run.__qualname__ = fun.__name__  # (the name in compile logs and profiles)
    # (with a twin for jax_debug_nans / debug_infs switched on after a first call: JAX's dispatch
    # cache kept running the unchecked program, NaN samples without the error asked for)
    run = _memo.checked_twin(run, functools.partial(jax.jit, static_argnums=(1, 2)))
    slow = _memo.filter_jit(fun)  # (only to raise a fired check's error with its message)
    logger = logging.getLogger("jax._src.callback")

    @functools.wraps(fun)
    def call(*args):
        leaves, treedef = jax.tree_util.tree_flatten(args)
        dynamic = [leaf for leaf in leaves if eqx.is_array(leaf)]
        static = tuple(_DYNAMIC if eqx.is_array(leaf) else leaf for leaf in leaves)
        logger.addFilter(_QUIET)
        try:
            arrays, other = run(dynamic, treedef, static, mesh=_call_mesh(args[batch_argnum], dynamic))
            # (a fired check raises here, as under equinox.filter_jit; under an eager jax.vmap too,
            # whose tracer carries the program's output)
            first = _memo.concrete_of(next(iter(jax.tree_util.tree_leaves(arrays)), None))
            if isinstance(first, jax.Array) and not isinstance(first, jax.core.Tracer):
                first.block_until_ready()
        except jax.errors.JaxRuntimeError as e:
            _memo.drop_failed_runtime_tokens()
            if "_EquinoxRuntimeError: " not in str(e):
                raise
            arrays = None
        finally:
            logger.removeFilter(_QUIET)
        if arrays is None:
            return slow(*args)  # (compiles once more, and raises equinox's EquinoxRuntimeError)
        return eqx.combine(arrays, other.value)

    return call


def _run_solver(spec, model, ts, x, key, **options):
    """``spec.run(...)``; a registered solver that needs a concrete value of an option that reached
    it traced (a jax.jit argument, or an array) is named with the option: a Python branch on it
    failed as an anonymous TracerBoolConversionError. (A traced value that its run does not
    branch on passes.)"""
    try:
        return spec.run(model, ts, x, key, **options)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
            jax.errors.TracerArrayConversionError) as e:
        traced = [n for n in spec.options if n in options and n not in spec.traced_options and _is_traced(options[n])]
        if not traced or _checked_as(spec) in _registry._BUILTIN:
            raise
        # ("may": the value it needed may be another one, e.g. the state; the original error follows)
        raise TypeError(f"solver {spec.name!r} needed a concrete value and option(s) {traced} reached it traced (a "
                        f"jax.jit argument, or an array): if it branches on them or sizes a loop with them, pass them "
                        f"as Python values (close over them, or mark them static in your jax.jit). "
                        f"{type(e).__name__}: {str(e).splitlines()[0]}") from e


@_leaf_jit
def _sample_jit(model, ts, x1, key, spec, denoise, rtol, atol, max_steps, save_trajectory, solver_options, fold):
    # (spec: static, hashed by its fields -- run and stepper by identity: a solver registered again
    # under its name with overwrite=True compiles anew instead of running the old spec's program)
    # The solver state is kept in at least float32 (a bfloat16 model still sees its own dtype
    # if it casts its input); samples come back in the dtype of x1.
    x = x1.astype(jnp.promote_types(x1.dtype, jnp.float32))
    # (fold: the denoising step as the loop's last iteration, one copy of the network, not two)
    out = _run_solver(spec, model, ts, x, key, rtol=rtol, atol=atol, max_steps=max_steps,
                      save_trajectory=save_trajectory, **solver_options, **({"denoise": True} if fold else {}))
    _check_run_output(spec, out, x, ts, save_trajectory)
    x, nfe, traj, stats = out
    nfe = jnp.asarray(nfe, jnp.int32)
    if denoise and not fold:
        x = model.predict(x, ts[-1], "x0")
        nfe = nfe + 1
    traj = None if traj is None else traj.astype(x1.dtype)  # (traj[-1] is x before the denoising step)
    return x.astype(x1.dtype), SampleInfo(nfe=nfe, ts=ts, trajectory=traj, stats=stats)
