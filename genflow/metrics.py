"""Sample-quality metrics: exact / entropic / sliced 2-Wasserstein, MMD, Fréchet distance; PSNR
and SSIM for images (``[B, H, W, C]``).

Point sets are ``[N, D]`` (images are flattened). ``w2_exact`` solves the assignment problem
exactly on the host (SciPy), and ``gaussian_stats`` / ``frechet_distance`` run on the host in
float64 NumPy; the others are jittable JAX functions computed in float32 whatever the inputs'
dtype (also under ``jax_enable_x64``: ~1e-7 relative, ample for sample quality).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from genflow._checks import check_bool, check_int, check_key, check_positive_real, flat_batch, is_int
from genflow._precision import matmul

Array = jax.Array

__all__ = ["w2_exact", "w2_sinkhorn", "sliced_w2", "mmd", "frechet_distance", "gaussian_stats", "psnr", "ssim"]


def _sq_dists(x: Array, y: Array) -> Array:
    # |x|^2 + |y|^2 - 2 x.y of the points centred on their common mean: distances are translation
    # invariant, and uncentred float32 cancelled far from the origin (w2_sinkhorn 0.09 for 0.56, an
    # mmd twice too large, at an offset of 3,000)
    c = (jnp.sum(x, 0) + jnp.sum(y, 0)) / (x.shape[0] + y.shape[0])
    x, y = x - c, y - c
    # (a full-precision product: TF32's cancellation put mmd of near-duplicate sets 28% off; genflow._precision)
    return jnp.maximum(jnp.sum(x * x, 1)[:, None] + jnp.sum(y * y, 1)[None] - 2.0 * matmul(x, y.T), 0.0)


def _safe_sqrt(v: Array) -> Array:
    """``sqrt(v)`` with a zero (sub)gradient at ``v = 0``, where ``jnp.sqrt``'s is inf (NaN
    gradients of a distance between coinciding point sets). NaN stays NaN: a diverged sample
    must not score a perfect distance of 0."""
    pos = v > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), jnp.where(jnp.isnan(v), v, 0.0))


def _check_same_dim(name: str, x, y) -> None:
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"{name} needs points of the same dimension; got x: {tuple(x.shape)} and y: {tuple(y.shape)}")
    _check_nonempty(name, x, y)


def _check_nonempty(name: str, x, y) -> None:
    """At least one point per set (an empty one gave NaN, which reads as a diverged sample)."""
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"{name} needs at least 1 point per set; got {x.shape[0]} and {y.shape[0]}")


def w2_exact(x, y) -> float:
    """Exact 2-Wasserstein distance between two equal-size empirical measures.

    ``W2 = sqrt(min_perm mean_i ||x_i - y_perm(i)||^2)`` (an assignment problem, solved with
    SciPy's ``linear_sum_assignment`` in float64). ``x, y: [N, ...]`` with the same N. A NaN or
    infinite coordinate gives NaN (as in the other distances: a diverged sample scores no distance).

    Runs on the host, on concrete arrays: not under ``jax.jit`` / ``vmap`` / ``grad`` (use
    :func:`w2_sinkhorn` or :func:`sliced_w2`, or ``gf.ot.ot_permutation`` for the assignment, there).
    """
    from scipy.optimize import linear_sum_assignment

    if any(isinstance(v, jax.core.Tracer) for v in (x, y)):  # (was NumPy's TracerArrayConversionError)
        raise TypeError("w2_exact runs on the host and got traced arrays (inside jax.jit / vmap / grad / lax.map); "
                        "use w2_sinkhorn or sliced_w2 there, or call w2_exact on concrete arrays")
    x, y = flat_batch(np.asarray(x, np.float64)), flat_batch(np.asarray(y, np.float64))
    if x.shape != y.shape:
        raise ValueError(f"w2_exact needs point sets of equal shape; got {x.shape} and {y.shape} "
                         f"(use w2_sinkhorn or sliced_w2 for unequal sizes)")
    _check_nonempty("w2_exact", x, y)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return float("nan")  # (SciPy raised "matrix contains invalid numeric entries" / "cost matrix is infeasible")
    from genflow.ot import exact_sq_distances

    cost = exact_sq_distances(x, y)  # differences, not |x|^2 + |y|^2 - 2 x.y (which rounds: w2(x, x) != 0)
    r, c = linear_sum_assignment(cost)
    return float(np.sqrt(cost[r, c].mean()))


def w2_sinkhorn(x: Array, y: Array, epsilon: float = 0.01, iters: int = 500, debiased: bool = True) -> Array:
    """Entropic 2-Wasserstein estimate by log-domain Sinkhorn iterations.

    Returns ``sqrt(S_eps(x, y))`` where ``S_eps`` is the (debiased) Sinkhorn divergence of
    Feydy et al. 2019 with the squared-Euclidean cost, uniform weights. ``epsilon`` is relative
    to the mean squared distance between ``x`` and ``y`` (one value for all three terms).
    ``x: [N, D]``, ``y: [M, D]``; returns a scalar.

    The iterations needed grow like ``1 / epsilon``, and too few bias the estimate low, with no
    warning: on 32 points with exact W2 0.8164, ``epsilon=1e-4`` gives 0.69 / 0.75 / 0.816 at
    500 / 2,000 / 10,000 iterations, while the default ``epsilon=0.01`` has converged at 500.
    """
    x, y = flat_batch(jnp.asarray(x, jnp.float32)), flat_batch(jnp.asarray(y, jnp.float32))
    _check_same_dim("w2_sinkhorn", x, y)
    check_positive_real("epsilon", epsilon)  # (0 gave 0.93 for a W2 of 1.41; a traced value passes)
    debiased = check_bool("debiased", debiased)  # (the string "False" was truthy)
    if isinstance(iters, jax.core.Tracer):  # (a traced loop count: no compiled core keyed by it)
        return _sinkhorn(x, y, epsilon, iters, bool(debiased))
    iters = check_int("iters", iters)  # (0 gave 0.0)
    # compiled once per shapes, iters and debiased (epsilon traced): eagerly, the loop closed over
    # new arrays at every call and was compiled anew (~0.9 s per call at 64 points)
    return _sinkhorn_jit(x, y, jnp.asarray(epsilon, jnp.float32), iters, bool(debiased))


def _sinkhorn(x: Array, y: Array, epsilon, iters, debiased: bool) -> Array:
    # One epsilon for all three terms (the debiasing needs a common one): relative to the mean
    # squared distance between x and y.
    cxy = _sq_dists(x, y)
    eps = epsilon * jnp.mean(cxy) + 1e-12

    def ot(a, b, c):
        la = -jnp.log(a.shape[0]) * jnp.ones(a.shape[0], a.dtype)  # (float32 under x64 too)
        lb = -jnp.log(b.shape[0]) * jnp.ones(b.shape[0], b.dtype)

        def body(_, fg):
            f, g = fg
            f = -eps * jax.nn.logsumexp((g[None, :] - c) / eps + lb[None, :], axis=1)
            g = -eps * jax.nn.logsumexp((f[:, None] - c) / eps + la[:, None], axis=0)
            return f, g

        f, g = jax.lax.fori_loop(0, iters, body, (jnp.zeros(a.shape[0], a.dtype), jnp.zeros(b.shape[0], b.dtype)))
        return jnp.mean(f) + jnp.mean(g)

    val = ot(x, y, cxy)
    if debiased:
        val = val - 0.5 * (ot(x, x, _sq_dists(x, x)) + ot(y, y, _sq_dists(y, y)))
    return _safe_sqrt(jnp.maximum(val, 0.0))


_sinkhorn_jit = jax.jit(_sinkhorn, static_argnames=("iters", "debiased"))


def sliced_w2(x: Array, y: Array, key: Array, num_projections: int = 256) -> Array:
    """Sliced 2-Wasserstein distance: root-mean over random directions of the 1-D W2^2.

    ``x, y: [N, ...]`` with equal N (1-D OT is sorting). Returns a scalar (NaN where a
    coordinate is not finite).
    """
    x, y = flat_batch(jnp.asarray(x, jnp.float32)), flat_batch(jnp.asarray(y, jnp.float32))
    if x.shape != y.shape:
        raise ValueError(f"sliced_w2 needs point sets of equal shape; got {x.shape} and {y.shape}")
    _check_nonempty("sliced_w2", x, y)
    check_key(key)
    num_projections = check_int("num_projections", num_projections)  # (0 gave 0.0)
    return _sliced_w2(x, y, key, num_projections)


# The metrics' array work runs as one jitted program per shape behind their argument checks: op
# by op it cost ~0.3 ms (sliced_w2), 0.1 ms (psnr) and 1.7 ms (ssim) per call (perf audit).
@functools.partial(jax.jit, static_argnums=3)
def _sliced_w2(x: Array, y: Array, key: Array, num_projections: int) -> Array:
    d = jax.random.normal(key, (x.shape[1], num_projections), x.dtype)  # (float32 under x64 too)
    d = d / jnp.linalg.norm(d, axis=0, keepdims=True)
    px, py = jnp.sort(x @ d, axis=0), jnp.sort(y @ d, axis=0)
    finite = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(y))  # (an inf coordinate gave inf, not NaN)
    return jnp.where(finite, _safe_sqrt(jnp.mean((px - py) ** 2)), jnp.nan)


def mmd(x: Array, y: Array, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0, 5.0)) -> Array:
    """Unbiased squared maximum mean discrepancy with a sum of Gaussian kernels.

    ``k(a, b) = sum_h exp(-||a - b||^2 / (2 h^2))``. ``x: [N, D]``, ``y: [M, D]``; scalar.
    Memory: the kernel sums run over blocks of 1,024 rows, so at most ``[1024, max(N, M)]``
    kernel entries (float32) exist at once. The unbiased estimate (a U-statistic) can be negative
    when the distributions agree: ``mmd(x, x)`` is not 0 (e.g. -0.46 on 16 points).
    """
    x, y = flat_batch(jnp.asarray(x, jnp.float32)), flat_batch(jnp.asarray(y, jnp.float32))
    _check_same_dim("mmd", x, y)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"mmd (unbiased) needs at least 2 points per set; got {x.shape[0]} and {y.shape[0]}")
    hs = jnp.atleast_1d(jnp.asarray(bandwidths, jnp.float32))
    # (() gave 0.0, a zero bandwidth NaN, an infinite one 0.0; a traced value passes)
    if hs.ndim != 1 or not hs.size or (not isinstance(hs, jax.core.Tracer)
                                       and not np.all((np.asarray(hs) > 0) & np.isfinite(np.asarray(hs)))):
        raise ValueError(f"bandwidths must be a non-empty sequence of finite reals > 0; got {bandwidths!r}")

    return _mmd(x, y, hs)


@jax.jit  # (one program per shape: run op by op, the blocked sums' lax.map compiled on every call)
def _mmd(x: Array, y: Array, hs: Array) -> Array:
    n, m = x.shape[0], y.shape[0]
    # the diagonal the U-statistic leaves out is k(a, a) = H, with the pair's distance set to 0 exactly
    # (|a|^2 + |a|^2 - 2 a.a is not 0 in float32 far from the mean: -0.18 for 0 at a scale of 300)
    sxx = (_kernel_sum(x, x, hs, True) - n * hs.shape[0]) / (n * (n - 1))
    syy = (_kernel_sum(y, y, hs, True) - m * hs.shape[0]) / (m * (m - 1))
    return sxx + syy - 2.0 * _kernel_sum(x, y, hs, False) / (n * m)


def _kernel_sum(a: Array, b: Array, hs: Array, pairs_with_self: bool, block: int = 1024) -> Array:
    """``sum_ij k(a_i, b_j)`` over blocks of ``block`` rows of ``a``: the whole ``[N, M]`` kernel
    took 8 N^2 floats under ``jit`` (3 GiB at 10,000 points; memory audit), and one
    ``[N, M, H]`` intermediate ~0.5 GB at 3,000 points. ``pairs_with_self`` (``b`` is ``a``): the
    distance of ``a_i`` to ``b_i`` is 0."""

    def rows(r, start):
        d2 = _sq_dists(r, b)  # (one [block, M] kernel per bandwidth)
        if pairs_with_self:
            same = (start + jnp.arange(r.shape[0]))[:, None] == jnp.arange(b.shape[0])[None, :]
            d2 = jnp.where(same, 0.0, d2)
        return jnp.sum(sum(jnp.exp(-d2 / (2 * hs[i] * hs[i])) for i in range(hs.shape[0])))

    n = a.shape[0]
    if n <= block:
        return rows(a, 0)
    full = n // block
    starts = jnp.arange(full) * block
    total = jnp.sum(jax.lax.map(lambda args: rows(*args), (a[:full * block].reshape(full, block, a.shape[1]), starts)))
    return total + (rows(a[full * block:], full * block) if n % block else 0.0)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64) of ``features: [N, D]`` (or ``[N]``: D = 1)."""
    f = np.asarray(features, np.float64)
    f = f[:, None] if f.ndim == 1 else flat_batch(f)
    if f.shape[0] < 2:
        raise ValueError(f"gaussian_stats needs at least 2 feature vectors; got features of shape {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet distance between Gaussians: ``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)``.

    Computed with symmetric eigendecompositions in float64 (stable for singular covariances).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    c1, c2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    d = mu1.shape[0]
    for name, a, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)), ("cov1", c1, (d, d)), ("cov2", c2, (d, d))):
        if a.shape != shape:
            raise ValueError(f"frechet_distance: {name} must have shape {shape} (D = {d} from mu1); got {a.shape}")

    if not all(np.all(np.isfinite(a)) for a in (mu1, mu2, c1, c2)):
        # (diverged features: numpy's eigh raised "Eigenvalues did not converge" on NaN for D = 3..8)
        return float("nan")
    for name, c in (("cov1", c1), ("cov2", c2)):  # (-I against I scored 0.0; an asymmetric one was symmetrised)
        scale = max(float(np.max(np.abs(c))), np.finfo(np.float64).tiny)
        w = np.linalg.eigvalsh(0.5 * (c + c.T))
        if np.max(np.abs(c - c.T)) > 1e-6 * scale or w[0] < -1e-6 * scale:
            raise ValueError(f"frechet_distance: {name} must be a symmetric positive semi-definite covariance; "
                             f"got asymmetry {np.max(np.abs(c - c.T)):.3g} and smallest eigenvalue {w[0]:.3g}")

    def sqrtm_psd(c):
        w, v = np.linalg.eigh(0.5 * (c + c.T))
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    s1 = sqrtm_psd(c1)
    cross = sqrtm_psd(s1 @ c2 @ s1)
    # (>= 0: rounding of singular covariances gave -4e-6 for identical inputs)
    # (np.maximum, not max(0.0, .): Python's max dropped a NaN and scored NaN features as 0.0)
    return float(np.maximum(0.0, np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(cross)))


def psnr(x: Array, ref: Array, data_range: float = 2.0) -> Array:
    """Peak signal-to-noise ratio per example, ``10 log10(data_range^2 / mse)`` in dB.

    ``x, ref: [B, ...]`` of equal shape (images in [-1, 1] have ``data_range = 2``); returns ``[B]``."""
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    # (broadcasting [B, H, W, 1] against [B, H, W] with B = H averaged the wrong pixels: 7 dB for 27)
    if x.ndim < 1 or x.shape != ref.shape:
        raise ValueError(f"psnr expects two [B, ...] arrays of equal shape; got x: {x.shape} and ref: {ref.shape}")
    check_positive_real("data_range", data_range)  # (0 gave -inf dB)
    return _psnr(x, ref, data_range)


@jax.jit
def _psnr(x: Array, ref: Array, data_range) -> Array:
    mse = jnp.mean(flat_batch((x - ref) ** 2), axis=-1)
    data_range = data_range * 1.0  # (an int range arrives as int32: 65535 ** 2 overflowed to a NaN)
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-20))


def _gaussian_window(radius: int, sigma: float) -> Array:
    r = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    g = jnp.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    return jnp.outer(g, g)


def ssim(x: Array, ref: Array, data_range: float = 2.0, window: int = 7, sigma: float = 1.5) -> Array:
    """Structural similarity (Wang et al. 2004) per example, averaged over channels and pixels.

    Local means, variances and covariance by Gaussian filtering (std ``sigma``, truncated at
    3.5 std: the paper's 11-tap filter for ``sigma = 1.5``) with symmetric boundary reflection;
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L = data_range``; the SSIM map is averaged
    after cropping ``(window - 1) // 2`` pixels at each border. This is scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
    win_size=window)``; ``window = 7`` leaves a 2x2 map on 8x8 digits. ``x, ref: [B, H, W, C]``;
    returns ``[B]``.
    """
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    if x.ndim != 4 or x.shape != ref.shape:
        raise ValueError(f"ssim expects two [B, H, W, C] arrays of equal shape; got {x.shape} and {ref.shape}")
    # (window = -1 passed and cropped to the last row and column; a float window was a bare TypeError)
    if not is_int(window) or window > min(x.shape[1], x.shape[2]) or window % 2 == 0:
        raise ValueError(f"window must be odd, a positive int and at most the image size {x.shape[1:3]}; "
                         f"got {window!r}")
    check_positive_real("sigma", sigma)  # (0 gave NaN, < 0 an "index can't contain negative values")
    check_positive_real("data_range", data_range)  # (0 dropped C1 and C2 and gave a number)
    radius = int(3.5 * sigma + 0.5)  # (in sigma's own type, as before: float32 rounds at some boundaries)
    return _ssim(x, ref, data_range, int(window), float(sigma), radius)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _ssim(x: Array, ref: Array, data_range, window: int, sigma: float, radius: int) -> Array:
    w = _gaussian_window(radius, sigma)[:, :, None, None]

    def filt(img):  # [B, H, W, C] -> Gaussian filtering per channel, same size
        B, H, W, C = img.shape
        v = img.transpose(0, 3, 1, 2).reshape(B * C, H, W, 1)
        v = jnp.pad(v, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="symmetric")
        out = jax.lax.conv_general_dilated(v, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out.reshape(B, C, H, W)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(ref)
    vx = filt(x * x) - mx * mx
    vy = filt(ref * ref) - my * my
    cxy = filt(x * ref) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    p = (window - 1) // 2
    s = s[:, :, p:s.shape[2] - p, p:s.shape[3] - p]
    return jnp.mean(flat_batch(s), axis=-1)
