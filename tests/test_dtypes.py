"""Precision: float64 runs (jax.enable_x64) reach float64 accuracy against the oracles, and no
hard-coded float32 / complex64 cast caps them at ~1e-7 (dtype audit's findings); float32 states
stay float32 under x64, and bfloat16 inputs do not round the oracles' times."""

import jax
import jax.numpy as jnp
import numpy as np

import genflow as gf
from genflow import inverse as inv


def _gaussians():
    gc = gf.oracles.Gaussian.diagonal(np.array([1.0, -1.0]), np.array([0.5, 0.2]))
    gu = gf.oracles.Gaussian.diagonal(np.array([0.0, 0.5]), np.array([1.0, 0.7]))
    return gc, gu


def test_guidance_scales_keep_float64_accuracy():
    # (scales were stored in float32: cfg at 1.1 was 9.6e-8 off the float64 formula)
    with jax.enable_x64(True):
        gc, gu = _gaussians()
        path = gf.paths.linear()
        c, u = gc.model(path, "eps"), gu.model(path, "eps")
        x = jax.random.normal(jax.random.key(0), (3, 2), jnp.float64)
        t = jnp.full((3,), 0.4, jnp.float64)
        exact = u(x, t) + 1.1 * (c(x, t) - u(x, t))
        for g in (gf.guidance.cfg(c, u, 1.1), gf.guidance.interval(gf.guidance.cfg(c, u, 1.1), 0.2, 0.9),
                  gf.guidance.adaptive(gf.guidance.cfg(c, u, 1.1), threshold=0.999999)):
            out = g(x, t)
            assert out.dtype == jnp.float64
            np.testing.assert_allclose(out, exact, rtol=0, atol=1e-14)
    # float32 models keep float32 outputs (a Python scale is weakly typed), bfloat16 ones bfloat16
    f = lambda x, t: 2 * x  # noqa: E731
    h = lambda x, t: x  # noqa: E731
    x32 = jnp.ones((2, 2), jnp.float32)
    assert gf.guidance.cfg(f, h, 1.1)(x32, jnp.full((2,), 0.5, jnp.float32)).dtype == jnp.float32
    assert gf.guidance.cfg(f, h, 1.1)(x32.astype(jnp.bfloat16), jnp.full((2,), 0.5)).dtype == jnp.bfloat16


def _exact_posterior_x0(mu, cov, A, sigma_y, y, x, a, s):
    """E[x0 | x_t = x, y] for x0 ~ N(mu, cov), x_t = a x0 + s eps, y = A x0 + sigma_y n."""
    prec = np.linalg.inv(cov) + (a / s) ** 2 * np.eye(len(mu)) + A.T @ A / sigma_y**2
    rhs = np.linalg.solve(cov, mu)[None] + (a / s**2) * x + (y @ A) / sigma_y**2
    return np.linalg.solve(prec, rhs.T).T


def test_tmpd_and_pigdm_are_float64_exact_for_a_gaussian_prior():
    # (sigma_y, weights and hyper-parameters were stored in float32: tmpd 5e-9 off the exact posterior
    # denoiser at sigma_y = 0.1, pigdm 1.4e-7 with a Python-float t)
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        L = rng.normal(size=(4, 4)) * 0.5
        cov, mu = L @ L.T + 0.3 * np.eye(4), rng.normal(size=4)
        A = rng.normal(size=(3, 4))
        op = inv.Matrix(jnp.asarray(A), jnp.asarray(np.linalg.pinv(A)), (4,), jnp.asarray(np.linalg.norm(A, 2) ** 2))
        path = gf.paths.vp_cosine()
        prior = gf.oracles.Gaussian.full(jnp.asarray(mu), jnp.asarray(cov))
        x = jnp.asarray(rng.normal(size=(3, 4)))
        y = jnp.asarray(rng.normal(size=(3, 3)))
        tmpd = inv.posterior_model(prior.model(path, "eps"), path, y, op, prediction="eps", method="tmpd",
                                   noise=inv.GaussianNoise(0.1))
        for t in (0.4, jnp.full((3,), 0.4, jnp.float64)):
            a, s = float(path.alpha(0.4)), float(path.sigma(0.4))
            exact = _exact_posterior_x0(mu, cov, A, 0.1, np.asarray(y), np.asarray(x), a, s)
            out = tmpd(x, t)
            assert out.dtype == jnp.float64
            np.testing.assert_allclose(out, exact, rtol=0, atol=1e-11)
        # pigdm with the exact isotropic prior variance: equal to tmpd's formula with C_t = r^2 I;
        # the same x0 for a Python-float t as for a float64 array t
        pig = inv.posterior_model(prior.model(path, "eps"), path, y, op, prediction="eps", method="pigdm",
                                  data_var=0.25, noise=inv.GaussianNoise(0.1))
        np.testing.assert_allclose(pig(x, 0.4), pig(x, jnp.full((3,), 0.4, jnp.float64)), rtol=0, atol=1e-13)


def test_operators_and_their_matrices_are_float64_exact():
    # (blur transfer functions were complex64 and operator_matrix's basis float32: ~2e-8 and 1/9
    # read 0.1111111119)
    with jax.enable_x64(True):
        np.testing.assert_allclose(inv.operator_matrix(inv.super_resolution(3), (6, 6, 1)).max(), 1 / 9, rtol=1e-15)
        op = inv.gaussian_blur((8, 8), 1.0)
        x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1), jnp.float64)
        k = np.zeros((8, 8))
        r = np.arange(-2, 3)
        g = np.exp(-0.5 * (r[:, None] ** 2 + r[None] ** 2))
        k[np.ix_(r % 8, r % 8)] = g / g.sum()  # the centred 5x5 Gaussian kernel, wrapped
        ref = np.real(np.fft.ifft2(np.fft.fft2(np.asarray(x)[..., 0]) * np.fft.fft2(k)))
        out = op.forward(x)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out[..., 0], ref, rtol=0, atol=1e-13)
        assert op.forward(x.astype(jnp.float32)).dtype == jnp.float32  # (the transfer cast to x's width)


def test_sde_solvers_keep_a_float32_state_under_x64():
    # (euler_maruyama / shark promoted the state to the float64 times: the model saw float64 x and t)
    seen = []

    def fn(x, t):
        seen.append((x.dtype, t.dtype))
        return -x

    with jax.enable_x64(True):
        path = gf.paths.linear()
        x1 = path.prior_sample(jax.random.key(0), (4, 2))
        for solver in ("euler_maruyama", "shark"):
            seen.clear()
            x0, _ = gf.sample(fn, path, x1, prediction="velocity", solver=solver, steps=4, key=jax.random.key(1),
                              t_start=0.999, t_end=1e-3)
            assert x0.dtype == jnp.float32 and set(seen) == {(np.dtype("float32"), np.dtype("float32"))}, (solver, set(seen))


def test_mixture_flow_map_defaults_work_in_float32_and_oracle_times_are_not_rounded_to_bfloat16():
    # (1e-10 tolerances in float32: "The maximum number of solver steps was reached")
    m = gf.oracles.GaussianMixture.random(jax.random.key(0), k=3, dim=2)
    path = gf.paths.vp_cosine()
    x = jax.random.normal(jax.random.key(1), (4, 2))
    y = m.flow_map(x, 0.9, 0.1, path)
    with jax.enable_x64(True):
        ref = m.flow_map(x.astype(jnp.float64), 0.9, 0.1, path)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4)
    # bfloat16 x: the oracle evaluated at t itself (0.995 was rounded to 0.99609375)
    g = gf.oracles.Gaussian.diagonal(np.array([1.0, -1.0]), np.array([0.5, 0.2]))
    lin = gf.paths.linear()
    xt = jax.random.normal(jax.random.key(2), (8, 2)).astype(jnp.bfloat16)
    t = jnp.full((8,), 0.995, jnp.float32)
    np.testing.assert_allclose(g.x0(xt, t, lin), g.x0(xt.astype(jnp.float32), t, lin), rtol=1e-6, atol=1e-6)


def test_a_python_int_time_is_weakly_typed():
    # (t = 1 became a strong float64 under x64 and promoted float32 conversions to float64)
    with jax.enable_x64(True):
        path = gf.paths.vp_cosine()
        x = jnp.ones((2, 3), jnp.float32)
        for t in (0.5, 1, 0):
            assert gf.param.convert(x, x, t, path, "eps", "x0").dtype == jnp.float32, t
        assert path.sigma(1).dtype == jnp.float64  # (alone, the default float)


def test_exact_blur_pinv_keeps_every_frequency_float64_resolves():
    """rcond=0 under x64: a fixed floor at |K| = 1e-5 max|K| (meant for float32 rounding) dropped
    real frequencies of float64 work (0.25 relative off NumPy's pseudo-inverse for a full-rank
    kernel of condition 2e6); frequencies zero up to rounding are still dropped."""
    with jax.enable_x64(True):
        op = inv.kernel_blur((8, 8), [[1.0, 1 - 1e-6]], rcond=0.0, normalize=False)
        x = jax.random.normal(jax.random.key(0), (1, 8, 8, 1), jnp.float64)
        y = op(x)
        dense = np.asarray(op(jnp.asarray(np.eye(64).reshape(64, 8, 8, 1)))).reshape(64, 64).T
        want = np.linalg.pinv(dense) @ np.asarray(y).reshape(64)
        got = np.asarray(op.pinv(y)).reshape(64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-8
        blocked = inv.kernel_blur((6, 6), [[1.0, 1.0]], rcond=0.0)  # a frequency exactly 0 (5.6e-17 by FFT)
        assert float(jnp.abs(blocked.pinv(blocked(jnp.ones((1, 6, 6, 1))))).max()) < 2.0
