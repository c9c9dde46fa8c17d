"""Posterior samplers for ``y = A(x0) + noise`` with a pretrained diffusion / flow prior.

Every sampler is a prior sampler (a base update from ``t`` to ``s < t`` along a time grid) plus a
measurement correction scaled by ``weight``; with ``weight = 0`` it is exactly its prior sampler
(:func:`prior_sample` with the same base, key and grid). One ``lax.scan``, one compiled program,
any path and prediction kind (the model is read through :class:`genflow.sampling.Model`).

Base updates, with ``(x0_hat, eps_hat)`` the model's prediction at ``(x_t, t)``:

* ``"ddim"`` (Song et al. 2021): ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z``,
  ``c = eta sigma_s sqrt(1 - SNR_t / SNR_s)``; ``eta = 1`` is DDPM's ancestral sampler,
  ``eta = 0`` the deterministic DDIM.
* ``"flow"`` (the FlowDPS authors' code, Kim et al. 2025): ``x_s = alpha_s x0_hat + sigma_s
  (sqrt(s) eps_hat + sqrt(1 - s) z)``. It refreshes a fraction ``1 - s`` of the noise at every
  step whatever the step size, so as a prior sampler it is not consistent: on the Gaussian
  oracle the sample covariance trace is 0.76 / 0.75 / 0.70 of the prior's at 50 / 200 / 800
  steps (``eps_hat = E[eps | x_t]`` has less than unit variance). FlowDPS here therefore uses
  the ``"ddim"`` base (``eta = 1`` refreshes the DDPM-consistent fraction
  ``1 - SNR_t / SNR_s``, which vanishes as steps shrink); pass ``base="flow"`` for the
  authors' rule.

Corrections:

* ``"dps"`` (Chung et al. 2023, Alg. 1): ``x_s <- x_s - scale * grad_{x_t} ||y - A(x0_hat(x_t))||``
  (the gradient of the residual norm, i.e. their ``zeta_t = zeta' / ||y - A x0_hat||`` rule on
  the squared norm up to a factor 2), differentiated through the network.
* ``"mcg"`` (Chung et al. 2022): the same gradient on the squared residual, followed by the
  projection ``x_s <- x_s + A^+(y_s - A x_s)`` onto the noised measurement
  ``y_s = alpha_s y + sigma_s A z``. The gradient step can hurt with a correlated prior: on a
  6-D Gaussian with full covariance (mask of 3 coordinates, ``sigma_y = 0``, 100 steps, 2,000
  samples) the sample mean lands 2.6 (vp_cosine) / 4.0 (linear) from the posterior mean at the
  default ``scale = 1``, farther than the prior's own mean (1.7), against 0.26 / 0.27 with
  ``scale = 0`` (the projection alone) and 0.76 / 1.25 at 0.3; with an isotropic prior every
  scale gives 0.03. Tune ``scale`` (0 is often best at ``sigma_y = 0``).
* ``"flowdps"`` (Kim et al. 2025): ``dc_steps`` gradient-descent steps of size
  ``scale / ||A||^2`` on ``||y - A x0||^2 / 2`` taken on the clean estimate (no backpropagation through the network),
  blended as ``x0 <- x0_hat + t (x0_dc - x0_hat)``; the noise component ``eps_hat`` is
  partly refreshed with fresh noise by the base update. The authors' code steps on the norm
  ``||y - A x0||`` (unit-length gradient, step sizes tuned for 768-pixel images); plain gradient
  descent on the squared residual, with the step divided by its largest curvature (``||A||^2``
  times the noise model's ``curvature()``: 1 for Gaussian, ``rate / 8`` for Poisson), is
  step-size stable (``scale < 2``) for every operator and image size, so we use it. Larger
  scales are allowed (the few damped steps can still help weak directions: 2.6 was the best on
  deblurring and compressed sensing in ``experiments/inverse.py``), and diverge somewhat above
  (NaN samples at 4.5 there).
* ``"ddnm"`` (Wang et al. 2023): range-null-space projection of the clean estimate
  ``x0 <- x0_hat + A^+(y - A x0_hat)`` (linear operators), then the ``"ddim"`` update with the
  noise estimate made consistent with the corrected ``x0``.
* ``"pigdm"`` (Song et al. 2023, "Pseudoinverse-guided diffusion models") and ``"tmpd"`` (Boys et
  al. 2024, "Tweedie moment projected diffusions"): the measurement likelihood is approximated by
  ``p(y | x_t) ~ N(y; A x0_hat, A C_t A^T + sigma_y^2 I)``, a Gaussian ``p(x0 | x_t)`` with
  covariance ``C_t``, and its score ``g = J^T A^T (A C_t A^T + sigma_y^2 I)^-1 (y - A x0_hat)``
  (``J = d x0_hat / d x_t``, one vector-Jacobian product) is added to the model's score:
  ``x0 <- x0_hat + (sigma_t^2 / alpha_t) g``, ``eps <- eps_hat - sigma_t g``, then the base
  update. These two use the measurement noise level ``sigma_y`` (``GaussianNoise(sigma_y)``).
  ``pigdm``: ``C_t = r_t^2 I`` with ``r_t^2 = v sigma_t^2 / (alpha_t^2 v + sigma_t^2)``, the
  posterior variance for a prior ``N(., v I)`` (``data_var = v``). ``tmpd``: Tweedie's
  second-moment identity ``C_t = Cov[x0 | x_t] = (sigma_t^2 / alpha_t) J``, applied through the
  symmetric part ``(J + J^T) / 2`` (one JVP and one VJP; a learned model's ``J`` is not
  symmetric). The linear system is solved per example by ``cg_iters`` iterations of conjugate
  gradients, stopped where a search direction shows ``C_t`` is not positive definite (a learned
  model's need not be: on digits, plain CG made TMPD worse than the pseudo-inverse).
  For a Gaussian prior with its exact model, ``tmpd``'s ``p(y | x_t)`` is exact (``pigdm``'s too
  when the prior is ``N(mu, v I)``), so the sampler follows the exact conditional score and
  samples the exact posterior up to the time discretization (tested on the oracle at
  ``sigma_y = 0.1``) and the CG truncation: ``cg_iters`` must resolve ``A C_t A^T + sigma_y^2 I``,
  which for an ill-conditioned operator at a small ``sigma_y`` takes more than the default 10
  (a 16-pixel blur at ``sigma_y = 0.01``: whitened mean error 0.33 at 10 iterations, 0.05 at 16;
  at ``sigma_y = 1e-3`` 0.95 at 10 and 0.05 at 30), a bias that more steps do not remove.
  Along directions measured more precisely than the noise level of the last grid time, the
  samples lose their spread (the last step returns ``E[x0 | x_t, y]``, which keeps a fraction
  ``sigma_y^2 / (sigma_y^2 + sigma_t^2)`` of the posterior variance there): at ``sigma_y = 1e-3``
  that needs a grid ending well below ``sigma_t = 1e-3``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from genflow import _memo, param
from genflow._checks import (check_denoise, check_int, check_key, check_model_fn, check_positive_real, check_real_in,
                             concrete_real, real_leaf)
from genflow.inverse.operators import GaussianNoise, Operator, PoissonNoise
from genflow.paths import Path, check_path
from genflow.sampling import Model, as_pytree_fn
from genflow.sampling._core import _run_path
from genflow.sampling._grid import default_denoise, noisy_end, sampler_grid

Array = jax.Array

METHODS = {"dps": "ddim", "mcg": "ddim", "ddnm": "ddim", "flowdps": "ddim", "pigdm": "ddim",
           "tmpd": "ddim"}  # default base per method
DEFAULTS = {
    "dps": dict(scale=1.0, eta=1.0),
    "mcg": dict(scale=1.0, eta=1.0),
    "ddnm": dict(eta=0.85),
    "flowdps": dict(scale=1.0, dc_steps=3, eta=1.0),
    "pigdm": dict(scale=1.0, eta=1.0, data_var=1.0, cg_iters=10),
    "tmpd": dict(scale=1.0, eta=1.0, cg_iters=10),
}
_STATIC = ("dc_steps", "cg_iters")  # loop counts: a new value compiles anew
_GAUSSIAN_LIKELIHOOD = ("pigdm", "tmpd")  # the methods that use the noise level
_MIN_LOG_SNR = math.log(1e-4)  # tmpd's and pigdm's default start for eps / score models

__all__ = ["posterior_sample", "prior_sample", "posterior_model", "PosteriorModel", "PosteriorInfo", "METHODS",
           "DEFAULTS"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PosteriorInfo:
    """``nfe``: network evaluations (forward passes; ``dps``/``mcg``/``pigdm``/``tmpd`` also
    backpropagate through each one); ``vjp``: network vector-Jacobian products; ``ts``: the time
    grid; ``jvp``: network Jacobian-vector products (``tmpd``'s conjugate-gradient iterations)."""

    nfe: Array
    vjp: Array
    ts: Array
    jvp: Array


def _base_update(path: Path, base: str, x0: Array, eps: Array, t, s, z: Array, eta) -> Array:
    a_s, sg_s = path.alpha(s), path.sigma(s)
    if base == "ddim":
        ratio = jnp.exp(jnp.minimum(path.log_snr(t) - path.log_snr(s), 0.0))  # SNR_t / SNR_s <= 1
        c = eta * sg_s * jnp.sqrt(jnp.clip(1.0 - ratio, 0.0, 1.0))
        return a_s * x0 + jnp.sqrt(jnp.clip(sg_s * sg_s - c * c, 0.0, None)) * eps + c * z
    # "flow": FlowDPS's renoising, eps <- sqrt(s) eps_hat + sqrt(1 - s) z
    return a_s * x0 + sg_s * (jnp.sqrt(s) * eps + jnp.sqrt(1.0 - s) * z)


def _step_fn(model: Model, method: str | None, base: str, y, op: Operator, noise, weight, hp: dict):
    path = model.path
    eta = hp.get("eta", 1.0)

    def step(x, t, s, key, final=False):
        """One step from ``t`` to ``s``; where ``final`` (traced; not for dps / mcg), the method's
        ``x0`` at ``t`` instead (:func:`final`'s, for the denoising step as the loop's last iteration)."""
        kz, ky = jax.random.split(key)
        z = jax.random.normal(kz, x.shape, x.dtype)
        if method in ("dps", "mcg"):
            squared = method == "mcg"

            def dist(xx):
                x0, eps = model.x0_eps(xx, t)
                r = noise.residual_norm(y, op.forward(x0))
                return jnp.sum(r * r if squared else r), (x0, eps)

            g, (x0, eps) = jax.grad(dist, has_aux=True)(x)
            x_new = _base_update(path, base, x0, eps, t, s, z, eta) - (weight * hp["scale"]) * g
            if method == "mcg":
                y_s = path.alpha(s) * y + path.sigma(s) * op.forward(jax.random.normal(ky, x.shape, x.dtype))
                x_new = x_new + weight * op.pinv(y_s - op.forward(x_new))
            return x_new
        x0, eps = corrected(x, t)
        if final is False:
            return _base_update(path, base, x0, eps, t, s, z, eta)
        # (the discarded step's times without derivative: at t = s its noise coefficient
        # sqrt(1 - SNR_s / SNR_t) has an infinite slope, and 0 * inf made d/d ts[-1] NaN)
        t_b, s_b = (jnp.where(final, jax.lax.stop_gradient(v), v) for v in (t, s))
        return jnp.where(final, x0, _base_update(path, base, x0, eps, t_b, s_b, z, eta))

    def corrected(x, t):
        """The method's ``(x0, eps)`` at ``(x, t)`` (the prior's for dps and none)."""
        if method in _GAUSSIAN_LIKELIHOOD:
            return _likelihood_guided(model, method, x, t, y, op, noise.sigma, weight, hp)
        x0, eps = model.x0_eps(x, t)
        if method in ("ddnm", "mcg"):  # (mcg only in the final denoise: its steps project x_s instead)
            delta = weight * op.pinv(y - op.forward(x0))
            x0 = x0 + delta
            eps = eps - (path.alpha(t) / path.sigma(t)) * delta  # keeps x_t = alpha x0 + sigma eps
        elif method == "flowdps":
            def dc_grad(v):  # gradient of 0.5 ||y - A v||^2 (per example), no network involved
                return jax.grad(lambda u: 0.5 * jnp.sum(noise.residual_norm(y, op.forward(u)) ** 2))(v)

            # stable for scale < 2: the step is scaled by the largest curvature of the data term,
            # ||A||^2 times the noise model's largest weight (1 for Gaussian, rate / 8 for Poisson)
            # (an operator that observes nothing, e.g. an all-zero mask, has ||A||^2 = 0: no step, not inf * 0)
            curv = op.norm_sq() * getattr(noise, "curvature", lambda: 1.0)()
            lr = jnp.where(curv > 0, hp["scale"] / jnp.where(curv > 0, curv, 1.0), 0.0)
            lr = lr.astype(x0.dtype)  # (a float64 ||A||^2 under x64 promoted a float32 carry: a scan type error)
            x0_dc = jax.lax.fori_loop(0, hp["dc_steps"], lambda _, v: v - lr * dc_grad(v), x0)
            x0 = x0 + (weight * t) * (x0_dc - x0)
        return x0, eps

    def final(x, t):
        """The final denoise (paths that end at sigma > 0): the method's x0, which keeps the
        measurement (the prior's x0 there undid ddnm's / mcg's / tmpd's consistency, ~0.03 in A x)."""
        return corrected(x, t)[0]

    return step, final


def _likelihood_guided(model: Model, method: str, x, t, y, op: Operator, sigma_y, weight, hp: dict):
    """``(x0, eps)`` of the conditional score ``score(x_t) + weight * scale * g`` (pigdm / tmpd)."""
    path = model.path
    a, sg = path.alpha(t), path.sigma(t)  # scalars, or [B] for a per-example t
    live = a > 0  # at alpha = 0, x_t holds no information about x0: no correction
    c_scale = jnp.where(live, sg * sg / jnp.where(live, a, 1.0), 0.0)  # Cov[x0 | x_t] = (sigma^2 / alpha) J
    def x0_eps(xx):
        return model.x0_eps(xx, t)

    if method == "tmpd":
        x0, jvp_fn, eps = jax.linearize(x0_eps, x, has_aux=True)
        vjp_fn = jax.linear_transpose(jvp_fn, x)

        def cov(w):  # A C_t A^T w, C_t = (sigma^2 / alpha) (J + J^T) / 2
            v = op.adjoint(w)
            return _col(0.5 * c_scale, w) * op.forward(jvp_fn(v) + vjp_fn(v)[0])
    else:
        x0, vjp_fn, eps = jax.vjp(x0_eps, x, has_aux=True)
        v = hp["data_var"]
        r2 = v * sg * sg / (a * a * v + sg * sg)

        def cov(w):
            return _col(r2, w) * op.forward(op.adjoint(w))

    sy2 = jnp.asarray(sigma_y, x.dtype) ** 2
    resid = y - op.forward(x0)
    # Only the residual's part in range(A) matters: outside it, A C_t A^T = 0, the solution is
    # r_out / sigma_y^2 (huge for little noise, undefined without), and A^T removes it from g.
    # Left in, it spoiled CG's step sizes (errors of 10-160 at sigma_y = 1e-4, NaN at 0). y has
    # such a part whenever its noise falls outside range(A) (a mask's unobserved pixels).
    u = _batched_cg(cov, sy2, op.range_projection(resid), hp["cg_iters"])
    (g,) = vjp_fn(op.adjoint(u))
    g = _col(jnp.where(live, weight * hp["scale"], 0.0), g) * g
    return x0 + _col(c_scale, g) * g, eps - _col(sg, g) * g


def _col(v, like: Array) -> Array:
    """A scalar or ``[B]`` coefficient shaped to broadcast against ``like: [B, ...]``."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)).astype(like.dtype)


def _batched_cg(cov: Callable, shift, b: Array, iters: int) -> Array:
    """``iters`` conjugate-gradient iterations on ``(cov + shift I) u = b``, one system per
    example (leading axis); ``cov`` is a covariance (positive semi-definite) operator.

    ``jax.scipy.sparse.linalg.cg`` would solve the batch as one block-diagonal system, with
    shared step sizes (slower convergence, one example's errors reach all). Here each example has
    its own, and an example stops where the search direction shows ``cov`` is not positive
    definite, ``p^T cov p <= 0`` up to rounding (below 1e-6 of the first direction's Rayleigh
    quotient; truncated CG, as in Steihaug's trust-region method): with a
    learned model, ``cov`` from its Jacobian need not be (on digits, the Rayleigh quotients of
    ``C_t`` near t = 1 were -49..186 where the data variance is 0.57), and plain CG then
    diverged.
    """
    axes = tuple(range(1, b.ndim))

    def dot(a, c):
        return jnp.sum(a * c, axis=axes, keepdims=True)

    dtype = b.dtype
    shift = jnp.asarray(shift, dtype)
    tiny = jnp.asarray(jnp.finfo(dtype).eps, dtype) ** 2  # a residual at rounding level of |b| = 1

    def body(i, carry):
        u, r, p, rr, active, floor = carry
        cp = cov(p).astype(dtype)
        pcp, pp = dot(p, cp), dot(p, p)
        mp = cp + shift * p
        pmp = pcp + shift * pp
        # not positive, or positive only at rounding level: 1e-6 of the first direction's
        # (p = b's) Rayleigh quotient, taken from the first iteration's own product
        floor = jnp.where(i == 0, 1e-6 * jnp.maximum(pcp / jnp.where(pp > 0, pp, 1.0), 0.0), floor)
        active = active & (pcp > floor * pp) & (rr > tiny)
        alpha = jnp.where(active, rr / jnp.where(active, pmp, 1.0), 0.0).astype(dtype)
        u, r = u + alpha * p, r - alpha * mp
        rr_new = dot(r, r)
        beta = jnp.where(active, rr_new / jnp.where(active, rr, 1.0), 0.0).astype(dtype)
        return u, r, r + beta * p, rr_new, active, floor

    # Solved for b / |b| (per example) and scaled back, with a system frozen once its residual is at
    # rounding level: past convergence rr and p M p kept shrinking, and their squares in the backward
    # pass of rr / pmp underflowed to 0 (inf * 0: all-NaN gradients with respect to y and x1 whenever
    # the measurement rank was below iters, while the samples were finite).
    bb = dot(b, b)
    norm = jnp.sqrt(jnp.where(bb > 0, bb, 1.0)).astype(dtype)
    b = b / norm
    rr = dot(b, b)
    init = (jnp.zeros_like(b), b, b, rr, rr > tiny, jnp.zeros_like(rr))
    return jax.lax.fori_loop(0, iters, body, init)[0] * norm


@_memo.filter_jit
def _run(model: Model, ts: Array, x1: Array, key: Array, method, base, y, op, noise, weight, hp, denoise, noisy,
         classes=None):
    # ``classes = (type(op), type(noise))``, static: JAX treats the treedefs of two dataclass types
    # with the same fields as equal, and a GaussianNoise run reused the program compiled for
    # PoissonNoise (reading sigma as the rate: NaN samples at sigma 0)
    del classes
    if y is not None:  # (shapes only, checked when traced: the compiled program is keyed by them)
        expected = jax.eval_shape(op.forward, x1)
        if y.shape != expected.shape:
            raise ValueError(f"y.shape={y.shape} does not match operator.forward(x) of shape {expected.shape}")
    step, final = _step_fn(model, method, base, y, op, noise, weight, hp)
    n = ts.shape[0] - 1
    keys = jax.random.split(key, n)
    x = x1.astype(jnp.promote_types(x1.dtype, jnp.float32))
    # The final denoising step as the loop's last iteration (t = s = ts[-1]; its noise unused): one
    # copy of the network (and of its VJP / JVP) in the program, not a second one after the loop.
    # Not for DPS and MCG, which step with a gradient that their final x0 does not take (a wasted
    # backward pass), nor at sigma(ts[-1]) = 0 (``noisy`` False: noisy_end), where the discarded
    # step's eps has an infinite derivative (NaN gradients from its zero cotangent).
    fold = denoise and noisy and method not in ("dps", "mcg")
    t_from, t_to, last = ts[:-1], ts[1:], jnp.zeros((n,), bool)
    if fold:
        t_from, t_to, keys = ts, jnp.concatenate([t_to, ts[-1:]]), jnp.concatenate([keys, keys[-1:]])
        last = jnp.arange(n + 1) == n

    def body(x, inp):
        t, s, k, end = inp
        # (x64: the path's scalars are float64)
        return step(x, t, s, k, end if fold else False).astype(x.dtype), None

    x, _ = jax.lax.scan(body, x, (t_from, t_to, keys, last))
    if denoise and not fold:
        x = final(x, ts[-1]).astype(x.dtype)
    nfe = jnp.asarray(n + int(denoise), jnp.int32)
    # per step: one VJP for the gradient methods; tmpd's CG iterations add one JVP and one VJP
    # each (the symmetrised Jacobian); the final denoise of pigdm / tmpd is one more such step
    cg = hp["cg_iters"] if method == "tmpd" else 0
    likelihood_end = int(denoise and method in _GAUSSIAN_LIKELIHOOD)
    vjp = (n * (1 + cg) if method in ("dps", "mcg") + _GAUSSIAN_LIKELIHOOD else 0) + likelihood_end * (1 + cg)
    vjp = jnp.asarray(vjp, jnp.int32)
    jvp = jnp.asarray((n + likelihood_end) * cg, jnp.int32)
    return x.astype(x1.dtype), PosteriorInfo(nfe=nfe, vjp=vjp, ts=ts, jvp=jvp)


def _check_weight_scale(weight, hparams: dict) -> None:
    # one value for the batch: a per-example [B] weight or scale broadcast against x's last (channel)
    # axis (silently weighting channels where C == B, a scan-carry error otherwise)
    _check_scalar_real("weight", weight)
    if "scale" in hparams:
        _check_scalar_real("scale", hparams["scale"])


def _prepare(fn, path, x1, prediction, steps, schedule, t_start, t_end, key, snr_start: bool = False):
    """``(model, ts, denoise, noisy)``: the model, the checked time grid, the default ``denoise``
    and whether the grid ends at ``sigma > 0`` (:func:`noisy_end`: where the final denoise may be
    the loop's last iteration).

    The grid and the decisions made on the host with it (the default ``t_start``, the refusal of
    an ``eps`` / ``score`` start at ``alpha = 0``, the default ``denoise``, ``noisy``) are kept in
    ``gf.sample``'s memo (:func:`genflow._memo.memoised`) under the path, grid arguments,
    ``prediction`` and ``snr_start`` (``tmpd`` / ``pigdm``: start an ``eps`` / ``score`` model
    where the SNR is 1e-4); a repeat call reads nothing back from the device for them."""
    param.check_kind(prediction)
    check_path(path)
    if key is None:
        raise ValueError("posterior and prior samplers here are stochastic: pass key=jax.random.key(...)")
    check_key(key)
    if not hasattr(x1, "ndim") or x1.ndim < 2:
        raise ValueError(f"x1 must be an array [B, ...]; got {getattr(x1, 'shape', type(x1).__name__)}")
    if not jnp.issubdtype(x1.dtype, jnp.floating):  # (int x1 came back truncated to ints)
        raise TypeError(f"x1 must be a floating-point array; got dtype {x1.dtype}")
    parts = (_memo.path_key(path), _memo.schedule_key(schedule), _memo.value_key(steps), _memo.value_key(t_start),
             _memo.value_key(t_end))
    ts, denoise, noisy = _memo.memoised("gf.inverse", parts, (prediction, bool(snr_start)),
                                        lambda: _grid(path, prediction, steps, schedule, t_start, t_end, snr_start))
    return Model(as_pytree_fn(check_model_fn(fn)), _run_path(path), prediction), ts, denoise, noisy


def _grid(path, prediction, steps, schedule, t_start, t_end, snr_start: bool):
    """:func:`_prepare`'s ``(ts, default denoise, noisy)``, built afresh (under ``ensure_compile_time_eval``:
    a Python float under the caller's jit too)."""
    if snr_start and t_start is None and prediction in ("eps", "score") and _derived_grid(schedule):
        # An eps/score model holds Cov[x0 | x_t] in the deviation of its Jacobian from I / sigma,
        # of relative size ~SNR: below SNR 1e-4 float32 cancellation swamps it (on the oracle,
        # tmpd's motion blur from alpha = 5e-4 went astray as cg_iters grew; pigdm, which also
        # back-propagates through x0 = (x - sigma eps) / alpha, with a bfloat16 eps model gave
        # posterior variances 8-18x too large). Start where SNR = 1e-4.
        if float(path.log_snr(1.0)) < _MIN_LOG_SNR:
            t_start = float(path.t_from_log_snr(_MIN_LOG_SNR))
    if t_start is None and _derived_grid(schedule):
        # eps/score models are 0/0 where alpha = 0 (t = 1 on the linear path): start just before
        # (an explicit grid brings its own start)
        t_start = 1.0 if float(path.alpha(1.0)) > 0 else 0.999
    ts = sampler_grid(path, steps, schedule, t_start, t_end)
    try:  # (a traced grid, e.g. an explicit schedule traced by the caller: unchecked there, as in gf.sample)
        alpha0 = float(path.alpha(jnp.asarray(ts[0])))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        alpha0 = None
    if prediction in ("eps", "score") and alpha0 == 0.0:
        raise ValueError(f"t_start={float(ts[0])} has alpha=0 on path {path.name!r}, where the {prediction} -> x0 "
                         f"conversion is singular; start slightly earlier (e.g. t_start=0.999, or leave t_start=None)")
    return ts, default_denoise(path, ts, t_end), noisy_end(path, ts)


def _derived_grid(schedule) -> bool:
    """Whether ``schedule`` is a name or a callable, which take ``t_start`` (an explicit array of
    times brings its own start, and a ``t_start`` passed with it must agree with it)."""
    return isinstance(schedule, str) or callable(schedule) and not hasattr(schedule, "shape")


def prior_sample(fn: Callable, path: Path, x1: Array, *, prediction: str, steps: int = 100, key: Array,
                 base: str = "ddim", eta: float = 1.0, schedule: Any = "uniform", t_start: float | None = None,
                 t_end: float | None = None, denoise: bool | None = None) -> tuple[Array, PosteriorInfo]:
    """The unconditional sampler underlying the posterior samplers (``base``: ``"ddim"`` with
    ``eta`` or FlowDPS's ``"flow"``, which takes no ``eta``). Same arguments as
    :func:`posterior_sample`."""
    if base not in ("ddim", "flow"):
        raise ValueError(f"base must be 'ddim' or 'flow'; got {base!r}")
    check_real_in("eta", eta, 0.0, 1.0)  # (traced values, e.g. under vmap, pass)
    if base == "flow" and concrete_real(eta) != 1.0 and not isinstance(eta, jax.core.Tracer):
        raise ValueError(f"eta applies to the 'ddim' base only (base='flow' ignored it); got eta={eta!r}")
    check_denoise(denoise)
    model, ts, default, noisy = _prepare(fn, path, x1, prediction, steps, schedule, t_start, t_end, key)
    denoise = default if denoise is None else denoise
    # (no measurement: y = None, which the prior's steps never read)
    return _run(model, ts, x1, key, None, base, None, _NO_OP, _PRIOR_NOISE, _leaf(0.0), dict(eta=_leaf(eta)),
                bool(denoise), noisy)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _NoOp(Operator):
    def forward(self, x):
        return jnp.zeros((x.shape[0], 1), x.dtype)

    def adjoint(self, y):
        raise NotImplementedError

    def pinv(self, y):
        raise NotImplementedError


_NO_OP = _NoOp()
_PRIOR_NOISE = GaussianNoise(1.0)  # (a Python float: static, like the compiled program it selects)


def _leaf(value):
    """:func:`real_leaf`, with a Python number as a kept 0-d array (:func:`genflow._memo.kept_scalar`,
    the same value): for the hyper-parameters handed to :func:`_run` only, never returned."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _memo.kept_scalar(value)
    return real_leaf(value)


def posterior_sample(
    fn: Callable,
    path: Path,
    x1: Array,
    y: Array,
    operator: Operator,
    *,
    prediction: str,
    method: str = "dps",
    noise=None,
    steps: int = 100,
    key: Array,
    weight: float = 1.0,
    base: str | None = None,
    schedule: Any = "uniform",
    t_start: float | None = None,
    t_end: float | None = None,
    denoise: bool | None = None,
    **hparams,
) -> tuple[Array, PosteriorInfo]:
    """Sample ``p(x0 | y)`` for ``y = A(x0) + noise`` with a prior model ``fn``.

    Returns after the device has finished, and caches compiled programs as :func:`genflow.sample`
    does (a plain function ``fn`` keyed by identity; see there).

    Args:
      fn: prior model ``fn(x: [B, ...], t: [B])`` of kind ``prediction``.
      path: the path the model was trained with.
      x1: ``[B, ...]`` starting noise at ``t_start``.
      y: ``[B, ...]`` measurements (``operator.forward(x0) + noise``).
      operator: a :class:`genflow.inverse.Operator` (``A``, ``A^T``, ``A^+``).
      method: ``"dps" | "mcg" | "flowdps" | "ddnm" | "pigdm" | "tmpd"`` (see the module
        docstring).
      noise: the measurement noise model (default ``GaussianNoise(0)``). ``pigdm`` and ``tmpd``
        need a ``GaussianNoise`` and use its level ``sigma`` (traced: a new value does not
        recompile; the residual ``y - A x0_hat`` is projected onto the range of ``A``
        (:meth:`Operator.range_projection`, which changes nothing in exact arithmetic), so
        ``sigma = 0`` and noise outside the range are fine). For the other methods its
        ``residual_norm`` is the distance the gradient methods step on, and its noise *level* is
        not used: ``GaussianNoise(sigma)`` gives the same samples for every ``sigma`` (DPS and
        MCG absorb it into ``scale``, DDNM here is the noiseless one, FlowDPS uses only the
        Poisson weights). With noisy measurements those samplers over-fit ``y``: on the
        linear-Gaussian oracle with ``A = I``, prior N(0, I) and ``sigma_y = 0.3`` their samples
        centre on ``y`` rather than on the posterior mean ``y / 1.09``, where the posterior's
        variance is 0.083 (in 2-D, 100 steps, 2,000 samples): MCG and DDNM return ``y`` itself
        (variance 0), FlowDPS samples near it (variance 0.01-0.02 on linear / vp_cosine) and DPS
        (default ``scale``, a unit-norm step, so its spread depends on the dimension) around it
        (0.16-0.18 here); ``pigdm`` / ``tmpd`` centre on ``y / 1.09`` with variance 0.076. Use
        those, or tune ``scale`` / ``weight``.
      steps, schedule, t_start, t_end: the time grid (:func:`genflow.sampling.time_grid`);
        ``t_start`` defaults to 1 (0.999 where ``alpha(1) = 0``); for ``tmpd`` and ``pigdm`` with
        an ``eps`` or ``score`` model, to the time where the SNR ``alpha^2 / sigma^2`` is 1e-4
        when it is lower at 1 (VP and linear paths): that model's Jacobian holds ``Cov[x0 | x_t]``
        only in a deviation of relative size ~SNR, which float32 (and more so bfloat16)
        cancellation swamps below that. With a *trained* eps network, ``pigdm`` can still blow up
        from that start (a 2-D toy MLP: samples of 1e4-1e7 from t ~ 0.99, sensible from 0.95):
        the conversion to x0 divides the network's own error by ``alpha`` (~1/100 there); pass a
        smaller ``t_start`` (e.g. 0.95) if its samples diverge. ``tmpd`` held up in the same test.
        The grid is built on the host and kept for repeat calls with equal arguments, as
        :func:`genflow.sample`'s (a loop over batches pays for it once).
      key: PRNG key (all methods inject noise).
      weight: measurement weight; 0 gives the prior sampler exactly.
      base: the underlying prior update, ``"ddim"`` or ``"flow"`` (default per method:
        :data:`METHODS`).
      denoise: finish with the method's own x0 estimate at the last time (the prior's Tweedie
        denoiser corrected as in the method's steps; default ``path.denoise_at_end``, False for a
        partial solve ending above ``path.t_min``). All methods but ``dps`` / ``mcg`` take it as
        the last iteration of their loop where ``sigma(t_end) > 0`` (no second copy of the network
        in the compiled program).
      **hparams: ``scale`` (gradient step; for ``pigdm`` / ``tmpd`` a multiplier of the
        likelihood score, 1 = the model's own likelihood), ``eta`` (ddim base), ``dc_steps``
        (flowdps), ``data_var`` (pigdm: the prior variance ``v`` in ``r_t^2``, > 0), ``cg_iters``
        (pigdm, tmpd: conjugate-gradient iterations, >= 1); defaults in :data:`DEFAULTS`.
        ``scale``, ``eta`` and ``data_var`` are traced (changing them does not recompile);
        ``dc_steps`` and ``cg_iters`` are loop counts (a new value compiles anew).
    Returns:
      ``(x0, info)`` with ``x0: [B, ...]`` and a :class:`PosteriorInfo`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    y = jnp.asarray(y)  # (a list of measurements, which posterior_model takes, failed on y.shape)
    if y.ndim < 1:  # (an IndexError at y.shape[0])
        raise ValueError(f"y must be [B, ...] measurements; got shape {y.shape}")
    if not (jnp.issubdtype(y.dtype, jnp.floating) or jnp.issubdtype(y.dtype, jnp.integer)):
        raise TypeError(f"y must be real measurements; got dtype {y.dtype}")  # (a complex y lost its imaginary part)
    base = METHODS[method] if base is None else base
    if base not in ("ddim", "flow"):
        raise ValueError(f"base must be 'ddim' or 'flow'; got {base!r}")
    if base == "flow" and "eta" in hparams:  # (ignored: the flow base injects no ddim noise)
        raise ValueError(f"eta applies to the 'ddim' base only; method {method!r} runs base='flow' here")
    if not isinstance(operator, Operator):
        raise TypeError(f"operator must be a genflow.inverse.Operator; got {type(operator).__name__}")
    _check_operator(operator)
    model, ts, default, noisy = _prepare(fn, path, x1, prediction, steps, schedule, t_start, t_end, key,
                                  snr_start=method in _GAUSSIAN_LIKELIHOOD)
    if y.shape[0] != x1.shape[0]:
        raise ValueError(f"y and x1 need the same batch size; got y.shape={y.shape}, x1.shape={x1.shape}")
    # (y against operator.forward(x1)'s shape: checked by _run when traced, once per shapes)
    _check_weight_scale(weight, hparams)
    hp = _hyperparameters(method, DEFAULTS[method], hparams, _leaf)
    check_denoise(denoise)
    denoise = default if denoise is None else denoise
    noise = _noise_model(method, noise, _leaf)
    return _run(model, ts, x1, key, method, base, y.astype(x1.dtype), operator, noise,
                _leaf(weight), hp, bool(denoise), noisy, (type(operator), type(noise)))


def _hyperparameters(method: str, defaults: dict, hparams: dict, leaf: Callable = real_leaf) -> dict:
    """``defaults`` updated by ``hparams`` (checked): traced values (``leaf``: :func:`real_leaf`),
    static loop counts."""
    unknown = set(hparams) - set(defaults)
    if unknown:
        raise ValueError(f"method {method!r} takes hyper-parameters {sorted(defaults)}; got {sorted(unknown)}")
    hp = {**defaults, **hparams}
    static = {k: hp.pop(k) for k in _STATIC if k in hp}
    for k, v in static.items():
        check_int(k, v, 1 if k == "cg_iters" else 0)
    if "eta" in hp:
        check_real_in("eta", hp["eta"], 0.0, 1.0)
    scale = concrete_real(hp.get("scale")) if "scale" in hp else None
    if scale is not None and not isinstance(hp["scale"], jax.core.Tracer) and not scale >= 0.0:
        # (a negative scale climbed the misfit, silently. flowdps's scale is not capped at its
        # stability bound 2: with its few damped steps 2.6 was the best on deblurring and
        # compressed sensing in experiments/inverse.py, and NaN samples show divergence, 4.5 there)
        raise ValueError(f"method {method!r}: scale must be >= 0; got {hp['scale']!r}")
    if "data_var" in hp:  # (traced values, e.g. under the caller's jit or vmap, pass)
        check_positive_real("data_var", hp["data_var"])
    hp = {k: leaf(v) for k, v in hp.items()}  # (float32 capped float64 tmpd / pigdm at ~1e-8)
    hp.update({k: int(v) for k, v in static.items()})  # static loop counts (a new value compiles anew)
    return hp


def _check_scalar_real(name: str, value) -> None:
    """A ``ValueError`` naming ``name`` unless ``value`` is a real scalar (finite where concrete)."""
    ok = jnp.ndim(value) == 0 if isinstance(value, (jax.core.Tracer, jax.Array)) else True
    v = concrete_real(value)
    if not ok or (not isinstance(value, jax.core.Tracer) and (v is None or not math.isfinite(v))):
        raise ValueError(f"{name} must be a finite real scalar (one value for the whole batch); got {value!r}")


def _noise_model(method: str, noise, leaf: Callable = real_leaf):
    """The measurement noise model (default ``GaussianNoise(0)``), with a traced level (``leaf``:
    :func:`real_leaf`)."""
    noise = GaussianNoise(0.0) if noise is None else noise
    if method in _GAUSSIAN_LIKELIHOOD and not isinstance(noise, GaussianNoise):
        raise ValueError(f"method {method!r} uses a Gaussian measurement likelihood: noise must be a "
                         f"GaussianNoise(sigma); got {type(noise).__name__}")
    if not callable(getattr(noise, "residual_norm", None)):  # (a bare 0.1 failed deep inside the sampler)
        raise TypeError(f"noise must be a noise model such as GaussianNoise(sigma) or PoissonNoise(rate); "
                        f"got {noise!r}")
    level = getattr(noise, "sigma", getattr(noise, "rate", None))
    if isinstance(noise, (GaussianNoise, PoissonNoise)) and jnp.ndim(level) != 0:
        # (a per-example [B] level broadcast against x's last (channel) axis in the CG shift)
        raise ValueError(f"{type(noise).__name__}: the noise level must be a scalar; got shape {jnp.shape(level)}")
    # a traced level: sweeping sigma_y / the rate does not recompile (the models check their own
    # concrete levels when built: a negative rate made flowdps climb the misfit, 0 gave NaN)
    if isinstance(noise, GaussianNoise):
        noise = GaussianNoise(leaf(noise.sigma))
    elif isinstance(noise, PoissonNoise):
        noise = PoissonNoise(leaf(noise.rate))
    return noise


_OPERATOR_RECIPE = ("write it as a frozen dataclass registered with @jax.tree_util.register_dataclass (array fields "
                    "traced, others marked static: dataclasses.field(metadata=dict(static=True))), or register it as "
                    "a pytree, as the built-in Mask and Matrix do; see genflow.inverse.Operator")


def _check_operator(operator) -> None:
    """``TypeError`` for an operator that is not a pytree (so compiled as a static, hashed argument) but
    holds arrays -- each new array would be ignored (a plain class, keyed by identity) or unhashable (a
    frozen dataclass: "Non-hashable static arguments are not supported" deep in JAX)."""
    leaves = jax.tree_util.tree_leaves(operator)
    if not (len(leaves) == 1 and leaves[0] is operator):
        return  # a pytree: its array leaves are traced
    held = [k for k, v in getattr(operator, "__dict__", {}).items()
            if any(isinstance(a, (jax.Array, np.ndarray)) for a in jax.tree_util.tree_leaves(v))]
    name = type(operator).__name__
    if held:
        raise TypeError(f"operator {name} is not a pytree but holds arrays ({', '.join(held)}): they would be "
                        f"compiled in as constants (a later change ignored, or unhashable); {_OPERATOR_RECIPE}")
    try:
        hash(operator)
    except TypeError as e:
        raise TypeError(f"operator {name} is not a pytree, so it is a static argument, and it is unhashable ({e}); "
                        f"{_OPERATOR_RECIPE}") from None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PosteriorModel:
    """``fn(x, t) -> E[x0 | x_t, y]``: the denoiser of the posterior ``p(x0 | y)`` under the
    Gaussian approximation of ``p(y | x_t)`` of ``pigdm`` / ``tmpd``, an ``x0`` model for
    :func:`genflow.sample` (built by :func:`posterior_model`)."""

    model: Model
    y: Array
    operator: Operator
    sigma_y: Array
    weight: Array
    hp: dict
    method: str = dataclasses.field(metadata=dict(static=True))
    cg_iters: int = dataclasses.field(metadata=dict(static=True))

    def __call__(self, x: Array, t: Array) -> Array:
        # shapes only (free under jit): shape-agnostic operators (blur, pooling) accept any image
        # size, so only here, with the sampled x, can a y of other images be caught
        ax = jax.eval_shape(self.operator.forward, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape
        if ax[1:] != self.y.shape[1:] or self.y.shape[0] not in (1, ax[0]):
            raise ValueError(f"posterior_model's y has shape {self.y.shape}, but {type(self.operator).__name__} "
                             f"maps the sampled x of shape {x.shape} to {ax}: y must measure images of x's shape, "
                             f"one per sample or one for all ([1, ...])")
        hp = {**self.hp, "cg_iters": self.cg_iters}
        return _likelihood_guided(self.model, self.method, x, t, self.y.astype(x.dtype), self.operator,
                                  self.sigma_y, self.weight, hp)[0]


def posterior_model(fn: Callable, path: Path, y: Array, operator: Operator, *, prediction: str,
                    method: str = "tmpd", noise=None, weight: float = 1.0, **hparams) -> PosteriorModel:
    """The posterior's denoiser ``E[x0 | x_t, y]`` as an ``x0`` model, so that any solver of
    :func:`genflow.sample` (DPM-Solver++, UniPC, DEIS, ...) samples ``p(x0 | y)``.

    The posterior's marginals ``p_t(x_t | y)`` have the score ``score(x_t) + grad log p(y | x_t)``;
    ``pigdm`` and ``tmpd`` approximate ``p(y | x_t)`` by ``N(A x0_hat, A C_t A^T + sigma_y^2 I)``
    (exact for a Gaussian prior with ``tmpd``), and Tweedie's formula turns that score into
    ``x0_hat + (sigma_t^2 / alpha_t) grad log p(y | x_t)``, returned here. Its probability-flow ODE
    carries noise to the posterior the way the prior's carries noise to the prior, so a
    high-order deterministic solver needs far fewer steps than the ancestral base of
    :func:`posterior_sample`: on the 16-D linear-Gaussian oracle (box inpainting, sigma_y 0.1,
    4,000 samples) DPM-Solver++(2M) on a log-SNR grid reaches the Monte-Carlo noise level of the
    whitened covariance (0.06) in 50 steps and 0.10 in 20 (0.08 and 0.29 on the default uniform
    grid), where the DDPM base of ``posterior_sample`` needs 100 steps for 0.26 and 400 for 0.09. Each evaluation costs what one ``tmpd`` /
    ``pigdm`` step does (one network evaluation and VJP; ``tmpd`` adds ``cg_iters`` JVPs and VJPs).
    The deterministic solve does not forgive a wrong likelihood, though: ``pigdm`` on a prior far
    from its isotropic assumption (the same oracle) lands 2.4 posterior standard deviations off
    the mean (the norm of the whitened mean error; 1.4 in the largest coordinate) with 30 ODE
    steps, against 0.8 (0.4) with the stochastic base of ``posterior_sample``,
    whose fresh noise contracts such errors; with an isotropic prior both are exact.

        pm = gf.inverse.posterior_model(fn, path, y, op, prediction="eps", noise=gf.inverse.GaussianNoise(0.1))
        t0 = float(path.t_from_log_snr(math.log(1e-4)))  # SNR 1e-4 (0.994 on vp_cosine)
        x1 = path.prior_sample(key, shape)  # (the marginal at t0 is the prior's to ~SNR)
        x0, info = gf.sample(pm, path, x1, prediction="x0", solver="dpm++2m", steps=20, t_start=t0, schedule="logsnr")

    Start where ``alpha > 0`` (``t_start < 1`` on VP and linear paths; with an eps or score model
    where the SNR is at least ~1e-4, as :func:`posterior_sample` does by default)
    with ``x1`` drawn from the prior's marginal there (the posterior's is the same to ~SNR). On the
    16-D box-inpainting problem above (vp_cosine, eps model, ``tmpd``, 20 dpm++2m steps on the
    uniform grid) the mean lands ~3 posterior standard deviations off (3.1-3.3 over three noise
    draws; covariance error ~12) from ``t_start=1`` (alpha = 5.5e-4: float32 rounding swamps the eps
    model's conversion to x0 and its Jacobian; an x0 or v model gives 0.04), against 0.03-0.05,
    the Monte-Carlo noise of 4,000 samples, from ``t_start=0.999`` (SNR 4.5e-6) and from SNR 1e-4.
    (Re-measured at stop 45; an earlier version of this paragraph said 0.135, a number that never
    held in float32.)

    Args:
      fn, path, prediction: the prior model and its path and kind (as :func:`posterior_sample`).
      y: ``[B, ...]`` measurements, one per sample (the batch of the ``x`` the model is called on),
        or ``[1, ...]``: one measurement for every sample (many posterior draws for one ``y``).
        Checked against ``operator.forward(x)``'s shape when the model is called.
      operator: the measurement :class:`Operator`.
      method: ``"tmpd"`` (Tweedie covariance from the model's Jacobian) or ``"pigdm"``
        (isotropic ``C_t`` from the prior variance ``data_var``).
      noise: ``GaussianNoise(sigma_y)`` (default ``sigma_y = 0``).
      weight: multiplier of the likelihood score (0: the prior's denoiser).
      **hparams: ``scale``, ``cg_iters`` and (pigdm) ``data_var``, as for :func:`posterior_sample`.
    Returns:
      a :class:`PosteriorModel` ``pm(x: [B, ...], t: [] or [B]) -> [B, ...]`` (a pytree: new
      measurements, noise level or weight reuse the compiled sampler).
    """
    if method not in _GAUSSIAN_LIKELIHOOD:
        raise ValueError(f"posterior_model needs a Gaussian-likelihood method {list(_GAUSSIAN_LIKELIHOOD)}; "
                         f"got {method!r}")
    if not isinstance(operator, Operator):
        raise TypeError(f"operator must be a genflow.inverse.Operator; got {type(operator).__name__}")
    _check_operator(operator)
    param.check_kind(prediction)
    check_path(path)  # (a path name failed on 'str' object has no attribute 'alpha')
    _check_weight_scale(weight, hparams)  # (a NaN weight gave NaN, an inf scale inf, as posterior_sample refuses)
    y = jnp.asarray(y)
    try:  # y must be what the operator maps some batch of x to
        fits = jax.eval_shape(operator.forward, jax.eval_shape(operator.adjoint, y)).shape == y.shape
    except (TypeError, ValueError):
        fits = False
    if y.ndim < 1 or not fits:
        raise ValueError(f"y.shape={y.shape} is not a batch of measurements of this operator "
                         f"({type(operator).__name__}: [B, ...] with operator.forward(x) of that shape)")
    hp = _hyperparameters(method, {k: v for k, v in DEFAULTS[method].items() if k != "eta"}, hparams)
    cg_iters = hp.pop("cg_iters")
    noise = _noise_model(method, noise)
    return PosteriorModel(Model(as_pytree_fn(check_model_fn(fn)), path, prediction), y, operator, noise.sigma,
                          real_leaf(weight), hp, method, cg_iters)
