import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy.special import logsumexp

import genflow as gf
from conftest import count_compiles


def test_w2_exact_1d_and_translation():
    x = np.random.default_rng(0).normal(size=(300, 1))
    y = np.random.default_rng(1).normal(size=(300, 1)) * 2 + 1
    # 1-D OT is sorting
    expected = np.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
    np.testing.assert_allclose(gf.metrics.w2_exact(x, y), expected, rtol=1e-10)
    z = np.random.default_rng(2).normal(size=(200, 3))
    np.testing.assert_allclose(gf.metrics.w2_exact(z, z + np.array([3.0, 0, 4.0])), 5.0, rtol=1e-10)
    with pytest.raises(ValueError, match="equal shape"):
        gf.metrics.w2_exact(z, z[:10])


def test_sinkhorn_approaches_exact():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + np.array([1.0, 0.0])
    exact = gf.metrics.w2_exact(x, y)
    approx = float(gf.metrics.w2_sinkhorn(jnp.asarray(x), jnp.asarray(y), epsilon=0.002, iters=2000))
    assert abs(approx - exact) < 0.05 * exact


def test_sliced_w2_translation():
    x = jax.random.normal(jax.random.key(0), (500, 2))
    # 1-D projections of a translation by d: mean over directions of (d.u)^2 = |d|^2 / 2 in 2-D
    s = gf.metrics.sliced_w2(x, x + jnp.array([2.0, 0.0]), jax.random.key(1), num_projections=4000)
    np.testing.assert_allclose(float(s), np.sqrt(2.0), rtol=0.03)


def test_mmd_separates_distributions():
    a = jax.random.normal(jax.random.key(0), (500, 2))
    b = jax.random.normal(jax.random.key(1), (500, 2))
    c = b + 1.0
    assert abs(float(gf.metrics.mmd(a, b))) < 0.02
    assert float(gf.metrics.mmd(a, c)) > 0.2


def test_frechet_distance_closed_form():
    # diagonal Gaussians: |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, 1.0])
    v1, v2 = np.array([1.0, 4.0]), np.array([4.0, 1.0])
    fd = gf.metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    np.testing.assert_allclose(fd, 1.0 + 1.0 + 1.0, rtol=1e-10)
    f = np.random.default_rng(0).normal(size=(20000, 3))
    m, c = gf.metrics.gaussian_stats(f)
    assert gf.metrics.frechet_distance(m, c, np.zeros(3), np.eye(3)) < 0.01


def test_psnr_and_ssim_against_references():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    y = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
    mse = ((x - y) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(gf.metrics.psnr(y, x), 10 * np.log10(4.0 / mse), rtol=1e-5)
    ref = [structural_similarity(x[i], y[i], data_range=2.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, win_size=7, channel_axis=-1) for i in range(3)]
    np.testing.assert_allclose(gf.metrics.ssim(y, x), ref, rtol=1e-4)
    np.testing.assert_allclose(gf.metrics.ssim(x, x), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="window must be odd"):
        gf.metrics.ssim(x, y, window=9)


def test_w2_translation_and_far_from_the_origin():
    x = jax.random.normal(jax.random.key(7), (128, 2))
    for m in (0.5, 3.0, 10.0):  # the debiased Sinkhorn divergence of a translation is exactly |m|^2
        np.testing.assert_allclose(float(gf.metrics.w2_sinkhorn(x, x + jnp.array([m, 0.0]))), m, rtol=2e-3)
    xf = np.asarray(x, np.float64) + 1e4
    assert gf.metrics.w2_exact(xf, xf) == 0.0  # no |x|^2 + |y|^2 - 2 x.y cancellation
    np.testing.assert_allclose(gf.metrics.w2_exact(xf, xf + [0.0, 0.25]), 0.25, rtol=1e-9)


def test_metric_argument_checks():
    x = jnp.zeros((8, 2))
    with pytest.raises(ValueError, match="mmd needs points of the same dimension"):
        gf.metrics.mmd(x, jnp.zeros((8, 3)))
    with pytest.raises(ValueError, match="w2_sinkhorn needs points of the same dimension"):
        gf.metrics.w2_sinkhorn(x, jnp.zeros((8, 3)))
    with pytest.raises(ValueError, match="at least 2 points per set"):
        gf.metrics.mmd(x, jnp.zeros((1, 2)))


def test_sinkhorn_and_mmd_far_from_the_origin():
    # |x|^2 + |y|^2 - 2 x.y in float32 cancelled: at an offset of 3,000 w2_sinkhorn was 0.09 for 0.56
    x = jax.random.normal(jax.random.key(0), (256, 2))
    y = jax.random.normal(jax.random.key(1), (256, 2)) + jnp.array([0.5, 0.0])
    s = jnp.array([3000.0, -3000.0])
    np.testing.assert_allclose(float(gf.metrics.w2_sinkhorn(x + s, y + s)), float(gf.metrics.w2_sinkhorn(x, y)),
                               rtol=2e-3)
    np.testing.assert_allclose(float(gf.metrics.mmd(x + s, y + s)), float(gf.metrics.mmd(x, y)), rtol=2e-2)


def test_distances_have_finite_gradients_where_the_sets_coincide():
    # jnp.sqrt at 0: all-NaN gradients at the optimum when used as a loss
    x = jax.random.normal(jax.random.key(0), (16, 2))
    for f in (lambda a: gf.metrics.sliced_w2(a, x, jax.random.key(1)), lambda a: gf.metrics.w2_sinkhorn(a, x)):
        assert np.all(np.isfinite(np.asarray(jax.grad(f)(x))))
        assert np.all(np.isfinite(np.asarray(jax.grad(f)(x + 0.3))))


def test_frechet_distance_1d_small_n_and_shapes():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.0, 1.0, 500), rng.normal(1.0, 2.0, 500)
    (m1, c1), (m2, c2) = gf.metrics.gaussian_stats(a), gf.metrics.gaussian_stats(b[:, None])
    assert c1.shape == (1, 1) and c2.shape == (1, 1)  # np.cov gave 0-d covariances and eigh failed
    ref = (m1[0] - m2[0]) ** 2 + (np.sqrt(c1[0, 0]) - np.sqrt(c2[0, 0])) ** 2
    np.testing.assert_allclose(gf.metrics.frechet_distance(m1, c1, m2, c2), ref, rtol=1e-10)
    f = rng.normal(size=(5, 8))  # N < D: singular covariances; identical inputs gave -4e-6
    m, c = gf.metrics.gaussian_stats(f)
    assert gf.metrics.frechet_distance(m, c, m, c) >= 0.0
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        gf.metrics.gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"mu2 must have shape \(1,\)"):  # broadcast silently to 0.0
        gf.metrics.frechet_distance(np.zeros(1), np.eye(1), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"cov2 must have shape \(3, 3\)"):
        gf.metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


def test_non_finite_samples_do_not_score_a_perfect_distance():
    # _safe_sqrt mapped NaN to 0 and frechet_distance's max(0.0, nan) returned 0.0: one diverged
    # sample made sliced_w2, w2_sinkhorn and the Frechet distance report a perfect match
    x = jax.random.normal(jax.random.key(0), (32, 2))
    y = x + 3.0
    y_nan, y_inf = y.at[0, 0].set(jnp.nan), y.at[0, 0].set(jnp.inf)
    assert np.isnan(float(gf.metrics.sliced_w2(x, y_nan, jax.random.key(1))))
    assert np.isnan(float(gf.metrics.w2_sinkhorn(x, y_nan, iters=50)))
    assert not float(gf.metrics.w2_sinkhorn(x, y_inf, iters=50)) < 1.0  # was 0.0
    assert np.isnan(float(gf.metrics.sliced_w2(x, y_inf, jax.random.key(1))))  # (was inf)
    with pytest.raises(ValueError, match="bandwidths must be a non-empty sequence of finite reals"):
        gf.metrics.mmd(x, y, bandwidths=(1.0, np.inf))  # (gave 0.0 for an infinite one alone)
    m1, c1 = gf.metrics.gaussian_stats(np.asarray(x))
    m2, c2 = gf.metrics.gaussian_stats(np.asarray(y_nan))
    assert np.isnan(gf.metrics.frechet_distance(m1, c1, m2, c2))
    # at D = 3..8 numpy's eigh raised "Eigenvalues did not converge" on the NaN covariance
    for d in (3, 4, 8):
        f = np.random.default_rng(d).normal(size=(100, d))
        g = f.copy()
        g[0, 0] = np.nan
        assert np.isnan(gf.metrics.frechet_distance(*gf.metrics.gaussian_stats(g), *gf.metrics.gaussian_stats(f)))
    # still exactly 0 with a finite gradient where the sets coincide
    assert float(gf.metrics.sliced_w2(x, x, jax.random.key(1))) == 0.0
    g = jax.grad(lambda a: gf.metrics.sliced_w2(a, x, jax.random.key(1)))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    assert gf.metrics.frechet_distance(m1, c1, m1, c1) >= 0.0


def test_metric_hyperparameters_are_checked():
    x = jax.random.normal(jax.random.key(0), (16, 2))
    y = x + 1.0
    with pytest.raises(ValueError, match="num_projections must be a positive int"):
        gf.metrics.sliced_w2(x, y, jax.random.key(1), num_projections=0)  # was 0.0
    with pytest.raises(ValueError, match="epsilon must be a real > 0"):
        gf.metrics.w2_sinkhorn(x, y, epsilon=0.0)  # was 0.93 for a W2 of 1.41
    with pytest.raises(ValueError, match="iters must be a positive int"):
        gf.metrics.w2_sinkhorn(x, y, iters=0)  # was 0.0
    for bw in ((), (0.0,), (1.0, -2.0)):
        with pytest.raises(ValueError, match="bandwidths must be"):
            gf.metrics.mmd(x, y, bandwidths=bw)  # () gave 0.0, (0.0,) NaN
    assert float(gf.metrics.mmd(x, y, bandwidths=jnp.array([1.0]))) > 0.0


def test_psnr_refuses_unequal_shapes_and_a_bad_data_range():
    # [B, H, W, 1] against [B, H, W] with B = H broadcast to [B, H, W, W]: 7 dB reported for 27 dB,
    # and a batch of one against eight averaged all eight into one number
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
    y = np.clip(x + 0.1 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
    np.testing.assert_allclose(gf.metrics.psnr(y, x), 10 * np.log10(4.0 / ((x - y) ** 2).reshape(8, -1).mean(1)),
                               rtol=1e-5)
    with pytest.raises(ValueError, match=r"psnr expects two \[B, \.\.\.\] arrays of equal shape"):
        gf.metrics.psnr(y, x[..., 0])
    with pytest.raises(ValueError, match="equal shape"):
        gf.metrics.psnr(y[:1], x)
    with pytest.raises(ValueError, match="data_range must be a real > 0"):
        gf.metrics.psnr(y, x, data_range=0.0)  # was -inf dB


def test_ssim_window_sigma_and_data_range_are_checked():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    y = np.clip(x + 0.2, -1, 1)
    for w in (-1, -3, 7.0):  # -1 passed (odd, <= 8) and averaged the last row and column only
        with pytest.raises(ValueError, match="window must be odd, a positive int"):
            gf.metrics.ssim(y, x, window=w)
    for s in (0.0, -1.0):  # 0 gave NaN, -1 "index can't contain negative values"
        with pytest.raises(ValueError, match="sigma must be a real > 0"):
            gf.metrics.ssim(y, x, sigma=s)
    with pytest.raises(ValueError, match="data_range must be a real > 0"):
        gf.metrics.ssim(y, x, data_range=0.0)
    assert np.all(np.isfinite(np.asarray(gf.metrics.ssim(y, x, window=1))))


def test_w2_exact_of_a_diverged_sample_is_nan_not_a_scipy_error():
    # SciPy raised "matrix contains invalid numeric entries" (NaN) / "cost matrix is infeasible" (inf),
    # where sliced_w2 / w2_sinkhorn / frechet_distance report NaN
    x = np.random.default_rng(0).normal(size=(16, 2))
    for bad in (np.nan, np.inf, -np.inf):
        y = x + 1.0
        y[3, 1] = bad
        assert np.isnan(gf.metrics.w2_exact(x, y))
        assert np.isnan(gf.metrics.w2_exact(y, x))
    np.testing.assert_allclose(gf.metrics.w2_exact(x, x + [3.0, 4.0]), 5.0, rtol=1e-12)


def test_frechet_distance_refuses_a_covariance_that_is_not_one():
    # -I against I scored 0.0 (the negative eigenvalues were clipped); an asymmetric matrix was symmetrised
    eye = np.eye(3)
    with pytest.raises(ValueError, match="cov1 must be a symmetric positive semi-definite covariance"):
        gf.metrics.frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)
    with pytest.raises(ValueError, match="cov2 must be a symmetric"):
        gf.metrics.frechet_distance(np.zeros(3), eye, np.zeros(3), eye + np.triu(np.ones((3, 3)), 1))
    # a singular covariance with rounding (eigenvalue ~ -1e-17) is still a covariance
    v = np.random.default_rng(0).normal(size=(3, 2))
    assert gf.metrics.frechet_distance(np.zeros(3), v @ v.T, np.zeros(3), v @ v.T) < 1e-6


def test_mmd_against_a_hand_computed_u_statistic():
    """x = {0, 1}, y = {2, 4} in 1-D, one bandwidth h: the unbiased MMD^2 is
    k(0, 1) + k(2, 4) - 2 mean(k(0, 2), k(0, 4), k(1, 2), k(1, 4)), k(a, b) = exp(-(a - b)^2 / (2 h^2))."""
    for h in (0.7, 1.5):
        k = lambda d: math.exp(-d * d / (2 * h * h))  # noqa: E731
        want = k(1) + k(2) - 0.5 * (k(2) + k(4) + k(1) + k(3))
        got = gf.metrics.mmd(jnp.array([[0.0], [1.0]]), jnp.array([[2.0], [4.0]]), bandwidths=(h,))
        np.testing.assert_allclose(float(got), want, rtol=1e-6)
    # a sum of kernels is the sum of the MMDs
    x, y = jnp.array([[0.0], [1.0]]), jnp.array([[2.0], [4.0]])
    both = gf.metrics.mmd(x, y, bandwidths=(0.7, 1.5))
    np.testing.assert_allclose(float(both), sum(float(gf.metrics.mmd(x, y, bandwidths=(h,))) for h in (0.7, 1.5)),
                               rtol=1e-6)


def test_mmd_is_an_unbiased_estimate_of_the_gaussian_closed_form():
    """For N(0, I) vs N(delta, I) in D dimensions and k = exp(-|a - b|^2 / (2 h^2)):
    E k = (h^2 / (h^2 + 2))^(D/2) exp(-|m1 - m2|^2 / (2 (h^2 + 2))), so
    MMD^2 = 2 (h^2 / (h^2 + 2))^(D/2) (1 - exp(-|delta|^2 / (2 (h^2 + 2)))) per bandwidth."""
    d, n, hs = 2, 2000, (0.5, 1.0, 2.0)
    delta = np.array([0.6, 0.0])
    want = sum(2 * (h * h / (h * h + 2)) ** (d / 2) * (1 - math.exp(-delta @ delta / (2 * (h * h + 2)))) for h in hs)
    ests = []
    for s in range(4):
        kx, ky = jax.random.split(jax.random.key(s))
        x = jax.random.normal(kx, (n, d))
        y = jax.random.normal(ky, (n, d)) + delta
        ests.append(float(gf.metrics.mmd(x, y, bandwidths=hs)))
    # measured standard deviation of one estimate 0.012 at n = 2000 (12 seeds): the mean of 4 has SE 0.006
    assert abs(np.mean(ests) - want) < 0.03, (ests, want)


def test_w2_sinkhorn_compiles_once():
    """Eagerly, its Sinkhorn loop closed over new arrays at every call and was compiled anew (three
    programs, ~0.9 s per call at 64 points; perf review helper's finding): new points and a new
    epsilon reuse the compiled core; a traced iteration count still works."""
    x = jax.random.normal(jax.random.key(0), (64, 2))
    y = jax.random.normal(jax.random.key(3), (64, 2)) + 0.3
    first = float(gf.metrics.w2_sinkhorn(x, y))
    assert count_compiles(lambda: [gf.metrics.w2_sinkhorn(x + e, y, epsilon=0.01 + e).block_until_ready()
                                   for e in (0.1, 0.2)]) == 0
    traced = jax.jit(lambda it: gf.metrics.w2_sinkhorn(x, y, iters=it))(jnp.int32(500))
    np.testing.assert_allclose(float(traced), first, rtol=1e-5)


def _np_sinkhorn_divergence(x, y, epsilon, iters=3000):
    """Debiased Sinkhorn divergence (Feydy et al. 2019), log domain, float64, one
    eps = epsilon * mean |x_i - y_j|^2 for all three terms, uniform weights."""
    def cost(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    eps = epsilon * cost(x, y).mean()

    def ot(a, b):
        c = cost(a, b)
        la, lb = -np.log(len(a)) * np.ones(len(a)), -np.log(len(b)) * np.ones(len(b))
        f, g = np.zeros(len(a)), np.zeros(len(b))
        for _ in range(iters):
            f = -eps * logsumexp((g[None, :] - c) / eps + lb[None, :], axis=1)
            g = -eps * logsumexp((f[:, None] - c) / eps + la[:, None], axis=0)
        return f.mean() + g.mean()

    return np.sqrt(max(ot(x, y) - 0.5 * (ot(x, x) + ot(y, y)), 0.0))


def test_w2_sinkhorn_matches_a_numpy_sinkhorn_divergence_for_unequal_sizes_and_spreads():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2))
    y = 2.0 * rng.normal(size=(60, 2)) + np.array([0.5, -0.3])
    for eps in (0.05, 0.2):
        want = _np_sinkhorn_divergence(x, y, eps)
        got = float(gf.metrics.w2_sinkhorn(jnp.asarray(x), jnp.asarray(y), epsilon=eps, iters=3000))
        np.testing.assert_allclose(got, want, rtol=2e-3)
    # the divergence is symmetric in its arguments
    a = float(gf.metrics.w2_sinkhorn(jnp.asarray(x), jnp.asarray(y), epsilon=0.2))
    b = float(gf.metrics.w2_sinkhorn(jnp.asarray(y), jnp.asarray(x), epsilon=0.2))
    np.testing.assert_allclose(a, b, rtol=2e-3)


def test_frechet_distance_with_non_commuting_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    c1, c2 = a @ a.T + 0.1 * np.eye(3), b @ b.T + 0.1 * np.eye(3)
    mu1, mu2 = rng.normal(size=3), rng.normal(size=3)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * np.real(scipy.linalg.sqrtm(c1 @ c2)))
    np.testing.assert_allclose(gf.metrics.frechet_distance(mu1, c1, mu2, c2), want, rtol=1e-8)


def test_ssim_matches_scikit_image_at_other_sigmas_and_windows():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (2, 12, 12, 2)).astype(np.float32)
    y = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
    for sigma, win in ((1.0, 5), (0.8, 7), (2.0, 9)):
        ref = [structural_similarity(x[i], y[i], data_range=2.0, gaussian_weights=True, sigma=sigma,
                                     use_sample_covariance=False, win_size=win, channel_axis=-1) for i in range(2)]
        np.testing.assert_allclose(gf.metrics.ssim(y, x, sigma=sigma, window=win), ref, rtol=1e-4)


def test_empty_point_sets_and_bad_keys_are_refused_by_name():
    """An empty set gave NaN (which reads as a diverged sample) in the three W2 functions while mmd
    refused it; sliced_w2 with an integer key failed with JAX's 'invalid PRNG key data'."""
    e, p = np.zeros((0, 2)), np.ones((3, 2))
    with pytest.raises(ValueError, match="w2_exact needs at least 1 point per set; got 0 and 0"):
        gf.metrics.w2_exact(e, e)
    with pytest.raises(ValueError, match="w2_sinkhorn needs at least 1 point per set; got 0 and 3"):
        gf.metrics.w2_sinkhorn(e, p)
    with pytest.raises(ValueError, match="sliced_w2 needs at least 1 point per set"):
        gf.metrics.sliced_w2(e, e, jax.random.key(0))
    with pytest.raises(TypeError, match="key must be one PRNG key"):
        gf.metrics.sliced_w2(p, p, 0)
    assert float(gf.metrics.w2_exact(p[:1], p[:1] + 2.0)) == pytest.approx(2.0 * math.sqrt(2.0))
    with pytest.raises(TypeError, match="debiased must be True or False"):
        gf.metrics.w2_sinkhorn(p, p + 1.0, debiased="False")  # truthy: the debiased value before


def test_mmd_sums_its_kernels_in_blocks_of_rows():
    """The whole [N, M] kernels took 8 N^2 floats under jit (3 GiB at 10,000 points; memory
    audit); summed over blocks of 1,024 rows they take a few [1024, N] blocks, with the value of
    the float64 U-statistic (N = 2,500: two full blocks and a remainder)."""
    shape = jax.ShapeDtypeStruct((10_000, 2), jnp.float32)
    temp = jax.jit(gf.metrics.mmd).lower(shape, shape).compile().memory_analysis().temp_size_in_bytes
    assert temp < 400 * 2**20, temp / 2**20  # (3,064 MiB before)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2500, 2)), rng.normal(size=(1100, 2)) + [0.3, 0.0]
    hs = np.array([0.1, 0.2, 0.5, 1.0, 2.0, 5.0])

    def ksum(a, b):
        d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
        return np.exp(-d2[..., None] / (2 * hs ** 2)).sum()

    n, m = len(x), len(y)
    ref = ((ksum(x, x) - n * 6) / (n * (n - 1)) + (ksum(y, y) - m * 6) / (m * (m - 1))
           - 2 * ksum(x, y) / (n * m))
    np.testing.assert_allclose(float(gf.metrics.mmd(x, y)), ref, rtol=1e-3)
    # one program per shape: called op by op, the blocks' lax.map compiled on every call (perf audit)
    assert count_compiles(lambda: float(gf.metrics.mmd(x, y))) == 0



def test_mmd_far_from_the_origin_leaves_out_the_diagonal_exactly():
    """The U-statistic leaves out k(a_i, a_i) = H; the blocked sums subtracted H from a diagonal
    computed as |a|^2 + |a|^2 - 2 a.a, not 0 in float32 far from the mean: -0.18 for 0 at a
    scale of 300 (review). Here against the float64 U-statistic, one block and three."""
    hs = np.array([0.1, 0.2, 0.5, 1.0, 2.0, 5.0])

    def ustat(x, y):
        def ksum(a, b, self_pairs):
            d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
            k = np.exp(-d2[..., None] / (2 * hs ** 2)).sum(-1)
            return k.sum() - (np.trace(k) if self_pairs else 0.0)
        n, m = len(x), len(y)
        return ksum(x, x, True) / (n * (n - 1)) + ksum(y, y, True) / (m * (m - 1)) - 2 * ksum(x, y, False) / (n * m)

    rng = np.random.default_rng(0)
    for scale, n, d in ((300.0, 16, 50), (30.0, 2100, 2)):
        x, y = scale * rng.normal(size=(n, d)), scale * rng.normal(size=(n, d))
        np.testing.assert_allclose(float(gf.metrics.mmd(x, y)), ustat(x, y), atol=1e-4)


def test_psnr_and_ssim_take_integer_ranges_and_numpy_sigmas_as_before():
    """psnr's jitted core got an int data_range as int32, and 65535 ** 2 overflowed to a NaN; ssim's
    filter radius is computed from sigma in its own type, as before the jitted core (review)."""
    got = gf.metrics.psnr(np.zeros((1, 4)), np.full((1, 4), 100.0), data_range=65535)
    np.testing.assert_allclose(got, 10 * np.log10(65535.0 ** 2 / 1e4), rtol=1e-6)
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, (2, 16, 16, 1))
    ref = img + 0.2 * rng.normal(size=img.shape)
    a = gf.metrics.ssim(img, ref, sigma=np.float32(1.2857143))
    np.testing.assert_allclose(a, gf.metrics.ssim(img, ref, sigma=1.2857143), rtol=1e-6)


def test_gaussian_stats_is_the_unbiased_sample_covariance():
    """gaussian_stats: the mean and the covariance normalised by N - 1 (np.cov's default, as in
    FID's reference code; on 5 samples N and N - 1 differ by 25%)."""
    f = np.random.default_rng(3).normal(size=(5, 3)) * np.array([1.0, 2.0, 0.5]) + 4.0
    m, c = gf.metrics.gaussian_stats(f)
    np.testing.assert_allclose(m, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(c, np.cov(f.T, ddof=1), rtol=1e-12)
    r = f - f.mean(0)
    np.testing.assert_allclose(c, r.T @ r / 4, rtol=1e-12)
    np.testing.assert_allclose(gf.metrics.gaussian_stats(f[:, 1])[1], [[np.var(f[:, 1], ddof=1)]], rtol=1e-12)


def test_sliced_w2_in_one_dimension_is_the_exact_w2_of_the_sorted_samples():
    """In 1-D every direction is +-1, so the sliced distance is the exact W2 of two samples:
    sqrt(mean((sort(x) - sort(y))^2)) (a sliced_w2 that did not sort its projections matched
    the sample order instead)."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(200, 1)), 1.5 * rng.normal(size=(200, 1)) + 0.5
    want = np.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
    got = float(gf.metrics.sliced_w2(jnp.asarray(x), jnp.asarray(y), jax.random.key(0), num_projections=8))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got, gf.metrics.w2_exact(x, y), rtol=1e-5)


def test_w2_exact_under_a_transformation_says_it_runs_on_the_host():
    """w2_exact (SciPy's assignment) on traced arrays: a TypeError naming the jittable alternatives;
    it was NumPy's anonymous TracerArrayConversionError (composability audit)."""
    x = jax.random.normal(jax.random.key(0), (3, 8, 2))
    for transform in (jax.vmap, jax.jit):
        with pytest.raises(TypeError, match="w2_exact runs on the host.*w2_sinkhorn or sliced_w2"):
            transform(gf.metrics.w2_exact)(x, x + 0.5)
    assert [gf.metrics.w2_exact(a, a + 0.5) for a in x] == pytest.approx([0.5 * np.sqrt(2)] * 3, rel=1e-6)


def test_jittable_metrics_compute_in_float32_under_x64_as_documented():
    """The module's contract: the jittable metrics run in float32 whatever the inputs' dtype, also
    under x64. sliced_w2's directions and w2_sinkhorn's potentials came out float64 there (a
    float64 result, and sliced_w2 drew other directions than the same key gives without x64)."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (64, 3)), np.float64)
    y, im = x[::-1] * 1.3 + 0.5, np.asarray(jax.random.uniform(jax.random.key(2), (2, 16, 16, 1)), np.float64)
    key = jax.random.key(1)
    calls = {"sliced_w2": lambda a, b: gf.metrics.sliced_w2(a, b, key), "w2_sinkhorn": gf.metrics.w2_sinkhorn,
             "mmd": gf.metrics.mmd, "psnr": lambda a, b: gf.metrics.psnr(im, im * 0.9),
             "ssim": lambda a, b: gf.metrics.ssim(im, im * 0.9)}
    plain = {name: f(x.astype(np.float32), y.astype(np.float32)) for name, f in calls.items()}
    with jax.enable_x64(True):
        wide = {name: f(jnp.asarray(x), jnp.asarray(y)) for name, f in calls.items()}
    assert {name: v.dtype for name, v in wide.items()} == {name: jnp.float32 for name in calls}
    for name in calls:
        np.testing.assert_allclose(wide[name], plain[name], rtol=1e-5, err_msg=name)
