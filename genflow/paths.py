"""Gaussian probability paths ``x_t = alpha(t) * x0 + sigma(t) * eps``.

Time runs from data at ``t = 0`` to noise at ``t = 1``. A path is a small immutable pytree:
its float hyper-parameters (``beta_min``, ``sigma_max``, ...) are traced leaves, so changing them
never recompiles a jitted sampler, while the functions that define it and its name are static.

A new path is one small function that returns a :class:`Path`::

    def _alpha(t, k): return jnp.sin(0.5 * jnp.pi * (1 - t)) ** k  # cos(pi t / 2)^k, exactly 0 at t = 1
    def _sigma(t, k): return jnp.sin(0.5 * jnp.pi * t)

    def power_cosine(k=1.0) -> Path:
        return Path(alpha_fn=_alpha, sigma_fn=_sigma, params=dict(k=k), name="power_cosine")

``alpha`` must be exactly 0 where the path reaches pure noise and ``sigma`` exactly 0 at clean
data: samplers, time grids and likelihoods recognise the ends by these zeros (float32's
``cos(pi / 2)`` is -4.4e-8, so ``jnp.cos(0.5 * jnp.pi * t)`` would leave a negative alpha at
t = 1 and a NaN log-SNR). With ``k > 1``, ``alpha'(1) = 0`` as well: a velocity model's
conversion to ``x0`` is 0/0 at t = 1, so the solvers that make it (DDIM, DPM-Solver, UniPC, SDE
solvers, ...) refuse ``t_start = 1`` there; the velocity ODE solvers (euler, heun, tsit5, ...) start
from it.

Derivatives and the log-SNR default to autodiff / the definition; closed forms and the
inverse of the log-SNR can be supplied for speed and accuracy (without one, the inverse is a
bisection, with the implicit-function first derivatives). Define ``alpha_fn`` and
``sigma_fn`` at module level (not as lambdas inside the factory) so that two calls of the
factory give equal paths and hit the same compiled program.

A path whose ``sigma'`` (or ``alpha'``) is infinite at ``t = 0`` -- e.g. a VP-type path with
``sigma = sqrt(1 - alpha^2)`` -- needs ``t_min > 0`` (as :func:`vp_linear` does, ``1e-3``, with a
denoising step at the end), and/or a closed-form ``diffusion_sq_fn``: samplers and likelihoods
refuse to evaluate such a path at ``t = 0``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from genflow._checks import check_registration, check_removal, concrete_real, real_or_traced, registry_owner

Array = jax.Array
ScalarFn = Callable[..., Array]

__all__ = [
    "Path",
    "vp_linear",
    "vp_cosine",
    "ve",
    "linear",
    "edm",
    "get",
    "names",
    "register",
    "unregister",
    "broadcast_t",
    "check_t",
    "check_orientation",
]


def _static(default: Any = None):
    return dataclasses.field(default=default, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class Path:
    """A Gaussian probability path ``x_t = alpha(t) x0 + sigma(t) eps``.

    Attributes:
      alpha_fn, sigma_fn: ``f(t, **params) -> Array``, elementwise in ``t``.
      params: hyper-parameters (traced leaves).
      name: a short name, used in error messages and plots.
      t_min: the smallest time samplers integrate to by default (``> 0`` where the path is
        singular at ``t = 0``, e.g. ``vp_linear``'s ``sigma'``, so that eps-parameterised
        velocities ``alpha' x0 + sigma' eps`` are not inf * 0 there).
      denoise_at_end: whether samplers finish with one Tweedie denoising step at ``t_min``
        by default (the built-ins set it where ``sigma(t_min) > 0``; a custom path must set it
        itself, it defaults to False; a partial solve that ends above ``t_min`` does not).
      d_alpha_fn, d_sigma_fn: optional closed-form time derivatives (else autodiff).
      log_snr_fn: optional closed-form ``log(alpha^2 / sigma^2)``.
      t_from_log_snr_fn: optional closed-form inverse of the log-SNR (else bisection).
      diffusion_sq_fn: optional closed-form ``g(t)^2`` of the forward SDE (else from the
        derivatives, which is ``0 * inf`` where ``sigma = 0`` and ``sigma' = inf``).
    """

    alpha_fn: ScalarFn = _static()
    sigma_fn: ScalarFn = _static()
    params: dict = dataclasses.field(default_factory=dict)
    name: str = _static("custom")
    t_min: float = _static(0.0)
    denoise_at_end: bool = _static(False)
    d_alpha_fn: ScalarFn | None = _static(None)
    d_sigma_fn: ScalarFn | None = _static(None)
    log_snr_fn: ScalarFn | None = _static(None)
    t_from_log_snr_fn: ScalarFn | None = _static(None)
    diffusion_sq_fn: ScalarFn | None = _static(None)

    def __post_init__(self):
        if not callable(self.alpha_fn) or not callable(self.sigma_fn):
            raise TypeError(
                f"Path {self.name!r}: alpha_fn and sigma_fn must be callables f(t, **params), "
                f"got {type(self.alpha_fn).__name__} and {type(self.sigma_fn).__name__}"
            )

    # -- schedule ---------------------------------------------------------------------------
    def alpha(self, t) -> Array:
        """Signal coefficient ``alpha(t)``; same shape as ``t``."""
        return self.alpha_fn(_as_float(t), **self.params)

    def sigma(self, t) -> Array:
        """Noise coefficient ``sigma(t)``; same shape as ``t``."""
        return self.sigma_fn(_as_float(t), **self.params)

    def d_alpha(self, t) -> Array:
        """``d alpha / dt``; closed form if given, else forward-mode autodiff."""
        t = _as_float(t)
        if self.d_alpha_fn is not None:
            return self.d_alpha_fn(t, **self.params)
        return _elementwise_derivative(self.alpha, t)

    def d_sigma(self, t) -> Array:
        """``d sigma / dt``; closed form if given, else forward-mode autodiff."""
        t = _as_float(t)
        if self.d_sigma_fn is not None:
            return self.d_sigma_fn(t, **self.params)
        return _elementwise_derivative(self.sigma, t)

    def log_snr(self, t) -> Array:
        """``lambda(t) = log(alpha(t)^2 / sigma(t)^2)``, decreasing in ``t``."""
        t = _as_float(t)
        if self.log_snr_fn is not None:
            return self.log_snr_fn(t, **self.params)
        return 2.0 * (jnp.log(self.alpha(t)) - jnp.log(self.sigma(t)))

    def snr(self, t) -> Array:
        """``alpha(t)^2 / sigma(t)^2``."""
        return jnp.exp(self.log_snr(t))

    def d_log_snr(self, t) -> Array:
        """``d lambda / dt`` (negative): ``2 (alpha'/alpha - sigma'/sigma)``; ``-inf`` where
        ``sigma = 0`` (the log-SNR's limit there; ``edm(sigma_min=0)`` at t = 0 gave 0/0 = NaN)."""
        t = _as_float(t)
        s = self.sigma(t)
        clean = s == 0
        rate = self.d_alpha(t) / self.alpha(t) - self.d_sigma(t) / jnp.where(clean, 1.0, s)
        return 2.0 * jnp.where(clean, -jnp.inf, rate)

    def t_from_log_snr(self, lam) -> Array:
        """Inverse of :meth:`log_snr`: the ``t`` in [0, 1] with ``log_snr(t) = lam``.

        Closed form where the path provides one, else 60 steps of bisection (the log-SNR of
        every Gaussian path is decreasing in t), with the implicit-function first derivatives
        (``1 / d_log_snr(t)`` in ``lam``, and in the path's hyper-parameters; second derivatives
        of the bisection are 0). A ``lam`` outside the path's range gives the nearer end:
        0 above ``log_snr(0)``, 1 below ``log_snr(1)`` (with derivative 0).
        """
        lam = _as_float(lam)
        if self.t_from_log_snr_fn is not None:
            # A closed form extrapolates outside the path's log-SNR range; clamp to [0, 1] as the
            # bisection does (lam = -inf -> 1, lam above log_snr(0) -> 0). The closed form is
            # evaluated at a safe lam there: its overflow (exp(-lam / 2) at lam = -200 on
            # vp_cosine) times the clamp's zero cotangent made the gradient NaN, not 0.
            # (strictly outside, so that the range's own ends keep the closed form's values)
            above = (lam > self.log_snr(jnp.zeros_like(lam))) | jnp.isposinf(lam)
            below = (lam < self.log_snr(jnp.ones_like(lam))) | jnp.isneginf(lam)
            out = above | below | jnp.isnan(lam)
            # (no gradient through the safe value: edm(sigma_min=0)'s infinite one made it NaN)
            safe = jnp.where(out, jax.lax.stop_gradient(self.log_snr(jnp.full_like(lam, 0.5))), lam)
            t = self.t_from_log_snr_fn(safe, **self.params)
            t = jnp.where(above, 0.0, jnp.where(below, 1.0, jnp.where(jnp.isnan(lam), jnp.nan, t)))
            return jnp.clip(t, 0.0, 1.0).astype(t.dtype)

        lam0 = jax.lax.stop_gradient(lam)

        def body(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam0  # still too clean: move right
            return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 60, body, (jnp.zeros_like(lam0), jnp.ones_like(lam0)))
        t = jax.lax.stop_gradient(0.5 * (lo + hi))
        # The bisection's comparisons have zero derivative. Give t the implicit-function one of
        # log_snr(t; params) = lam (first order): dt = (dlam - d_params log_snr(t)) / lambda'(t),
        # zero where lam is outside the path's range and t is clamped, so that optimize_schedule and
        # jax.grad see through paths without a closed-form inverse (w.r.t. lam and the path's
        # traced hyper-parameters alike). The added term is 0 in value.
        slope = self.d_log_snr(t)
        inside = (lam0 <= self.log_snr(jnp.zeros_like(t))) & (lam0 >= self.log_snr(jnp.ones_like(t)))
        ok = inside & jnp.isfinite(lam0) & jnp.isfinite(slope) & (slope != 0)
        inv = jax.lax.stop_gradient(jnp.where(ok, 1.0 / jnp.where(ok, slope, 1.0), 0.0))
        lam_t = self.log_snr(jnp.where(ok, t, 0.5))  # (carries the path's hyper-parameters)
        resid = (lam - lam0) - (lam_t - jax.lax.stop_gradient(lam_t))
        return t + jnp.where(ok, resid, 0.0) * inv.astype(t.dtype)

    # -- drift and diffusion of the equivalent forward SDE -------------------------------
    def drift_coef(self, t) -> Array:
        """``f(t) = alpha'/alpha`` of the forward SDE ``dx = f x dt + g dW``."""
        t = _as_float(t)
        return self.d_alpha(t) / self.alpha(t)

    def diffusion_sq(self, t) -> Array:
        """``g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2`` of the forward SDE."""
        t = _as_float(t)
        if self.diffusion_sq_fn is not None:
            return self.diffusion_sq_fn(t, **self.params)
        s = self.sigma(t)
        return 2.0 * s * self.d_sigma(t) - 2.0 * self.drift_coef(t) * s * s

    # -- sampling helpers --------------------------------------------------------------------
    def add_noise(self, x0: Array, eps: Array, t) -> Array:
        """``x_t = alpha(t) x0 + sigma(t) eps``. ``x0, eps: [B, ...]``, ``t: [B]`` or scalar."""
        check_t(t)  # (1.5 extrapolated the path silently, as gf.param.convert refuses; a no-op under jit)
        t = broadcast_t(t, x0)
        return self.alpha(t) * x0 + self.sigma(t) * eps

    def prior_sample(self, key: Array, shape, dtype=jnp.float32) -> Array:
        """Standard starting state at t = 1: ``sigma(1) * N(0, I)`` of the given shape.

        Raises ``ValueError`` when ``sigma(1)`` is concrete and ``10 * sigma(1)`` exceeds the largest
        finite value of ``dtype`` (e.g. ``ve(1e-3, 1e5)`` in float16, whose samples would be +-inf)."""
        # sigma(1) in float32 or wider (in bfloat16 edm's sigma(1) was 81.5, not 80)
        s1 = self.sigma(jnp.ones((), jnp.promote_types(dtype, jnp.float32)))
        if not isinstance(s1, jax.core.Tracer) and jnp.issubdtype(dtype, jnp.floating):
            fmax = float(jnp.finfo(dtype).max)
            if float(s1) * 10.0 > fmax:  # (N(0, 1) draws reach ~6; 10 keeps a margin)
                raise ValueError(f"prior_sample: sigma(1) = {float(s1):.4g} of path {self.name!r} is too large for "
                                 f"dtype {jnp.dtype(dtype).name} (max {fmax:.4g}): samples would overflow to inf; "
                                 "use a wider dtype (float32) or a smaller sigma_max")
        return (s1 * jax.random.normal(key, shape, dtype)).astype(dtype)


_STATIC_FIELDS = tuple(f.name for f in dataclasses.fields(Path) if f.name != "params")


def _flatten(path: Path):
    # Python floats leave as (weakly typed) 0-d arrays, made in the x64 mode of the moment:
    # eqx.filter_jit (gf.sample, gf.log_prob, ...) keeps Python scalars static, so every new
    # value of a hyper-parameter would recompile; converting at the jit boundary rather than at
    # construction keeps a path built outside ``jax.enable_x64`` exact inside it
    # (floats only: an int hyper-parameter may steer Python control flow in a user's path)
    # (made anew at each flatten: a cached leaf shared by equal paths could not be donated twice in one
    # call, and donating one path deleted the arrays of the others)
    params = {k: jnp.asarray(float(v)) if isinstance(v, (float, np.floating)) else v for k, v in path.params.items()}
    return ((jax.tree_util.DictKey("params"), params),), tuple(getattr(path, f) for f in _STATIC_FIELDS)


def _unflatten(static, children):
    return Path(params=children[0], **dict(zip(_STATIC_FIELDS, static)))


jax.tree_util.register_pytree_with_keys(Path, _flatten, _unflatten)


def _as_float(t) -> Array:
    if isinstance(t, int) and not isinstance(t, bool):  # (weakly typed, as a Python float: under x64 a
        t = float(t)  # strong float64 t = 1 turned float32 conversions into float64 ones)
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    return t


def _elementwise_derivative(f, t: Array) -> Array:
    return jax.jvp(f, (t,), (jnp.ones_like(t),))[1]


def broadcast_t(t, x: Array) -> Array:
    """Reshape a time ``t`` (scalar or ``[B]``) to broadcast against ``x: [B, ...]``."""
    t = _as_float(t)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or jnp.ndim(x) == 0 or t.shape[0] != x.shape[0]:  # (a 0-d x: an IndexError)
        raise ValueError(
            f"t must be a scalar or have shape [B] = [{x.shape[0] if jnp.ndim(x) else 'B'}] matching x.shape[0]; "
            f"got t.shape={t.shape} with x.shape={jnp.shape(x)}"
        )
    return t.reshape(t.shape + (1,) * (x.ndim - 1))


def check_path(path) -> None:
    """A ``TypeError`` unless ``path`` is a :class:`Path` (e.g. a path name passed where the path
    object is expected)."""
    if not isinstance(path, Path):
        raise TypeError(f"path must be a genflow.paths.Path; got {type(path).__name__}")


def check_orientation(path: Path, t_lo, t_hi) -> None:
    """A ``ValueError`` unless ``path``'s signal-to-noise ratio falls from ``t_lo`` to ``t_hi``
    (``t_lo < t_hi``): genflow's paths run from data at t=0 to noise at t=1. A path written the
    other way (``alpha = t, sigma = 1 - t``, the convention of Meta's flow_matching) sampled
    silently from the wrong end (samples whose mean was off by 2.4 data standard deviations) and
    gave NaN log-densities. Checked where the values are concrete (traced parameters pass)."""
    try:
        lo, hi = jnp.asarray(t_lo), jnp.asarray(t_hi)
        # SNR(t_lo) > SNR(t_hi), cross-multiplied: alpha(lo) sigma(hi) > alpha(hi) sigma(lo)
        left = float(path.alpha(lo) * path.sigma(hi))
        right = float(path.alpha(hi) * path.sigma(lo))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return
    if not left > right:
        raise ValueError(
            f"path {path.name!r} does not run from data to noise: its signal-to-noise ratio alpha/sigma does not "
            f"fall from t={float(t_lo)} to t={float(t_hi)} (alpha(lo) sigma(hi) = {left:.3g} <= alpha(hi) sigma(lo) = "
            f"{right:.3g}). "
            f"genflow's paths put data at t=0 and noise at t=1 (x_t = alpha(t) x0 + sigma(t) eps, e.g. alpha = 1 - t, "
            f"sigma = t); to use a path written the other way round, flip its time: Path(alpha_fn=lambda t: a(1 - t), "
            f"sigma_fn=lambda t: s(1 - t))")


def check_t(t, name: str = "t") -> None:
    """Raise ``ValueError`` if a concrete ``t`` lies outside [0, 1] (no-op under tracing)."""
    import numpy as np

    if isinstance(t, jax.core.Tracer):  # under jit / vmap / grad the values are not known
        return
    if isinstance(t, jax.Array):
        try:
            tt = np.asarray(jax.device_get(t))
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            return
    else:  # Python / NumPy values: no jnp call, which would be staged out under jit
        tt = np.asarray(t, dtype=float)
    if tt.size and (not np.all(np.isfinite(tt)) or tt.min() < 0.0 or tt.max() > 1.0):
        n_nan = int(np.sum(np.isnan(tt)))
        rng = (f"values in [{float(np.nanmin(tt)):.4g}, {float(np.nanmax(tt)):.4g}]" if n_nan < tt.size
               else "only NaN")
        raise ValueError(
            f"{name} must lie in [0, 1] (t=0 is data, t=1 is noise); got {rng}"
            + (f" and {n_nan} NaN value(s)" if 0 < n_nan < tt.size else "")
        )


# ---------------------------------------------------------------------------------------------
# Variance-preserving, linear beta (score_sde's VP SDE / DDPM in continuous time).
#   log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2,   sigma = sqrt(1 - alpha^2)
# ---------------------------------------------------------------------------------------------
def _vpl_log_alpha(t, beta_min, beta_max):
    return -0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min


def _vpl_alpha(t, beta_min, beta_max):
    return jnp.exp(_vpl_log_alpha(t, beta_min, beta_max))


def _vpl_sigma(t, beta_min, beta_max):
    # (at t = 0 its hyper-parameter gradients are NaN: sqrt'(0) = inf times d(1 - alpha^2)/d beta
    # = 0. A double where would give 0 there, but also a silent 0 for the t-derivative, which is
    # inf (or sqrt(beta_max / 2) with beta_min = 0): left as is; training samples t >= t_min > 0)
    return jnp.sqrt(-jnp.expm1(2.0 * _vpl_log_alpha(t, beta_min, beta_max)))


def _vpl_d_alpha(t, beta_min, beta_max):
    beta = beta_min + t * (beta_max - beta_min)
    return -0.5 * beta * _vpl_alpha(t, beta_min, beta_max)


def _vpl_d_sigma(t, beta_min, beta_max):
    # sigma' = alpha^2 beta / (2 sigma); at t = 0 with beta_min = 0 (the only case where beta and
    # sigma are both 0), beta / sigma is 0/0 with the limit sqrt(2 beta_max) (sigma ~ t sqrt(beta_max / 2));
    # with beta_min > 0 it is beta_min / 0 = inf, as before
    a, s = _vpl_alpha(t, beta_min, beta_max), _vpl_sigma(t, beta_min, beta_max)
    beta = beta_min + t * (beta_max - beta_min)
    both0 = (s == 0) & (beta == 0)
    ratio = jnp.where(both0, jnp.sqrt(2.0 * beta_max), beta / jnp.where(both0, 1.0, s))
    return 0.5 * a * a * ratio


def _vpl_diffusion_sq(t, beta_min, beta_max):
    # g^2 = beta(t) (finite at t = 0, where the generic 2 sigma sigma' is 0 * inf)
    return beta_min + t * (beta_max - beta_min)


def _vpl_log_snr(t, beta_min, beta_max):
    la2 = 2.0 * _vpl_log_alpha(t, beta_min, beta_max)
    return la2 - jnp.log(-jnp.expm1(la2))


def _vpl_t_from_log_snr(lam, beta_min, beta_max):
    # alpha^2 = sigmoid(lam): solve a t^2 + b t + c = 0 for the positive root, stably.
    a = 0.25 * (beta_max - beta_min)
    b = 0.5 * beta_min
    c = 0.5 * jax.nn.log_sigmoid(lam)  # = log alpha <= 0
    # c underflows to 0 for lam above ~90 (and lam = inf): t = 0, where beta_min = 0 made it 0/0
    # (b^2 - 4ac = (beta(t)/2)^2 >= 0 inside the range; below it, with beta_min > beta_max, it is
    # negative: clamped, -2c/b > 1 is clipped to t = 1 by the caller instead of NaN)
    # (c guarded inside too: at c = 0 with beta_min = 0, sqrt'(0) = inf made the gradient NaN)
    c_s = jnp.where(c == 0, -1.0, c)
    den = b + jnp.sqrt(jnp.maximum(b * b - 4.0 * a * c_s, 0.0))
    return jnp.where(c == 0, 0.0, -2.0 * c_s / den)


def _hp(value):
    """A Python / NumPy int hyper-parameter as a float: ints stay Python ints in the pytree flatten,
    which eqx.filter_jit (gf.sample, gf.log_prob) keeps static, so edm(rho=7) recompiled for every rho."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return float(value)
    return value


def _require(ok: Callable[..., bool], message: str, **values) -> None:
    """A ``ValueError`` naming the path's arguments unless ``ok(*values)`` holds; skipped when a
    value is traced (no check can see it) -- a path's parameters may be traced under jit."""
    vals = [real_or_traced(k, v, "a real number") for k, v in values.items()]
    if all(v is not None for v in vals) and not ok(*vals):
        got = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ValueError(f"{message}; got {got}")


def vp_linear(beta_min: float = 0.1, beta_max: float = 20.0) -> Path:
    """Variance-preserving path with linear ``beta(t)`` (Song et al. 2021, VP SDE).

    ``alpha(t) = exp(-t^2 (beta_max - beta_min)/4 - t beta_min/2)``,
    ``sigma(t) = sqrt(1 - alpha(t)^2)``. ``sigma'`` is singular at t = 0 (the velocity
    ``alpha' x0 + sigma' eps`` is inf * 0 there; ``f x - g^2 score / 2`` is finite), so samplers
    stop at ``t_min = 1e-3`` and finish with a denoising step.
    """
    _require(lambda lo, hi: 0.0 <= lo < np.inf and 0.0 < hi < np.inf,
             "vp_linear needs finite beta_min >= 0 and beta_max > 0",
             beta_min=beta_min, beta_max=beta_max)
    return Path(
        alpha_fn=_vpl_alpha,
        sigma_fn=_vpl_sigma,
        params=dict(beta_min=_hp(beta_min), beta_max=_hp(beta_max)),
        name="vp_linear",
        t_min=1e-3,
        denoise_at_end=True,
        d_alpha_fn=_vpl_d_alpha,
        d_sigma_fn=_vpl_d_sigma,
        log_snr_fn=_vpl_log_snr,
        t_from_log_snr_fn=_vpl_t_from_log_snr,
        diffusion_sq_fn=_vpl_diffusion_sq,
    )


# ---------------------------------------------------------------------------------------------
# Variance-preserving cosine (Nichol & Dhariwal 2021), in the truncated log-SNR form of
# Hoogeboom et al. 2023: lambda(t) = -2 log tan(theta(t)), theta = theta0 + t (theta1 - theta0),
# alpha = cos(theta), sigma = sin(theta).
# ---------------------------------------------------------------------------------------------
def _cos_theta_range(logsnr_min, logsnr_max):
    th0 = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
    th1 = jnp.arctan(jnp.exp(-0.5 * logsnr_min))
    return th0, th1


def _cos_theta(t, logsnr_min, logsnr_max):
    th0, th1 = _cos_theta_range(logsnr_min, logsnr_max)
    return th0 + t * (th1 - th0)


def _cos_phi(t, logsnr_min, logsnr_max):
    # pi/2 - theta(t), from arctan(e^(logsnr_min/2)) = pi/2 - theta(1): exactly 0 at t = 1 when
    # logsnr_min = -inf (cos(theta(1)) was -4e-8 in float32 and +6e-17 in float64, not 0)
    th0, th1 = _cos_theta_range(logsnr_min, logsnr_max)
    return jnp.arctan(jnp.exp(0.5 * logsnr_min)) + (1.0 - t) * (th1 - th0)


def _cos_alpha(t, logsnr_min, logsnr_max):
    return jnp.sin(_cos_phi(t, logsnr_min, logsnr_max))


def _cos_sigma(t, logsnr_min, logsnr_max):
    return jnp.sin(_cos_theta(t, logsnr_min, logsnr_max))


def _cos_d_alpha(t, logsnr_min, logsnr_max):
    th0, th1 = _cos_theta_range(logsnr_min, logsnr_max)
    return -jnp.sin(th0 + t * (th1 - th0)) * (th1 - th0)


def _cos_d_sigma(t, logsnr_min, logsnr_max):
    # cos(theta) (th1 - th0) = sin(phi) (th1 - th0) = alpha (th1 - th0): cos(theta) near pi/2 was -4e-8 at
    # t = 1 with logsnr_min = -inf (negative, where sigma' is 0) and 5% off at t = 1 - 1e-6
    th0, th1 = _cos_theta_range(logsnr_min, logsnr_max)
    return _cos_alpha(t, logsnr_min, logsnr_max) * (th1 - th0)


def _cos_log_snr(t, logsnr_min, logsnr_max):
    # 2 log(alpha / sigma), not -2 log tan(theta): tan < 0 just above pi/2 gave NaN (logsnr_min = -inf)
    return 2.0 * (jnp.log(_cos_alpha(t, logsnr_min, logsnr_max)) - jnp.log(_cos_sigma(t, logsnr_min, logsnr_max)))


def _cos_t_from_log_snr(lam, logsnr_min, logsnr_max):
    th0, th1 = _cos_theta_range(logsnr_min, logsnr_max)
    return (jnp.arctan(jnp.exp(-0.5 * lam)) - th0) / (th1 - th0)


def vp_cosine(logsnr_min: float = -15.0, logsnr_max: float = float("inf")) -> Path:
    """Variance-preserving cosine path: ``alpha = cos(theta(t))``, ``sigma = sin(theta(t))``.

    ``theta`` is linear in t, chosen so that the log-SNR spans ``[logsnr_min, logsnr_max]``
    (``logsnr_max = inf`` gives exact data at t = 0; a finite one leaves ``sigma(0) > 0``, and
    samplers then finish with a denoising step; ``logsnr_min`` keeps ``alpha(1) > 0``, so eps/x0
    conversions stay finite at t = 1).
    """
    _require(lambda lo, hi: lo < hi, "vp_cosine needs logsnr_min < logsnr_max (the log-SNR decreases from data to "
             "noise)", logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    # a finite logsnr_max leaves sigma(0) = sin(arctan(exp(-logsnr_max / 2))) > 0 at t_min = 0: finish with a
    # denoising step there, as for ve / edm (a traced logsnr_max: denoise, which is exact where sigma(0) = 0)
    lmax = concrete_real(logsnr_max)
    clean_at_0 = lmax is not None and lmax == np.inf
    return Path(
        alpha_fn=_cos_alpha,
        sigma_fn=_cos_sigma,
        params=dict(logsnr_min=_hp(logsnr_min), logsnr_max=_hp(logsnr_max)),
        name="vp_cosine",
        t_min=0.0,
        denoise_at_end=not clean_at_0,
        d_alpha_fn=_cos_d_alpha,
        d_sigma_fn=_cos_d_sigma,
        log_snr_fn=_cos_log_snr,
        t_from_log_snr_fn=_cos_t_from_log_snr,
    )


# ---------------------------------------------------------------------------------------------
# Variance-exploding (Song et al. 2021): alpha = 1, sigma = sigma_min (sigma_max/sigma_min)^t.
# ---------------------------------------------------------------------------------------------
def _one(t, **_):
    return jnp.ones_like(t)


def _zero(t, **_):
    return jnp.zeros_like(t)


def _ve_sigma(t, sigma_min, sigma_max):
    return sigma_min * (sigma_max / sigma_min) ** t


def _ve_d_sigma(t, sigma_min, sigma_max):
    return _ve_sigma(t, sigma_min, sigma_max) * jnp.log(sigma_max / sigma_min)


# (module-level functions, not closures from a factory: a path holding a local function could
# not be pickled -- a spawn worker, a pickle beside a checkpoint -- and a cloudpickle copy
# compared unequal and compiled the sampler anew)
def _ve_log_snr(t, sigma_min, sigma_max):
    return -2.0 * jnp.log(_ve_sigma(t, sigma_min, sigma_max))


def _ve_t_from_log_snr(lam, sigma_min, sigma_max):
    return (-0.5 * lam - jnp.log(sigma_min)) / jnp.log(sigma_max / sigma_min)


def ve(sigma_min: float = 0.01, sigma_max: float = 50.0) -> Path:
    """Variance-exploding path: ``alpha = 1``, ``sigma(t) = sigma_min (sigma_max/sigma_min)^t``.

    ``sigma(0) = sigma_min > 0``, so samplers finish with a denoising step by default.
    """
    _require(lambda lo, hi: 0.0 < lo < hi < np.inf, "ve needs 0 < sigma_min < sigma_max < inf", sigma_min=sigma_min,
             sigma_max=sigma_max)
    return Path(
        alpha_fn=_one,
        sigma_fn=_ve_sigma,
        params=dict(sigma_min=_hp(sigma_min), sigma_max=_hp(sigma_max)),
        name="ve",
        t_min=0.0,
        denoise_at_end=True,
        d_alpha_fn=_zero,
        d_sigma_fn=_ve_d_sigma,
        log_snr_fn=_ve_log_snr,
        t_from_log_snr_fn=_ve_t_from_log_snr,
    )


# ---------------------------------------------------------------------------------------------
# Linear interpolation (rectified flow / CondOT): alpha = 1 - t, sigma = t.
# ---------------------------------------------------------------------------------------------
def _lin_alpha(t):
    return 1.0 - t


def _lin_sigma(t):
    return t


def _lin_d_alpha(t):
    return -jnp.ones_like(t)


def _lin_d_sigma(t):
    return jnp.ones_like(t)


def _lin_log_snr(t):
    return 2.0 * (jnp.log1p(-t) - jnp.log(t))


def _lin_t_from_log_snr(lam):
    return jax.nn.sigmoid(-0.5 * lam)


def linear() -> Path:
    """Rectified flow / conditional OT path: ``alpha = 1 - t``, ``sigma = t``.

    The velocity ``x1 - x0`` is the flow-matching target; the prior at t = 1 is exactly
    ``N(0, I)``.
    """
    return Path(
        alpha_fn=_lin_alpha,
        sigma_fn=_lin_sigma,
        params={},
        name="linear",
        t_min=0.0,
        denoise_at_end=False,
        d_alpha_fn=_lin_d_alpha,
        d_sigma_fn=_lin_d_sigma,
        log_snr_fn=_lin_log_snr,
        t_from_log_snr_fn=_lin_t_from_log_snr,
    )


# ---------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022): alpha = 1, sigma(t) = (smin^(1/rho) + t (smax^(1/rho) - smin^(1/rho)))^rho
# so that uniform steps in t are exactly the Karras rho-schedule.
# ---------------------------------------------------------------------------------------------
def _edm_sigma(t, sigma_min, sigma_max, rho):
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + t * (hi - lo)) ** rho


def _edm_d_sigma(t, sigma_min, sigma_max, rho):
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return rho * (lo + t * (hi - lo)) ** (rho - 1.0) * (hi - lo)


def _edm_log_snr(t, sigma_min, sigma_max, rho):
    return -2.0 * jnp.log(_edm_sigma(t, sigma_min, sigma_max, rho))


def _edm_t_from_log_snr(lam, sigma_min, sigma_max, rho):
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (jnp.exp(-0.5 * lam / rho) - lo) / (hi - lo)


def edm(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Path:
    """EDM path (Karras et al. 2022): ``alpha = 1``, sigma following the rho-schedule in t.

    ``sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``, so
    uniform steps in t reproduce EDM's time discretization.
    """
    _require(lambda lo, hi, r: 0.0 <= lo < hi < np.inf and 0.0 < r < np.inf,
             "edm needs 0 <= sigma_min < sigma_max < inf and finite rho > 0",
             sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    # sigma_min = 0 ends at clean data: no denoising step there (it cost one more evaluation, and
    # replaced the final state by the model's x0 at sigma = 0); a traced sigma_min: denoise
    smin = concrete_real(sigma_min)
    clean_at_0 = smin is not None and smin == 0.0
    return Path(
        alpha_fn=_one,
        sigma_fn=_edm_sigma,
        params=dict(sigma_min=_hp(sigma_min), sigma_max=_hp(sigma_max), rho=_hp(rho)),
        name="edm",
        t_min=0.0,
        denoise_at_end=not clean_at_0,
        d_alpha_fn=_zero,
        d_sigma_fn=_edm_d_sigma,
        log_snr_fn=_edm_log_snr,
        t_from_log_snr_fn=_edm_t_from_log_snr,
    )


_FACTORIES: dict[str, Callable[..., Path]] = {
    "vp_linear": vp_linear,
    "vp_cosine": vp_cosine,
    "ve": ve,
    "linear": linear,
    "edm": edm,
}
_BUILTIN = frozenset(_FACTORIES)


def names() -> tuple[str, ...]:
    """Names accepted by :func:`get` (the built-in paths, then those added by :func:`register`)."""
    return tuple(_FACTORIES)


def register(name: str, factory: Callable[..., Path], *, overwrite: bool = False) -> Callable[..., Path]:
    """Make a path of your own available by name: :func:`get` then builds it with
    ``factory(**kwargs)``. The experiment scripts' ``--path`` flags and configs see it only when the
    script's ``main(argv)`` is called in the Python process that registered it (not from a shell,
    which starts a fresh process). Names are unique: an
    existing one is refused, unless it is one of yours and ``overwrite=True`` (re-running a
    notebook cell); the built-in names cannot be replaced, and :func:`unregister` removes one of
    yours. Returns ``factory`` (usable as a decorator through ``functools.partial(register, name)``).

    Example::

        def sub_vp(beta_min=0.1, beta_max=20.0):
            ...  # return gf.paths.Path(alpha_fn, sigma_fn, name="sub_vp", ...)
        gf.paths.register("sub_vp", sub_vp)
        path = gf.paths.get("sub_vp", beta_max=10.0)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str; got {name!r}")
    check_registration("path", name, registry_owner(_FACTORIES, _BUILTIN, name), overwrite)
    if not callable(factory):
        raise TypeError(f"factory must be callable (keyword hyper-parameters -> Path); got {type(factory).__name__}")
    _FACTORIES[name] = factory
    return factory


def unregister(name: str) -> Callable[..., Path]:
    """Remove path ``name`` added by :func:`register`; returns its factory. Built-in paths and
    unknown names are refused (``ValueError``)."""
    check_removal("path", name, registry_owner(_FACTORIES, _BUILTIN, name), set(_FACTORIES) - _BUILTIN)
    return _FACTORIES.pop(name)


def get(name: str | Path, **kwargs) -> Path:
    """A path by name (``"vp_linear"``, ``"vp_cosine"``, ``"ve"``, ``"linear"``, ``"edm"``).

    Passing a :class:`Path` returns it unchanged.
    """
    if isinstance(name, Path):
        if kwargs:
            raise ValueError(f"gf.paths.get was given the path {name.name!r} itself and hyper-parameters "
                             f"{sorted(kwargs)}; build the path with them instead (gf.paths.get(name, **kwargs))")
        return name
    if not isinstance(name, str) or name not in _FACTORIES:
        raise ValueError(f"unknown path {name!r}; expected one of {sorted(_FACTORIES)} (add one with "
                         f"gf.paths.register)")
    path = _FACTORIES[name](**kwargs)
    if not isinstance(path, Path):  # (a registered factory that returns something else)
        raise TypeError(f"the factory of path {name!r} returned a {type(path).__name__}, not a gf.paths.Path")
    return path
