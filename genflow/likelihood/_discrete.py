"""Discrete data: dequantization and bits per dimension.

Discrete data ``x`` on a grid of spacing ``bin_width`` (e.g. 8-bit images scaled to [-1, 1]:
``bin_width = 2/255``; the bundled digits, 17 levels in [-1, 1]: ``bin_width = 2/16``) has a
probability ``P(x) = int_{bin(x)} p(y) dy`` under a continuous density ``p``. For any
dequantization distribution ``q(y | x)`` supported on the bin (Theis et al. 2016; Ho et al.
2019, "Flow++")::

    log P(x) >= E_{q(y|x)} [ log p(y) - log q(y | x) ]

* **uniform**: ``y = x + (u - 1/2) bin_width``, ``u ~ U[0, 1)^D``: ``log q = -D log bin_width``.
* **truncated normal** (Zheng et al. 2023, "Improved Techniques for Maximum Likelihood
  Estimation for Diffusion ODEs", Sec. 5): evaluate the diffusion ODE from a small time
  ``t_eps`` with ``z = alpha x + sigma eps``, ``eps ~ N(0, I)`` truncated to ``[-tau, tau]``
  and ``alpha / sigma = 2 tau / bin_width``, so that ``z`` covers exactly the scaled bin
  ``alpha * bin(x)``: ``log q(z | x) = sum_i [-eps_i^2 / 2 - log(sqrt(2 pi) sigma Z)]``,
  ``Z = erf(tau / sqrt 2)``. The bound is then on the probability that the model's marginal
  at ``t_eps`` gives the scaled bin; it needs no training-time noise (training-free).

Bits per dimension of a discrete log-probability: ``bpd = -log P(x) / (D ln 2)``.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from genflow import _memo
from genflow._checks import check_int, check_key, check_positive_real, flat_batch
from genflow.likelihood._ode import _check_x, log_prob
from genflow.paths import Path, check_path

Array = jax.Array

__all__ = ["DEQUANTIZATIONS", "bits_per_dim", "uniform_dequantize", "truncated_normal_dequantize",
           "truncated_normal_time", "dequantized_log_prob"]

DEQUANTIZATIONS = ("uniform", "truncated_normal")


def _num_dims(x: Array) -> int:
    return math.prod(x.shape[1:])


def bits_per_dim(log_prob: Array, num_dims: int, bin_width: float = 1.0) -> Array:
    """Bits per dimension ``-(log_prob + D log bin_width) / (D ln 2)``.

    With ``bin_width = 1`` (default) ``log_prob`` is a discrete log-probability (or a lower
    bound on one, such as a dequantized bound or an ELBO) in nats. With the grid spacing as
    ``bin_width``, ``log_prob`` is a continuous log-density at a uniformly dequantized point
    (in data units), and the result is the usual bound
    ``-(log p(y) + D log bin_width) / (D ln 2)`` (e.g. 8-bit data in [-1, 1]: ``+7`` bits when
    the bins are ``2/256`` wide).

    Args:
      log_prob: ``[...]`` log-probabilities (nats) of whole examples.
      num_dims: D, the number of discrete dimensions per example.
      bin_width: width of one bin in the units of ``log_prob``'s density (may be traced).
    """
    check_int("num_dims", num_dims)
    check_positive_real("bin_width", bin_width)  # (a traced one raised TracerBoolConversionError)
    return -(log_prob + num_dims * jnp.log(bin_width)) / (num_dims * math.log(2.0))


def uniform_dequantize(key: Array, x: Array, bin_width: float) -> tuple[Array, Array]:
    """Uniform dequantization ``y = x + (u - 1/2) bin_width``, ``u ~ U[0, 1)``.

    ``x: [B, ...]`` on a grid of spacing ``bin_width`` (``x`` at the bin centres). Returns ``y``
    and ``log q(y | x) = -D log(bin_width)`` as ``[B]``.
    """
    check_key(key)  # (a bad key failed as JAX's "invalid PRNG key data", unnamed)
    check_positive_real("bin_width", bin_width)
    _check_x(x, floating=False)  # (a single example [D] was read as D one-dimensional examples)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bfloat16 would move y out of its bin
    u = jax.random.uniform(key, x.shape, x.dtype)
    y = x + (u - 0.5) * bin_width
    log_w = jnp.log(jnp.asarray(bin_width, x.dtype))  # (math.log failed on a traced bin_width)
    return y, jnp.full((x.shape[0],), -_num_dims(x) * log_w, x.dtype)


def truncated_normal_time(path: Path, bin_width: float, tau: float = 3.0) -> Array:
    """The time ``t_eps`` with ``alpha / sigma = 2 tau / bin_width`` (log-SNR ``2 log(2 tau / bin_width)``)."""
    check_positive_real("bin_width", bin_width)
    check_positive_real("tau", tau)
    return path.t_from_log_snr(2.0 * jnp.log(2.0 * jnp.asarray(tau) / jnp.asarray(bin_width)))


def truncated_normal_dequantize(key: Array, x: Array, path: Path, bin_width: float,
                                tau: float = 3.0) -> tuple[Array, Array, Array]:
    """Truncated-normal dequantization of Zheng et al. 2023 (see the module docstring).

    Args:
      key: PRNG key.
      x: ``[B, ...]`` data on a grid of spacing ``bin_width``.
      path: the Gaussian path of the model.
      bin_width: the grid's spacing (``2 / 255`` for 8-bit data scaled to [-1, 1]).
      tau: truncation of the normal, in standard deviations (reduced to ``alpha bin_width / (2 sigma)``
        at ``t_eps = 0`` on a path that never reaches the log-SNR ``2 log(2 tau / bin_width)``, so
        that ``z`` always stays in the scaled bin).
    Returns:
      ``z = alpha x + sigma eps`` at ``t_eps`` (``[B, ...]``), ``log q(z | x)`` (``[B]``) and
      ``t_eps`` (scalar).
    """
    _check_x(x, floating=False)  # (a single example [D] was read as D one-dimensional examples)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    with jax.ensure_compile_time_eval():  # (concrete under a user's jit when the path is: see dequantized_log_prob)
        t = truncated_normal_time(path, bin_width, tau)
    z, log_q = _truncated_normal_at(key, x, path, t, jnp.asarray(bin_width, x.dtype), jnp.asarray(tau, x.dtype))
    return z, log_q, t


@_memo.filter_jit
def _truncated_normal_at(key: Array, x: Array, path: Path, t: Array, bin_width: Array, tau: Array):
    """``(z, log q(z | x))`` of :func:`truncated_normal_dequantize` at its time ``t`` (one compiled
    program: eagerly its ~80 small ops ran one by one)."""
    a, s = path.alpha(t).astype(x.dtype), path.sigma(t).astype(x.dtype)
    # A path whose largest log-SNR is below 2 log(2 tau / bin_width) (ve, edm with 8-bit data) clamps
    # t_eps to 0, where +-tau standard deviations would leave the scaled bin (and the "bound" would
    # exceed log P): truncate at the half-width of the scaled bin instead (= tau where t_eps exists).
    tau = jnp.minimum(jnp.asarray(tau, x.dtype), 0.5 * bin_width * a / s)
    eps = jax.random.truncated_normal(key, -tau, tau, x.shape, x.dtype)
    z = a * x + s * eps
    log_norm = jnp.log(jax.scipy.special.erf(tau / math.sqrt(2.0))) + jnp.log(s) + 0.5 * math.log(2 * math.pi)
    log_q = jnp.sum(-0.5 * flat_batch(jnp.square(eps)), axis=-1) - _num_dims(x) * log_norm
    return z, log_q.astype(x.dtype)


def dequantized_log_prob(
    fn: Callable[[Array, Array], Array],
    path: Path,
    x: Array,
    key: Array,
    *,
    prediction: str,
    bin_width: float,
    dequantization: str = "uniform",
    tau: float = 3.0,
    num_samples: int = 1,
    importance_weighted: bool = False,
    **log_prob_kwargs,
) -> tuple[Array, dict]:
    """A lower bound on the discrete ``log P(x)`` of a diffusion / flow model, in nats.

    ``E_q[log p(y) - log q(y | x)]`` estimated with ``num_samples`` dequantizations per point
    (all solved in one batch), ``log p`` from :func:`genflow.likelihood.log_prob`. With
    ``importance_weighted`` the samples are combined as ``log mean exp`` (the tighter
    importance-weighted bound of Burda et al. 2016) instead of a mean.

    Args:
      fn, path, prediction, **log_prob_kwargs: as for :func:`genflow.likelihood.log_prob`
        (with ``"hutchinson"`` the key's probes are drawn from a split of ``key``).
      x: ``[B, ...]`` discrete data at the bin centres, spacing ``bin_width``.
      key: PRNG key.
      bin_width: the spacing of the discrete levels (e.g. ``2 / 255`` for 8-bit data in [-1, 1]).
      dequantization: ``"uniform"`` (evaluated at ``t_min``) or ``"truncated_normal"``
        (evaluated at ``t_eps`` of :func:`truncated_normal_time`).
      tau: the truncated normal's half-width in standard deviations (``"truncated_normal"`` only).
      num_samples: dequantizations ``K`` per point. All ``K * B`` points are solved as one batch
        (``x`` tiled ``K`` times: row ``k * B + i`` is example ``i``), so ``fn`` is called on
        ``[K * B, ...]``: a conditional model with per-example labels bound by closure needs them
        tiled the same way (``gf.nets.model_fn(net, params, y=jnp.tile(y, K))``).
      importance_weighted: combine the ``K`` samples as ``log mean exp`` instead of a mean.
    Returns:
      ``(bound: [B], info)``, ``info`` with ``"log_q"`` ``[K, B]``, ``"log_p"`` ``[K, B]``, ``"t"``
      and ``"solve"`` (the :class:`LogProbInfo`). ``bits_per_dim(bound, D)`` gives bits/dim.
    """
    if dequantization not in DEQUANTIZATIONS:
        raise ValueError(f"unknown dequantization {dequantization!r}; expected one of {list(DEQUANTIZATIONS)}")
    check_int("num_samples", num_samples)
    check_path(path)  # (a path name failed as "'str' object has no attribute 't_min'")
    check_key(key)
    check_positive_real("bin_width", bin_width)
    check_positive_real("tau", tau)
    _check_x(x, floating=False)  # (named with x's own shape, not that of its num_samples tiles)
    k_deq, k_trace = jax.random.split(key)
    xs = jnp.tile(x, (num_samples,) + (1,) * (x.ndim - 1))  # (concatenating num_samples copies compiled in O(num_samples^2))
    if dequantization == "uniform":
        y, log_q = uniform_dequantize(k_deq, xs, bin_width)
        t = log_prob_kwargs.pop("t_min", None)
        t = path.t_min if t is None else t
    else:
        if "t_min" in log_prob_kwargs:
            raise ValueError("truncated_normal dequantization sets t_min itself (from tau and bin_width)")
        # t is a Python float under jit too when the path's numbers are static
        y, log_q, t = truncated_normal_dequantize(k_deq, xs, path, bin_width, tau)
        try:
            t = float(t)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            # (was `pass`, and log_prob then refused "t_min ... got JitTracer", an argument never passed)
            raise ValueError("dequantization='truncated_normal' needs a concrete path (its t_eps becomes "
                             "log_prob's t_min): close over the path instead of passing it to jit as an "
                             "argument") from None
    if log_prob_kwargs.get("trace") == "hutchinson":
        log_prob_kwargs.setdefault("key", k_trace)
    logp, info = log_prob(fn, path, y, prediction=prediction, t_min=t, **log_prob_kwargs)
    logp, log_q = logp.reshape(num_samples, -1), log_q.reshape(num_samples, -1)
    w = logp - log_q
    if importance_weighted:
        bound = jax.nn.logsumexp(w, axis=0) - math.log(num_samples)
    else:
        bound = jnp.mean(w, axis=0)
    return bound, {"log_q": log_q, "log_p": logp, "t": t, "solve": info}
