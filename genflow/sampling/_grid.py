"""Time discretizations: decreasing grids ``t_0 = t_start > ... > t_N = t_end``.

Every solver takes any grid. Named schedules are placed in one of three coordinates:

* ``"uniform"``: uniform in t; ``"quadratic"``: uniform in ``sqrt(t)`` (denser near the data).
* ``"logsnr"``: uniform in the log-SNR ``lambda(t) = log(alpha^2 / sigma^2)`` (DPM-Solver's
  "logSNR" spacing, Lu et al. 2022).
* ``"karras"``: uniform in ``rho_t^(1/rho)`` with the noise level ``rho_t = sigma(t) / alpha(t)``
  (Karras et al. 2022, eq. 5; ``rho = 7``).

**Infinite log-SNR at an endpoint.** On paths that start from pure noise (``alpha(1) = 0``:
``linear``) or end at clean data (``sigma(0) = 0``: ``linear``, ``vp_cosine``) the log-SNR is
infinite there, so a schedule uniform in the log-SNR cannot reach the endpoint. As in EDM and
k-diffusion (``get_sigmas_karras(...)`` followed by ``append_zero``), the log-SNR / Karras
points then span the finite noise-level range ``[sigma_min, sigma_max]`` (defaults EDM's 0.002
and 80, in units of ``sigma / alpha``), and the infinite endpoint is appended as an extra grid
point: of the ``steps + 1`` points, those at infinite log-SNR are the endpoints themselves and
the rest lie in the finite range. The dedicated solvers take the steps out of ``alpha = 0`` and
into ``sigma = 0`` with their own exact limits (see ``genflow.sampling._exp``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from genflow import _memo
from genflow._checks import check_int, concrete_real, real_or_traced
from genflow.paths import Path, check_orientation
from genflow.sampling._driver import bucket

Array = jax.Array

SCHEDULES = ("uniform", "quadratic", "logsnr", "karras")

#: Noise-level range (``sigma / alpha``) used where the path's own is infinite (EDM's defaults).
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def _check_explicit(schedule, t_start=None, t_end=None, steps=None, what: str = "an explicit schedule") -> Array:
    """``schedule`` as a checked grid; given ends / step count must agree with it (an explicit
    grid fitted for another interval silently overrode ``t_start`` / ``t_end``)."""
    dt = getattr(schedule, "dtype", None)
    if dt is None:  # (jnp: a list may hold tracers or JAX scalars, which NumPy reads as objects)
        try:
            dt = jnp.asarray(schedule).dtype
        except (TypeError, ValueError):  # (strings: NumPy names their dtype)
            try:
                dt = np.asarray(schedule).dtype
            except (TypeError, ValueError):
                dt = np.dtype(object)
    if not (np.issubdtype(dt, np.floating) or np.issubdtype(dt, np.integer) or dt == jnp.bfloat16) \
            or np.issubdtype(dt, np.bool_):
        # (strings were parsed, a complex grid lost its imaginary part, a bool one ran as [1, 0])
        raise TypeError(f"{what} must hold real numbers (times in [0, 1]); got dtype {dt}")
    ts = jnp.asarray(schedule, jnp.result_type(float))
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"{what} must be a 1-D array of at least 2 times; got shape {ts.shape}")
    try:
        tn = np.asarray(ts)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return ts
    if not _decreasing_in_unit(tn):
        _check_rounding(schedule, tn, what)
        raise ValueError(f"{what} must be strictly decreasing within [0, 1]; got {tn}")
    for name, given, got in (("t_start", t_start, tn[0]), ("t_end", t_end, tn[-1])):
        v = real_or_traced(name, given, "a float in [0, 1] or None")
        if v is not None and abs(v - float(got)) > 1e-6:
            raise ValueError(f"{what} runs from {float(tn[0])} to {float(tn[-1])}, but {name}={given} was given: "
                             f"leave {name} out (None) or pass a grid that {'starts' if name == 't_start' else 'ends'} "
                             f"there")
    if steps is not None and tn.shape[0] != steps + 1:
        raise ValueError(f"{what} has {tn.shape[0]} times; expected steps + 1 = {steps + 1}")
    return ts


def _decreasing_in_unit(t: np.ndarray) -> bool:
    """Whether the grid ``t`` is strictly decreasing within [0, 1]."""
    return bool(np.all(np.diff(t) < 0) and t[0] <= 1.0 and t[-1] >= 0.0)


def _check_rounding(schedule, tn: np.ndarray, what: str) -> None:
    """A ``ValueError`` saying so where a strictly decreasing grid in [0, 1] of a wider float
    (float64 with x64 off) has neighbours that round to one time in ``tn.dtype`` (reported as
    "must be strictly decreasing", which the grid given was)."""
    try:
        wide = np.asarray(schedule, np.float64)
    except (TypeError, ValueError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if wide.shape != tn.shape or not _decreasing_in_unit(wide):
        return
    i = int(np.flatnonzero(np.diff(tn) >= 0)[0])
    raise ValueError(f"{what} is strictly decreasing, but its times {float(wide[i])!r} and {float(wide[i + 1])!r} "
                     f"round to one {tn.dtype} time, {float(tn[i])!r}: space them further apart (or enable float64 "
                     f"with jax.config.update('jax_enable_x64', True))")


def _check_ends(t_start, t_end) -> tuple[float, float]:
    """``(t_start, t_end)`` as Python floats (NumPy / 0-d JAX scalars accepted), checked."""
    s, e = real_or_traced("t_start", t_start, "a float in (0, 1]"), real_or_traced("t_end", t_end, "a float in [0, 1)")
    if s is None or e is None:
        raise ValueError(f"t_start and t_end of a named schedule must be concrete real scalars (the grid is built "
                         f"outside jit; pass an explicit array of times to trace them); got t_start={t_start!r}, "
                         f"t_end={t_end!r}")
    if not 0.0 <= e < s <= 1.0:
        raise ValueError(f"expected 0 <= t_end < t_start <= 1; got t_start={t_start}, t_end={t_end}")
    return s, e


def _infinite_ends(path: Path, t_start: float, t_end: float) -> tuple[bool, bool]:
    """Whether the log-SNR is infinite at ``t_start`` (``alpha = 0``: pure noise) and at ``t_end``
    (``sigma = 0``: clean data): a property of the path's functions, decided on concrete values
    (grids are built outside jit)."""
    fdt = np.dtype(jnp.result_type(float))
    a, s = path.alpha(jnp.asarray(t_start, fdt)), path.sigma(jnp.asarray(t_end, fdt))
    traced = next((v for v in (a, s) if isinstance(v, jax.core.Tracer)), None)
    if traced is not None:  # (was JAX's error alone, raised inside the path's alpha)
        raise jax.errors.ConcretizationTypeError(
            traced, f"a {path.name!r} path with traced hyper-parameters (under jax.jit / vmap over them) has no "
                    f"concrete log-SNR to place a named 'logsnr' / 'karras' grid by: close over the path, or build "
                    f"the grid outside the transformation (gf.sampling.time_grid) and pass it as the schedule")
    return float(a) == 0.0, float(s) == 0.0


def time_grid(path: Path, steps: int, schedule: Any = "uniform", t_start: float | None = None,
              t_end: float | None = None,
              rho: float = 7.0, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> Array:
    """A decreasing grid of ``steps + 1`` times from ``t_start`` to ``t_end``.

    Args:
      path: the path (for log-SNR-based schedules and its default ``t_min``).
      steps: number of intervals (static).
      schedule: ``"uniform"`` (uniform in t), ``"quadratic"`` (uniform in sqrt(t): denser near
        data), ``"logsnr"`` (uniform in the log-SNR), ``"karras"`` (uniform in
        ``(sigma/alpha)^(1/rho)``, Karras et al. 2022), an explicit array of times (then
        ``steps`` is ignored, its length - 1 is the step count, and ``t_start`` and ``t_end`` are
        taken from it: given ones must agree with it), or
        a callable ``schedule(path, steps, t_start=..., t_end=...) -> ts`` (e.g.
        ``functools.partial(time_grid, schedule="karras", rho=5.0)``), whose grid must have
        ``steps + 1`` times from ``t_start`` to ``t_end``.
      t_start, t_end: the endpoints (default 1 and ``path.t_min``).
      rho: exponent of the Karras schedule.
      sigma_min, sigma_max: noise-level range (``sigma / alpha``) of the ``"logsnr"`` and
        ``"karras"`` points where the path's log-SNR is infinite at ``t_end`` / ``t_start``
        (ignored at a finite endpoint). From pure noise (``alpha(t_start) = 0``) the first step
        jumps from infinite noise to ``sigma_max`` whatever ``steps`` is. Taken as a plain DDIM
        step it errs by ``O(Var[x0] / sigma_max)``, which more steps would not remove; the
        multistep solvers (DDIM, DPM-Solver++, DEIS, UniPC) correct it with the second step's
        evaluation (trapezoidal rule in ``alpha / sigma``, no extra NFE), the single-step ones
        place their stages in ``alpha / sigma``. Few-step grids spend two of their steps on the
        infinite endpoints; start at ``sigma_max`` (``t_start = sigma_max / (1 + sigma_max)`` on
        the linear path) to spend them all in the finite range, or pick ``sigma_max`` (with
        ``rho`` and ``sigma_min``) for the model with :func:`karras_family` and
        ``select_schedule``: at 10 steps from pure noise that is worth several times in error.
    Returns:
      ``[steps + 1]`` times (float32; float64 under ``jax.enable_x64``), ``ts[0] = t_start``, ``ts[-1] = t_end``.
    Raises:
      TypeError: an explicit schedule whose values are not real numbers (strings, complex, bool).
      ValueError: a grid that is not strictly decreasing within [0, 1] (also when its times round
        to the same float: the message says which end of a named schedule crowds, or which times of
        an explicit float64 grid round together), or ends that disagree with it.
    """
    if not isinstance(schedule, str) and not callable(schedule) or hasattr(schedule, "shape"):
        return _check_explicit(schedule, t_start, t_end)
    t_start = 1.0 if t_start is None else t_start
    t_end = path.t_min if t_end is None else t_end
    if callable(schedule) and not isinstance(schedule, str):
        return _check_explicit(schedule(path, steps, t_start=t_start, t_end=t_end), t_start, t_end, steps,
                               what="the callable schedule's grid")
    steps = check_int("steps", steps)
    t_start, t_end = _check_ends(t_start, t_end)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {list(SCHEDULES)}, an array of times "
                         f"or a callable (path, steps, t_start, t_end) -> times")
    fdt = np.dtype(jnp.result_type(float))
    start_inf = end_inf = False
    if schedule == "karras":
        r = concrete_real(rho)
        if r is None or not (np.isfinite(r) and r > 0):
            raise ValueError(f"rho must be a finite real > 0; got {rho!r}")
    if schedule in ("logsnr", "karras"):
        if not 0.0 < sigma_min < sigma_max < np.inf:  # (sigma_max=inf was blamed on float32 resolution)
            raise ValueError(f"expected 0 < sigma_min < sigma_max < inf; got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}")
        start_inf, end_inf = _infinite_ends(path, t_start, t_end)
    u = np.linspace(0.0, 1.0, steps + 1, dtype=fdt)
    if schedule in ("uniform", "quadratic"):
        if schedule == "uniform":
            ts = t_start + (t_end - t_start) * u
        else:
            a, b = np.sqrt(t_start), np.sqrt(t_end)
            ts = (a + (b - a) * u) ** 2
        ts[0], ts[-1] = t_start, t_end
        ts = ts.astype(fdt)
        if not np.all(np.diff(ts) < 0):  # (an interval too narrow for steps in this float width)
            raise ValueError(f"schedule {schedule!r} with steps={steps} repeats times on [t_end={t_end}, "
                             f"t_start={t_start}] in {fdt}: use fewer steps or a wider interval")
        return jax.device_put(ts)  # device_put: jnp.asarray compiles per shape
    n = steps + 1 - int(start_inf) - int(end_inf)
    if n <= 0:
        return jax.device_put(np.array([t_start, t_end], fdt))
    # the path is evaluated by one compiled program per padding bucket of the point count (not
    # per step count: every eager op would compile anew for each new length)
    u = np.linspace(0.0, 1.0, n, dtype=fdt) if n > 1 else np.array([0.5], fdt)
    u = np.concatenate([u, np.full(bucket(n) - n, u[-1], fdt)])
    inner, probe = _interior(path, jax.device_put(u), t_start, t_end, rho, sigma_min, sigma_max, schedule=schedule,
                             geometric=n == 1, start_inf=start_inf, end_inf=end_inf)
    if probe is not None:
        _check_decreasing_log_snr(path, np.asarray(probe), t_start, t_end, schedule)
    inner = np.asarray(inner)[:n].astype(fdt)
    if not start_inf:
        inner[0] = t_start
    if not end_inf:
        inner[-1] = t_end
    head = [np.array([t_start], fdt)] if start_inf else []
    tail = [np.array([t_end], fdt)] if end_inf else []
    ts = np.concatenate(head + [inner] + tail)
    if not np.all(np.diff(ts) < 0):
        if _levels_ordered(path, t_start, t_end, sigma_min, sigma_max, start_inf, end_inf):
            # the levels are in order, but more of them fall near an end than the float width
            # resolves (e.g. 1,000 Karras times of vp_cosine(logsnr_min=-30) within ulps of t = 1)
            i = int(np.argmax(np.diff(ts) >= 0))
            raise ValueError(
                f"schedule {schedule!r} with steps={steps} repeats times on [t_end={t_end}, t_start={t_start}] of "
                f"path {path.name!r}: its noise levels crowd closer near t={float(ts[i])} than {fdt} resolves "
                f"(times {ts[max(i - 1, 0):i + 3]}); use fewer steps, move that end inwards (t_start / t_end, "
                f"sigma_max / sigma_min), or enable jax.enable_x64")
        # a finite end whose noise level sigma / alpha lies outside [sigma_min, sigma_max]: the
        # levels run the wrong way and clipping to [t_end, t_start] repeats times
        raise ValueError(
            f"schedule {schedule!r} with sigma_min={sigma_min}, sigma_max={sigma_max} gives repeated times on "
            f"[t_end={t_end}, t_start={t_start}] of path {path.name!r}: an infinite end's level (sigma_max from "
            f"pure noise, sigma_min towards clean data) must lie between the other end's noise level and it; "
            f"got times {ts}"
        )
    return jax.device_put(ts)


def default_denoise(path: Path, ts: Array, t_end=None) -> bool:
    """The samplers' default ``denoise``: ``path.denoise_at_end`` where the grid ends at the path's
    end (``ts[-1] <= path.t_min + 1e-6``) or is traced (an explicit schedule traced by the
    caller); False for a partial solve ending above it (whose state at ``t_end`` is the result,
    not a denoised ``x0_hat``)."""
    if not path.denoise_at_end:
        return False
    last = concrete_real(t_end)  # (a given t_end decides, also where the grid is traced under a jit)
    if last is None:
        try:  # (a host copy: gf.sample's grid is concrete under a caller's jit, where ts[-1] was traced)
            last = float(np.asarray(ts)[-1])
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            return True
    return last <= path.t_min + 1e-6


def _at_end(ts: Array, *fns) -> tuple[float, ...] | None:
    """``fn(ts[-1])`` for each of ``fns``, as floats read on the host (under a caller's jit too), or
    None where they cannot be (a traced grid or path)."""
    try:
        with jax.ensure_compile_time_eval():  # (concrete under a caller's jit too)
            t = jnp.asarray(np.asarray(ts)[-1])
            return tuple(float(f(t)) for f in fns)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def noisy_end(path: Path, ts: Array) -> bool:
    """Whether ``sigma > 0`` at the grid's end, read on the host (False where it cannot be: a traced
    grid or path). A sampler folds its final denoising step into its loop only there: that
    iteration weights the noise prediction (or its derivative) by 0, and at ``sigma = 0`` an
    ``x0`` model's noise prediction is infinite (0 * inf = NaN), where the call after the loop only
    converts to ``x0``."""
    end = _at_end(ts, path.sigma)
    return end is not None and end[0] > 0.0


def velocity_determines_x0(path: Path, ts: Array) -> bool:
    """Whether a velocity at the grid's end gives ``x0_hat`` without cancellation, read on the host
    (False where it cannot be: a traced grid or path). From ``x = alpha x0 + sigma eps`` and
    ``v = alpha' x0 + sigma' eps``, ``x0 = (sigma' x - sigma v) / D`` with
    ``D = alpha sigma' - sigma alpha'``: True where ``sigma > 0`` and
    ``|D| > (|alpha sigma'| + |sigma alpha'|) / 2``, i.e. ``alpha'`` and ``sigma'`` do not nearly
    cancel (equality on every path whose ``alpha`` falls and ``sigma`` rises, as the built-in ones).
    Where ``sigma / alpha`` stops changing, ``D = 0`` and the velocity holds no ``x0`` at all (a
    custom path of that kind gave inf / NaN samples: review)."""
    end = _at_end(ts, path.alpha, path.sigma, path.d_alpha, path.d_sigma)
    if end is None:
        return False
    a, s, da, ds = end
    return s > 0.0 and abs(a * ds - s * da) > 0.5 * (abs(a * ds) + abs(s * da))


def _levels_ordered(path: Path, t_start, t_end, sigma_min, sigma_max, start_inf: bool, end_inf: bool) -> bool:
    """Whether the noise levels ``sigma / alpha`` of a log-SNR / Karras grid's ends decrease (a
    finite end's own level between an infinite end's ``sigma_max`` / ``sigma_min``)."""
    fdt = np.dtype(jnp.result_type(float))
    level = lambda t: float(jnp.exp(-0.5 * path.log_snr(jnp.asarray(t, fdt))))  # noqa: E731
    hi = sigma_max if start_inf else level(t_start)
    lo = sigma_min if end_inf else level(t_end)
    return lo < hi


def sampler_grid(path: Path, steps, schedule, t_start, t_end) -> Array:
    """:func:`time_grid` as the samplers take it: refused by :func:`check_clean_runs`, and for a path
    whose signal-to-noise ratio does not fall from its end to its start
    (:func:`genflow.paths.check_orientation`: a path with noise at t=0 sampled from the wrong end,
    silently)."""
    ts = check_clean_runs(path, time_grid(path, steps, schedule, t_start, t_end),
                          f"schedule {schedule!r} with steps={steps}" if isinstance(schedule, str) else "schedule")
    try:
        tn = np.asarray(ts)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return ts
    check_orientation(path, tn[-1], tn[0])
    return ts


def check_clean_runs(path: Path, ts: Array, what: str) -> Array:
    """``ts``, refused by the samplers where two consecutive times both have ``sigma = 0`` (or
    both ``alpha = 0``) in the grid's float width: a step from clean data to clean data (or pure
    noise to pure noise) spends evaluations on nothing, and is 0 / 0 for an x0 model's eps and in
    most solvers' coefficients (ddpm, dpm++2s / 3s, pc and, with an x0 model, ddim, deis,
    edm_heun and restart returned NaN). It happens where ``sigma`` underflows, e.g.
    ``edm(sigma_min=0)`` (``sigma`` is 0 in float32 below t ~ 2e-6) with a 1,000-step quadratic
    grid. Traced grids, and paths with traced parameters, pass unchecked."""
    try:
        tn = np.asarray(ts)
        n = tn.shape[0]
        padded = np.concatenate([tn, np.full(bucket(n) - n, tn[-1], tn.dtype)])
        a0, s0 = (np.asarray(v)[:n] for v in _zero_scales(path, jax.device_put(padded)))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return ts
    for name, z, end in (("sigma", s0, "clean data"), ("alpha", a0, "pure noise")):
        both = z[:-1] & z[1:]
        if both.any():
            i = int(np.argmax(both))
            # where to end (start) instead: the run's first sigma = 0 time (its last alpha = 0 one)
            j = i if name == "sigma" else (n - 1 if z[i:].all() else i + int(np.argmin(z[i:])) - 1)
            bound = "end the grid at t_end" if name == "sigma" else "start it at t_start"
            raise ValueError(
                f"{what}: {name} is 0 in {tn.dtype} at the consecutive times {float(tn[i])} and {float(tn[i + 1])} "
                f"of path {path.name!r} (a step from {end} to {end}, spent on nothing and 0 / 0 in most solvers); "
                f"{bound}={float(tn[j])}, use fewer steps, or enable jax.enable_x64")
    return ts


@_memo.staged_jit
def _zero_scales(path: Path, ts: Array) -> tuple[Array, Array]:
    """``(alpha(ts) == 0, sigma(ts) == 0)``."""
    return jax.vmap(path.alpha)(ts) == 0, jax.vmap(path.sigma)(ts) == 0


def karras_family(path: Path, steps: int, *, t_start: float = 1.0, t_end: float | None = None,
                  rhos=(5.0, 7.0, 10.0, 14.0, 20.0), sigma_mins=(0.002, 0.02, 0.1, 0.3),
                  sigma_maxes=(10.0, 20.0, 40.0, 80.0, 160.0)) -> tuple[list[Array], list[dict]]:
    """Karras grids over ``rho`` x ``sigma_min`` x ``sigma_max``: candidates for :func:`select_schedule`.

    The best Karras grid at a small step count depends on the model and its data, so pick it
    from a family on calibration noise rather than trust EDM's defaults (``rho = 7``,
    ``sigma_min = 0.002``, ``sigma_max = 80``, set for data of standard deviation 0.5).
    ``sigma_max`` matters from pure noise (``alpha(t_start) = 0``), where the first step jumps from
    infinite noise to it: too low and that step's error stays at any NFE, too high and the other
    steps are spread over a longer range (:func:`time_grid`). ``sigma_min`` matters where the path
    ends at clean data (``sigma(t_end) = 0``). An axis that the endpoints make irrelevant (a
    finite start for ``sigma_max``, a finite end for ``sigma_min``) is dropped; at very few steps
    grids of different ``rho`` can still coincide (1 step: all of them; 2 steps on ``linear``: 20
    distinct of 100), which costs :func:`select_schedule` repeated solves and nothing else.

    Args:
      path: the path.
      steps: number of steps of every grid.
      t_start, t_end: the endpoints (as :func:`time_grid`).
      rhos, sigma_mins, sigma_maxes: the values of each parameter (noise levels in units of
        ``sigma / alpha``).
    Returns:
      ``(grids, params)``: ``[steps + 1]`` time grids and, for each, the dict of the parameters that
      built it (``{"rho", "sigma_min", "sigma_max"}``, the dropped ones at :func:`time_grid`'s defaults).

    Example::

        grids, params = gf.sampling.karras_family(path, 10)
        ts, errs = gf.sampling.select_schedule(fn, path, x1_cal, grids, prediction="velocity",
                                               solver="unipc", return_errors=True)
        print(params[int(jnp.argmin(errs))])  # e.g. {"rho": 5.0, "sigma_min": 0.1, "sigma_max": 40.0}
    """
    t_end = path.t_min if t_end is None else t_end
    t_start, t_end = _check_ends(t_start, t_end)
    axes = {"rho": rhos, "sigma_min": sigma_mins, "sigma_max": sigma_maxes}
    for name, vals in axes.items():
        vals = np.atleast_1d(np.asarray(vals, float))
        if vals.ndim != 1 or vals.size == 0 or not np.all(np.isfinite(vals) & (vals > 0)):
            raise ValueError(f"{name}s must be a non-empty sequence of positive numbers; got {vals.tolist()}")
        axes[name] = sorted(set(vals.tolist()))
    start_inf, end_inf = _infinite_ends(path, t_start, t_end)
    if not start_inf:
        axes["sigma_max"] = [SIGMA_MAX]
    if not end_inf:
        axes["sigma_min"] = [SIGMA_MIN]
    # the noise levels actually used at the ends: a finite start's (not sigma_max) bounds the
    # candidate sigma_mins, a finite end's the candidate sigma_maxes
    fdt = np.dtype(jnp.result_type(float))
    level = lambda t: float(jnp.exp(-0.5 * path.log_snr(jnp.asarray(t, fdt))))  # noqa: E731
    hi_fixed = None if start_inf else level(t_start)
    lo_fixed = None if end_inf else level(t_end)
    grids, params = [], []
    for rho in axes["rho"]:
        for smax in axes["sigma_max"]:
            for smin in axes["sigma_min"]:
                top = smax if hi_fixed is None else hi_fixed
                bottom = smin if lo_fixed is None else lo_fixed
                if bottom >= top:
                    continue
                grids.append(time_grid(path, steps, "karras", t_start=t_start, t_end=t_end, rho=rho,
                                       sigma_min=smin, sigma_max=smax))
                params.append({"rho": rho, "sigma_min": smin, "sigma_max": smax})
    if not grids:  # (the message named sigma_max = 80 from a finite start, where the start's level counts)
        tops = axes["sigma_max"] if hi_fixed is None else [f"{hi_fixed:.4g} (the noise level of t_start={t_start})"]
        bottoms = axes["sigma_min"] if lo_fixed is None else [f"{lo_fixed:.4g} (the noise level of t_end={t_end})"]
        raise ValueError(f"no (sigma_min, sigma_max) pair has its lower noise level below its upper one: lower "
                         f"levels {bottoms}, upper levels {tops}")
    return grids, params


@_memo.staged_jit(static_argnames=("schedule", "geometric", "start_inf", "end_inf"))
def _interior(path: Path, u, t_start, t_end, rho, sigma_min, sigma_max, *, schedule: str, geometric: bool,
              start_inf: bool, end_inf: bool) -> Array:
    """The times of the noise levels at fractions ``u`` of the (log / ``level^(1/rho)``) range."""
    fdt = u.dtype
    t_start, t_end = jnp.asarray(t_start, fdt), jnp.asarray(t_end, fdt)
    level = lambda t: jnp.exp(-0.5 * path.log_snr(t))  # noqa: E731  sigma / alpha
    hi = jnp.asarray(sigma_max, fdt) if start_inf else level(t_start)
    lo = jnp.asarray(sigma_min, fdt) if end_inf else level(t_end)
    if geometric:  # a single interior point: the geometric middle of the range
        levels = jnp.sqrt(lo * hi) * jnp.ones_like(u)
    elif schedule == "logsnr":
        levels = jnp.exp(jnp.log(hi) + (jnp.log(lo) - jnp.log(hi)) * u)
    else:
        a, b = hi ** (1.0 / rho), lo ** (1.0 / rho)
        # (1 - u) a + u b, exact at both ends: a + (b - a) u cancelled at u = 1 for a >> b (small
        # rho: sigma_min 0.00182 for 0.002 at rho 0.7, 0 at rho 0.5)
        levels = ((1.0 - u) * a + u * b) ** rho
    # (probed only for a bisection inverse: the closed forms belong to monotone paths; the inverse
    # function is static, so this is one program per kind of path)
    probe = (path.log_snr(t_end + (t_start - t_end) * jnp.linspace(0.0, 1.0, _PROBE, dtype=fdt))
             if path.t_from_log_snr_fn is None else None)
    return jnp.clip(path.t_from_log_snr(-2.0 * jnp.log(levels)), t_end, t_start), probe


_PROBE = 257  # log-SNR probes of a path without a closed-form inverse (see _check_decreasing_log_snr)


def _check_decreasing_log_snr(path: Path, lam: np.ndarray, t_start: float, t_end: float, schedule: str) -> None:
    """A ``ValueError`` if the log-SNR probed at ``_PROBE`` times of [t_end, t_start] is NaN or rises:
    the bisection inverse assumes it decreases, and on a path whose log-SNR folds back it jumped
    between roots (a grid with a gap of 0.3 in t whatever the step count: no convergence)."""
    ts = t_end + (t_start - t_end) * np.linspace(0.0, 1.0, len(lam))  # (increasing t: lam should fall)
    bad = np.flatnonzero(np.isnan(lam))
    if bad.size:
        raise ValueError(
            f"schedule {schedule!r}: path {path.name!r} has a NaN log-SNR at t={float(ts[bad[0]]):.6g} (alpha or "
            f"sigma negative or 0/0 there? cos(pi t / 2) is -4.4e-8 at t = 1 in float32: write the path so that "
            f"its ends are exact, as genflow.paths.vp_cosine does); use t_start / t_end inside its range, or the "
            f"'uniform' / 'quadratic' schedule")
    with np.errstate(invalid="ignore"):
        rise = np.diff(lam) > 1e-6 * np.maximum(1.0, np.abs(lam[:-1]))
    if rise.any():
        i = int(np.argmax(rise))
        raise ValueError(
            f"schedule {schedule!r} needs a log-SNR that decreases in t, but that of path {path.name!r} rises between "
            f"t={float(ts[i]):.4g} and t={float(ts[i + 1]):.4g} ({float(lam[i]):.4g} -> {float(lam[i + 1]):.4g}): "
            f"its noise levels do not map back to times; use the 'uniform' or 'quadratic' schedule or an explicit "
            f"grid")
