"""The continuous-time variational bound (VDM ELBO) and likelihood training.

With ``z_t = alpha(t) x + sigma(t) eps`` and log-SNR ``lambda(t)`` (decreasing), a model with
noise prediction ``eps_hat`` defines a continuous-time hierarchical VAE whose ELBO is
(Kingma et al. 2021, "Variational Diffusion Models", eq. 17, in this repo's convention)::

    -ELBO(x) = -E_{q(z_t0|x)} log p(x | z_t0)                          (reconstruction)
               + KL(q(z_1 | x) || N(0, s^2 I))                         (prior)
               + 1/2 int_t0^1 (-lambda'(t)) E_eps || eps - eps_hat(z_t, t) ||^2 dt   (diffusion)

Any prediction kind is converted to ``eps_hat`` (:func:`genflow.param.convert`); Kingma & Gao
2023 ("Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation") show that
the usual weighted losses are this diffusion term under a weighting ``w(lambda)``.

The decoder ``p(x | z_t0)`` is VDM's: for discrete data on ``levels``, a categorical with
logits ``-(z/alpha - x_k)^2 / (2 sigma^2/alpha^2)`` (exact when the data dimensions are
independent given ``z``); for continuous data, ``N(x; z/alpha, sigma^2/alpha^2 I)``.

**Time sampling.** The diffusion integral is estimated by Monte Carlo. ``"uniform"`` draws
``t ~ U[t0, t1]`` with weight ``(t1 - t0) (-lambda'(t)) / 2``; ``"importance"`` draws ``t``
with density proportional to ``-lambda'(t)`` (uniform in log-SNR: ``t = t(lambda)``,
``lambda ~ U[lambda(t1), lambda(t0)]``), which makes the weight the constant
``(lambda(t0) - lambda(t1)) / 2``: the importance sampling for likelihood weighting of Song et
al. 2021 ("Maximum Likelihood Training of Score-Based Diffusion Models", Sec. 5) and Zheng et
al. 2023 (Sec. 4.2), which removes the variance that the weight's divergence at t -> 0 causes.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from genflow import _memo, param
from genflow._checks import (check_int, check_key, check_positive_real, check_real_in, flat_batch,
                             real_or_traced, split_batch)
from genflow._precision import wide as _wide
from genflow.likelihood._ode import _check_x, is_zero
from genflow.paths import Path, check_path

Array = jax.Array

__all__ = ["TIME_SAMPLINGS", "sample_time", "diffusion_term", "reconstruction_term", "prior_term", "vdm_elbo",
           "likelihood_loss", "likelihood_objective"]

TIME_SAMPLINGS = ("importance", "uniform")


def _flat_sum(a: Array) -> Array:
    return jnp.sum(flat_batch(a), axis=-1)


def sample_time(key: Array, n: int, path: Path, t_min: float, t_max: float = 1.0, sampling: str = "importance",
                stratified: bool = False, dtype=jnp.float32, strata: int | None = None) -> tuple[Array, Array]:
    """Times for the diffusion term and their weights ``(-lambda'(t)) / (2 p(t))``.

    Args:
      key: PRNG key.
      n: number of times.
      path: the Gaussian path.
      t_min, t_max: the interval.
      sampling: ``"importance"`` (density proportional to ``-lambda'``, i.e. uniform in
        log-SNR; constant weight) or ``"uniform"``.
      stratified: one draw per ``1/strata`` of the unit interval (low-discrepancy, as in VDM).
      strata: with ``stratified``, the draws are ``strata`` groups of ``n // strata`` in
        stratum-major order (draw ``k * (n // strata) + j`` lies in stratum ``k``, with its own
        offset per ``j``); the default ``n`` stratifies all draws together with one offset. A
        draw's stratum then depends on its position: unbiased for a mean over all ``n``, not per
        position.
      dtype: the dtype of ``t`` and ``weight``.
    Returns:
      ``t: [n]`` and ``weight: [n]`` with ``E[weight * g(t)] = 1/2 int (-lambda') g dt``.
    """
    if sampling not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time sampling {sampling!r}; expected one of {list(TIME_SAMPLINGS)}")
    n = check_int("n", n)  # (2.5: a shape TypeError; 0: empty arrays, silently)
    check_key(key)  # (key=0 failed as JAX's "invalid PRNG key data", unnamed)
    _check_t_range(t_min, t_max)
    if sampling == "importance":  # (uniform in log-SNR: an infinite end gave NaN or t_min times and inf weights;
        _check_finite_log_snr(path, t_min, t_max)  # "uniform" draws t itself, and concrete ends only are checked)
    if stratified:
        strata = n if strata is None else check_int("strata", strata)  # (2.5 was read as 2)
        if n % strata:
            raise ValueError(f"strata must be a positive divisor of n={n}; got {strata}")
        # draws in stratum-major order [strata, n // strata], one random offset per column
        off = jax.random.uniform(key, (1, n // strata), dtype)
        u = jnp.mod((jnp.arange(strata, dtype=dtype)[:, None] + off) / strata, 1.0).reshape(n)
    else:
        u = jax.random.uniform(key, (n,), dtype)
    t_min, t_max = jnp.asarray(t_min, dtype), jnp.asarray(t_max, dtype)
    if sampling == "uniform":
        t = t_min + (t_max - t_min) * u
        return t, 0.5 * (t_max - t_min) * (-path.d_log_snr(t))
    lam_hi, lam_lo = path.log_snr(t_min), path.log_snr(t_max)
    t = path.t_from_log_snr(lam_lo + (lam_hi - lam_lo) * u)
    t = jnp.clip(t, t_min, t_max)
    return t, jnp.full((n,), 0.5, dtype) * (lam_hi - lam_lo)


def _eps_hat(fn, path: Path, z: Array, t: Array, prediction: str) -> Array:
    return param.convert(fn(z, t), z, t, path, prediction, "eps")


def _check_t_range(t_min, t_max) -> None:
    """``0 <= t_min < t_max <= 1`` where both are concrete (traced values pass, unchecked)."""
    lo, hi = real_or_traced("t_min", t_min, "a float in [0, 1)"), real_or_traced("t_max", t_max, "a float in (0, 1]")
    if lo is not None and hi is not None and not 0.0 <= lo < hi <= 1.0:  # (t_min > t_max gave negative weights)
        raise ValueError(f"need 0 <= t_min < t_max <= 1; got t_min={t_min}, t_max={t_max}")


def _check_finite_log_snr(path: Path, t_min, t_max) -> None:
    if is_zero(path.sigma(jnp.asarray(t_min))):
        raise ValueError(f"t_min={t_min} has sigma=0 on path {path.name!r}: the log-SNR is infinite there; "
                         f"pass t_min > 0 (e.g. 1e-3)")
    if is_zero(path.alpha(jnp.asarray(t_max))):
        raise ValueError(f"t_max={t_max} has alpha=0 on path {path.name!r}: the log-SNR is -inf there and the "
                         f"diffusion term's weight is not integrable; pass t_max < 1 (e.g. 0.999)")


def diffusion_term(fn: Callable, path: Path, x: Array, key: Array, *, prediction: str, t_min: float | None,
                   t_max: float = 1.0, time_sampling: str = "importance", stratified: bool = False,
                   strata: int | None = None) -> Array:
    """One-sample estimate of ``1/2 int_tmin^tmax (-lambda') E||eps - eps_hat(z_t, t)||^2 dt`` per example.

    ``x: [B, ...]``; one time and one noise draw per example (``stratified``/``strata``: see
    :func:`sample_time`). The log-SNR must be finite on ``[t_min, t_max]``. Returns ``[B]`` (nats,
    float32 or wider).
    """
    param.check_kind(prediction)
    check_path(path)  # (a path name failed as "'str' object has no attribute 't_min'")
    check_key(key)
    _check_x(x, floating=False, nonempty=True)  # (integer data is widened below)
    t_min = path.t_min if t_min is None else t_min  # (as vdm_elbo reads None; jnp.array(None) failed)
    _check_t_range(t_min, t_max)
    _check_finite_log_snr(path, t_min, t_max)
    x = _wide(x)
    k_t, k_e = jax.random.split(key)
    t, w = sample_time(k_t, x.shape[0], path, t_min, t_max, time_sampling, stratified, x.dtype, strata)
    eps = jax.random.normal(k_e, x.shape, x.dtype)
    z = path.add_noise(x, eps, t)
    err = _flat_sum(jnp.square(eps - _eps_hat(fn, path, z, t, prediction)))
    return w * err


def reconstruction_term(path: Path, x: Array, key: Array, t0: float, levels: Array | None = None) -> Array:
    """``log p(x | z_t0)`` at one draw ``z_t0 = alpha x + sigma eps``; ``[B]`` (nats).

    With ``levels: [K]`` (the discrete values, e.g. ``jnp.linspace(-1, 1, 17)``) the decoder is
    VDM's factorized categorical ``softmax_k(-(z/alpha - levels_k)^2 / (2 (sigma/alpha)^2))``
    and ``x`` must lie on the levels; without, it is ``N(x; z/alpha, (sigma/alpha)^2 I)``.
    """
    check_path(path)
    check_key(key)
    _check_levels(levels)
    check_real_in("t0", t0, 0.0, 1.0)  # (1.5 extrapolated the path, silently)
    _check_x(x, floating=False)  # (a single example [D] was read as D one-dimensional examples)
    if is_zero(path.sigma(jnp.asarray(t0))):  # (the decoder's log-density was +inf there)
        raise ValueError(f"t0={t0} has sigma=0 on path {path.name!r}: the decoder is a point mass there; pass t0 > 0")
    x = _wide(x)  # (integer data: t0 was cast to an int, and the noise draw refused an int dtype)
    t = jnp.asarray(t0, x.dtype)
    a, s = path.alpha(t), path.sigma(t)
    eps = jax.random.normal(key, x.shape, x.dtype)
    z_over_a = x + (s / a) * eps
    scale = s / a
    if levels is None:
        lp = -0.5 * jnp.square(eps) - jnp.log(scale) - 0.5 * math.log(2 * math.pi)
        return _flat_sum(lp)
    levels = jnp.asarray(levels, x.dtype)
    logits = -0.5 * jnp.square((z_over_a[..., None] - levels) / scale)
    logp = jax.nn.log_softmax(logits, axis=-1)
    idx = jnp.argmin(jnp.abs(x[..., None] - levels), axis=-1)
    _check_on_levels(x, levels)  # (off-level x was snapped silently)
    return _flat_sum(jnp.take_along_axis(logp, idx[..., None], axis=-1)[..., 0])


def _check_levels(levels) -> None:
    """``levels`` must be ``[K]`` (a [K, K'] array failed in a broadcast deep inside)."""
    if levels is not None and jnp.ndim(levels) != 1:
        raise ValueError(f"levels must be a 1-D array [K] of the discrete data values; got shape {jnp.shape(levels)}")


def _check_prior_std(prior_std) -> None:
    """``None`` or a real > 0 (-1 gave the +1 result, 0 and NaN a NaN prior term)."""
    if prior_std is not None:
        check_positive_real("prior_std", prior_std)


def _check_on_levels(x, levels) -> None:
    """Raise ``ValueError`` unless every entry of a concrete ``x`` lies on ``levels`` (checked on
    the host; traced values pass)."""
    try:
        xn, ln = np.asarray(x, np.float64), np.sort(np.asarray(levels, np.float64).ravel())
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return
    if ln.size < 2:
        return
    pos = np.clip(np.searchsorted(ln, xn), 1, ln.size - 1)
    off = float(np.max(np.minimum(np.abs(xn - ln[pos - 1]), np.abs(xn - ln[pos])))) if xn.size else 0.0
    if off > 1e-3 * float(np.min(np.diff(ln))):
        raise ValueError(f"x must lie on levels (the decoder's discrete values); got a value {off:.3g} away")


def prior_term(path: Path, x: Array, t1: float = 1.0, prior_std: float | None = None) -> Array:
    """``KL(N(alpha_1 x, sigma_1^2 I) || N(0, s^2 I))`` per example, ``s = sigma(t1)`` by default; ``[B]``."""
    check_path(path)
    _check_prior_std(prior_std)
    check_real_in("t1", t1, 0.0, 1.0)  # (2.0 extrapolated the path: a KL of 0, silently)
    _check_x(x, floating=False)  # (a single example [D] was read as D one-dimensional examples)
    x = _wide(x)  # (integer data: t1 = 0.9 and prior_std = 0.5 were cast to 0, and the KL was NaN)
    t = jnp.asarray(t1, x.dtype)
    a, s1 = path.alpha(t), path.sigma(t)
    s = s1 if prior_std is None else jnp.asarray(prior_std, x.dtype)
    r = (s1 * s1 + a * a * jnp.square(x)) / (s * s)
    return 0.5 * _flat_sum(r - 1.0 - jnp.log(s1 * s1 / (s * s)))


def vdm_elbo(
    fn: Callable[[Array, Array], Array],
    path: Path,
    x: Array,
    key: Array,
    *,
    prediction: str = "eps",
    levels: Array | None = None,
    t_min: float | None = None,
    t_max: float = 1.0,
    time_sampling: str = "importance",
    num_t: int = 1,
    stratified: bool = True,
    prior_std: float | None = None,
) -> tuple[Array, dict]:
    """Monte-Carlo estimate of the continuous-time ELBO of ``x`` (nats; see the module docstring).

    Args:
      fn: model ``fn(z: [B, ...], t: [B])`` of kind ``prediction`` (eps, v, or any other kind).
      prediction: the kind ``fn`` returns.
      path: the Gaussian path (its log-SNR must be finite on ``[t_min, t_max]``).
      x: ``[B, ...]`` data (on ``levels`` when given).
      key: PRNG key.
      levels: ``[K]`` discrete data values, or None for continuous data.
      t_min: the decoder's time ``t0`` (default ``path.t_min``; must have ``sigma(t0) > 0``).
      t_max: the prior's time (default 1).
      time_sampling: ``"importance"`` or ``"uniform"`` (see :func:`sample_time`).
      num_t: draws of (time, noise) per example, averaged (with ``stratified``, one per ``1/num_t``
        of the time distribution, offset independently per example). All draws are evaluated as
        one batch (``x`` tiled ``num_t`` times: row ``k * B + i`` is example ``i``), so ``fn`` is
        called on ``[num_t * B, ...]``: per-example labels bound by closure must be tiled the same
        way (``gf.nets.model_fn(net, params, y=jnp.tile(y, num_t))``).
      prior_std: std of the Gaussian prior (default ``sigma(t_max)``).
    Returns:
      ``(elbo: [B], parts)`` with ``parts`` = ``{"reconstruction", "prior", "diffusion"}`` (each
      ``[B]``, ``elbo = reconstruction - prior - diffusion``). Bits/dim of a discrete ELBO:
      :func:`genflow.likelihood.bits_per_dim` ``(elbo, D)``.
    """
    param.check_kind(prediction)
    check_path(path)
    t_min = path.t_min if t_min is None else t_min
    _check_t_range(t_min, t_max)  # (a traced t_min raised TracerBoolConversionError here)
    check_int("num_t", num_t)
    check_key(key)
    _check_prior_std(prior_std)
    _check_levels(levels)
    _check_x(x, floating=False, nonempty=True)  # (integer data is widened below)
    _check_finite_log_snr(path, t_min, t_max)
    if levels is not None:
        _check_on_levels(x, levels)
    from genflow.sampling import as_pytree_fn

    x = _wide(x)
    # one compiled program per model, shapes and static options (eagerly the network and ~130
    # small ops ran one by one: 9 ms against 0.5 ms compiled); the times are traced
    as_t = lambda v: None if v is None else jnp.asarray(v, x.dtype)  # noqa: E731
    return _vdm_elbo_jit(as_pytree_fn(fn), path, x, key, prediction,
                         None if levels is None else jnp.asarray(levels, x.dtype), as_t(t_min), as_t(t_max),
                         time_sampling, num_t, stratified, as_t(prior_std))


@_memo.filter_jit
def _vdm_elbo_jit(fn, path, x, key, prediction, levels, t_min, t_max, time_sampling, num_t, stratified, prior_std):
    k_rec, k_diff = jax.random.split(key)
    b = x.shape[0]
    # num_t draws per example, averaged; with ``stratified`` each example's num_t times cover the
    # num_t strata with its own offset (stratifying across the batch would make an example's
    # estimate depend on its row: row 0 always near t_max).
    xs = jnp.tile(x, (num_t,) + (1,) * (x.ndim - 1))  # (concatenating num_t copies compiled in O(num_t^2))
    rec = jnp.mean(reconstruction_term(path, xs, k_rec, t_min, levels).reshape(num_t, b), axis=0)
    prior = prior_term(path, x, t_max, prior_std)
    diff = diffusion_term(fn, path, xs, k_diff, prediction=prediction, t_min=t_min, t_max=t_max,
                          time_sampling=time_sampling, stratified=stratified, strata=num_t)
    diff = jnp.mean(diff.reshape(num_t, b), axis=0)
    return rec - prior - diff, {"reconstruction": rec, "prior": prior, "diffusion": diff}


def likelihood_loss(fn: Callable, path: Path, x0: Array, key: Array, *, prediction: str = "eps",
                    t_min: float | None = None, t_max: float = 1.0, time_sampling: str = "importance",
                    stratified: bool = True) -> tuple[Array, dict]:
    """Likelihood training loss: the diffusion term of :func:`vdm_elbo`, in nats per dimension.

    With ``time_sampling="importance"`` this is the likelihood-weighted denoising loss with
    importance-sampled time (Song et al. 2021; Zheng et al. 2023): the same expectation as
    ``"uniform"``, with lower variance. Returns ``(loss, {"per_example": [B]})``; with
    ``stratified`` the times are stratified across the batch (an unbiased, low-variance mean),
    so ``per_example[i]`` is not an estimate for example ``i`` alone (use :func:`vdm_elbo`).
    Its expectation is ``(t_max - t_min)`` times that of
    ``genflow.losses.diffusion_loss(..., prediction="eps", weighting="elbo")`` with times uniform
    on ``[t_min, t_max]`` (the same integrand, as a mean over t rather than an integral).
    """
    check_path(path)
    _check_x(x0, floating=False, name="x0", nonempty=True)  # (a list failed as "'list' object has no attribute 'shape'")
    t_min = path.t_min if t_min is None else t_min
    d = math.prod(x0.shape[1:])
    per = diffusion_term(fn, path, x0, key, prediction=prediction, t_min=t_min, t_max=t_max,
                         time_sampling=time_sampling, stratified=stratified) / d
    return jnp.mean(per), {"per_example": per}


def likelihood_objective(apply_fn: Callable, path: Path, *, prediction: str = "eps", **kwargs: Any):
    """``loss_fn(params, batch, key)`` of :func:`likelihood_loss` for :func:`genflow.train.make_train_step`.

    ``apply_fn(params, x, t[, y=labels])`` (e.g. ``module.apply``); the batch is ``x: [B, ...]`` or
    ``{"x": [B, ...], "y": [B]}`` (labels passed to ``apply_fn`` as ``y=``, as
    :func:`genflow.train.diffusion_objective` does; no label dropout here). Paired noise ``"x1"``
    is refused: this loss draws its own.
    """
    param.check_kind(prediction)
    try:  # (an unknown option, e.g. label_dropout=, failed only when the loss was first traced)
        inspect.signature(likelihood_loss).bind(None, path, None, None, prediction=prediction, **kwargs)
    except TypeError as e:
        raise TypeError(f"likelihood_objective: {e} (its options are likelihood_loss's keyword arguments)") from None

    def loss_fn(params, batch, key):
        x0, y, x1 = split_batch(batch)
        if x1 is not None:
            raise ValueError("likelihood_objective draws its own noise: a batch with paired noise 'x1' is not "
                             "supported (use genflow.train.diffusion_objective)")
        kw = {} if y is None else {"y": y}  # (labels were dropped: a conditional net trained on its null label)
        loss, _ = likelihood_loss(lambda z, t: apply_fn(params, z, t, **kw), path, x0, key, prediction=prediction,
                                  **kwargs)
        return loss, {}

    return loss_fn

