"""Shared pieces of the exponential-integrator solvers (DDIM, DPM-Solver++, DEIS, UniPC, ...).

With ``lambda = log(alpha / sigma)`` (half the log-SNR) the probability-flow ODE has the exact
solutions (Lu et al. 2022, 2022b)

    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda  x0_hat d lambda   (data form)
    x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^-lambda eps_hat d lambda   (noise form)

and solvers differ in how they approximate the integrand. Two endpoints need care:

* **Out of pure noise** (``alpha_s = 0``, ``lambda_s = -inf``). The first-order (DDIM) step
  ``x_t = alpha_t x0_hat + sigma_t eps_hat`` is the exact limit of the data form and stays finite
  there; history points at ``lambda = -inf`` are dropped from polynomial fits in lambda (they
  are infinitely far away), and single-step solvers place their stages in ``kappa = alpha /
  sigma`` (where ``d(x / sigma) / d kappa = x0_hat`` is smooth at ``kappa = 0``).
* **Into clean data** (``sigma_t = 0``, ``lambda_t = +inf``). The data form gives
  ``x_t = alpha_t lim x0_hat`` -- the denoiser's value at the end of the trajectory. Along the
  trajectory ``x0_hat`` is a smooth function of ``u = sigma^2 / alpha^2 = e^(-2 lambda)``
  (the probability-flow ODE is ``dy/du = -score/2`` in ``y = x / alpha``), so the last step
  extrapolates the solver's data predictions polynomially in ``u`` to ``u = 0``, with as many
  points as the solver's order (fewer where the points are so close that the weights would
  amplify rounding more than the lower order's truncation: :func:`extrapolation_order`). A
  polynomial in lambda cannot be extrapolated to infinity.

All functions here work on scalars (times, coefficients); the states are combined linearly by
the solvers, so XLA fuses each update into one pass over the batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

import jax
import jax.numpy as jnp

from genflow.paths import Path

Array = jax.Array


def as_float(t) -> Array:
    """``t`` as a floating array (integers become the default float dtype)."""
    t = jnp.asarray(t)
    return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.result_type(float))


def coefs(path: Path, t) -> tuple[Array, Array, Array]:
    """``(alpha, sigma, lambda)`` at ``t`` with ``lambda = log(alpha / sigma)`` (may be +-inf)."""
    t = as_float(t)
    return path.alpha(t), path.sigma(t), 0.5 * path.log_snr(t)


class Grid(NamedTuple):
    """Times with their coefficients: ``t, alpha, sigma, lambda, g2`` of equal shape and the step
    count ``n``. ``g2`` is the squared diffusion ``g(t)^2`` of the forward SDE.

    The grid of a sampler has shape ``[L]`` with ``L >= n + 1`` (grids may be padded to a
    bucketed length so that one compiled computation serves many step counts; entries past ``n``
    are never used by the first ``n`` steps); stage points (intermediate times of single-step
    solvers, quadrature nodes, ...) have shape ``[L - 1, k]``."""

    t: Array
    a: Array
    s: Array
    l: Array
    g2: Array
    n: Array

    def at(self, j) -> tuple[Array, Array, Array]:
        """``(alpha, sigma, lambda)`` at index ``j``."""
        return self.a[j], self.s[j], self.l[j]


def make_grid(path: Path, ts: Array, n=None) -> Grid:
    """The :class:`Grid` of times ``ts`` (``n`` defaults to ``len(ts) - 1``). Evaluating the path
    here, once, is all the path-specific work of a hand-written solver: its per-step coefficients
    are functions of the grid only, so they compile once for every path."""
    ts = as_float(ts)
    n = jnp.asarray(ts.shape[0] - 1 if n is None else n, jnp.int32)
    # Pure noise (alpha = 0) and clean data (sigma = 0) have infinite log-SNR; their entries are
    # taken without derivative (endpoints are never optimized), so that gradients with respect
    # to the other times stay finite (the "double where").
    a0, s0 = jax.lax.stop_gradient(path.alpha(ts)), jax.lax.stop_gradient(path.sigma(ts))
    sing = (a0 == 0) | (s0 == 0)
    safe = jnp.where(sing, 0.5, ts)
    a, s, l = coefs(path, safe)
    return Grid(ts, jnp.where(sing, a0, a), jnp.where(sing, s0, s), jnp.where(sing, jnp.where(a0 == 0, -jnp.inf, jnp.inf), l),
                jnp.where(sing, jnp.inf, path.diffusion_sq(safe)), n)


def stage_grid(path: Path, lam: Array, lo: Array, hi: Array) -> Grid:
    """The :class:`Grid` of the times with ``log(alpha / sigma) = lam``, clipped to ``[lo, hi]``."""
    t = jnp.clip(t_of_lambda(path, lam), lo, hi)
    return make_grid(path, t, 0)


def t_of_lambda(path: Path, lam: Array) -> Array:
    """The time with ``log(alpha / sigma) = lam``."""
    return path.t_from_log_snr(2.0 * lam)


def finite_or(v: Array, fill) -> Array:
    """``v`` where finite, else ``fill`` (keeps unselected branches and their gradients NaN-free)."""
    return jnp.where(jnp.isfinite(v), v, fill)


def ddim_coefs(a_s, s_s, a_t, s_t) -> tuple[Array, Array]:
    """``(c_x, c_d)`` with ``x_t = c_x x_s + c_d x0_hat``: the DDIM step
    ``x_t = alpha_t x0_hat + sigma_t eps_hat``, ``eps_hat = (x_s - alpha_s x0_hat) / sigma_s``
    (Song et al. 2021). ``c_d = alpha_t (1 - e^-h)``, finite for ``alpha_s = 0`` and ``sigma_t = 0``.
    From clean data (``sigma_s = 0``, so ``sigma_t = 0`` too: e.g. ``edm(sigma_min=0)``'s sigma
    underflowing in float32 near t = 0) the step is the exact ``x_t = (alpha_t / alpha_s) x_s``
    (it was 0 / 0)."""
    clean = s_s == 0
    s_s1 = jnp.where(clean, 1.0, s_s)
    return (jnp.where(clean, a_t / jnp.where(clean, a_s, 1.0), s_t / s_s1),
            jnp.where(clean, 0.0, a_t - s_t * a_s / s_s1))


def order_at(i: Array, max_order: int, start_inf: Array) -> Array:
    """Order of a multistep solver at step ``i``: limited by the finite-lambda evaluations so far
    (the point at ``lambda = -inf`` does not count)."""
    avail = i + 1 - start_inf.astype(jnp.int32)
    return jnp.clip(avail, 1, max_order)


def select_order(order: Array, candidates: list[Array]) -> Array:
    """``candidates[order - 1]`` for a traced ``order`` (candidates of equal shape)."""
    return jnp.stack(candidates)[order - 1]


EXTRAPOLATION_GAIN = 100.0  # largest sum |w| of an extrapolation to u = 0 used without a check


def lagrange_at_zero(us: list[Array]) -> Array:
    """Weights ``w_j`` with ``P(0) = sum_j w_j f(u_j)`` for the polynomial through ``(u_j, f_j)``."""
    ws = []
    for j, uj in enumerate(us):
        w = jnp.ones_like(uj)
        for m, um in enumerate(us):
            if m != j:
                w = w * um / (um - uj)
        ws.append(w)
    return jnp.stack(ws)


def extrapolation_order(us: list[Array], order: Array, max_order: int) -> Array:
    """The order ``k <= order`` of a polynomial extrapolation to ``0`` through the nodes ``us[:k]``.

    Extrapolating from closely spaced nodes amplifies their rounding errors by ``sum |w|`` (the
    weights of :func:`lagrange_at_zero`): with many steps into ``sigma_min = 0.002`` and then
    ``0`` the last nodes are a few percent apart and three-point weights sum to hundreds (800
    Karras steps: ~500, a float32 error floor of ~3e-5 that grew with the step count). So ``k`` is
    the largest order up to ``order`` whose weights sum to at most :data:`EXTRAPOLATION_GAIN` in
    absolute value, or whose rounding estimate ``eps sum |w|`` is at most ten times the truncation
    estimate ``prod_{j < k - 1} |u_j|`` of the next lower order (for data of unit scale): the
    order drops only where rounding clearly dominates. ``eps`` is float32's, the precision models
    are evaluated in (also for float32 states under x64, whose grids are float64); for float64
    states the lower order costs less than ~1e-10 where it applies."""
    return _order_of(us, order, [lagrange_at_zero(us[:m]) for m in range(1, max_order + 1)])


def _order_of(us: list[Array], order: Array, weights: list[Array]) -> Array:
    """:func:`extrapolation_order` from the candidates' weights ``weights[m - 1] = lagrange_at_zero(us[:m])``."""
    eps = jnp.finfo(jnp.float32).eps
    ok, trunc = [], jnp.inf
    for m, w in enumerate(weights, start=1):
        gain = jnp.sum(jnp.abs(w))
        ok.append((m <= order) & ((gain <= EXTRAPOLATION_GAIN) | (eps * gain <= 10.0 * trunc)))
        trunc = jnp.abs(us[m - 1]) * (1.0 if m == 1 else trunc)
    return jnp.max(jnp.where(jnp.stack(ok), jnp.arange(1, len(weights) + 1), 1))


def extrapolation_weights(us: list[Array], order: Array, max_order: int) -> Array:
    """``[max_order]`` weights of the polynomial extrapolation to ``u = 0`` through the first
    ``k`` nodes ``us[:k]`` (zero-padded), ``k = extrapolation_order(us, order, max_order)``."""
    weights = [lagrange_at_zero(us[:m]) for m in range(1, max_order + 1)]
    cands = [jnp.concatenate([w, jnp.zeros((max_order - w.shape[0],), w.dtype)]) for w in weights]
    return select_order(_order_of(us, order, weights), cands)


def lagrange_basis(nodes: list[Array], x: Array) -> Array:
    """``[len(nodes), *x.shape]`` Lagrange basis polynomials through ``nodes`` evaluated at ``x``."""
    out = []
    for j, tj in enumerate(nodes):
        l = jnp.ones_like(x)
        for m, tm in enumerate(nodes):
            if m != j:
                l = l * (x - tm) / (tj - tm)
        out.append(l)
    return jnp.stack(out)


GL_X, GL_W = np.polynomial.legendre.leggauss(8)


def combine(coef_x: Array, x: Array, coefs_d: Array, ds) -> Array:
    """``coef_x x + sum_j coefs_d[j] ds[j]`` in the dtype of ``x``."""
    out = coef_x.astype(x.dtype) * x
    for j, d in enumerate(ds):
        out = out + coefs_d[j].astype(x.dtype) * d
    return out


def sqrt0(v: Array) -> Array:
    """``sqrt(max(v, 0))`` with a zero gradient where ``v <= 0`` (``jnp.sqrt``'s infinite slope at 0
    times a zero tangent gave NaN gradients, e.g. with respect to the grid's times wherever a noise
    coefficient vanishes: a step into sigma = 0, churn outside ``[s_tmin, s_tmax]``); NaN stays NaN."""
    pos = v > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), jnp.where(v <= 0, 0.0, v))  # (NaN stays NaN)


def nonzero(v: Array, fill=1.0) -> Array:
    """``v`` where finite and non-zero, else ``fill`` (safe denominators in unselected branches)."""
    return jnp.where(jnp.isfinite(v) & (v != 0), v, fill)


def phi(z: Array, k: int) -> Array:
    """``phi_k(z) = sum_n z^n / (n + k)!`` (``phi_0 = e^z``, ``phi_{k+1} = (phi_k - 1/k!) / z``),
    by its Taylor series for ``|z| < 1`` (the recursion cancels catastrophically there) and by
    the recursion elsewhere. Exponential-integrator weights are ``h phi_k(-h)`` polynomials.
    18 terms: the remainder ``|z|^18 / (18 + k)!`` is below float64's rounding for ``|z| < 1``
    (10 terms left ``1 / (10 + k)!``: relative errors up to 4e-8 for ``k = 1``, 5e-9 for ``k = 2``)."""
    small = jnp.abs(z) < 1.0
    zs = jnp.where(small, z, 0.5)
    series = jnp.zeros_like(zs)
    for n in reversed(range(18)):  # Horner
        series = series * zs + 1.0 / math.factorial(n + k)
    zr = jnp.where(small, 2.0, z)
    rec = jnp.exp(zr)
    for j in range(k):
        rec = (rec - 1.0 / math.factorial(j)) / zr
    return jnp.where(small, series, rec)
