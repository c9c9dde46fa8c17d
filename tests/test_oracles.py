import jax
import jax.numpy as jnp
import numpy as np

import genflow as gf


def test_gaussian_score_is_grad_log_prob_and_tweedie(gauss2):
    path = gf.paths.vp_linear()
    x = jax.random.normal(jax.random.key(0), (6, 2))
    t = jnp.linspace(0.1, 0.9, 6)
    g = jax.vmap(jax.grad(lambda xi, ti: gauss2.log_prob(xi[None], ti[None], path)[0]))(x, t)
    np.testing.assert_allclose(gauss2.score(x, t, path), g, rtol=1e-4, atol=1e-5)
    a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
    np.testing.assert_allclose(gauss2.x0(x, t, path), (x + s**2 * g) / a, rtol=1e-4, atol=1e-4)


def test_gaussian_flow_map_composes_and_pushes_marginals(gauss2):
    path = gf.paths.vp_cosine()
    x1 = gauss2.prior_sample(jax.random.key(0), 50000, path, 1.0)
    x0 = gauss2.flow_map(x1, 1.0, 0.0, path)
    np.testing.assert_allclose(np.cov(np.asarray(x0).T), gauss2.cov, atol=0.02)
    np.testing.assert_allclose(x0.mean(0), gauss2.mean, atol=0.02)
    mid = gauss2.flow_map(x1[:10], 1.0, 0.4, path)
    np.testing.assert_allclose(gauss2.flow_map(mid, 0.4, 0.0, path), x0[:10], rtol=1e-5, atol=1e-5)


def test_mixture_score_and_denoiser():
    gm = gf.oracles.GaussianMixture.random(jax.random.key(3), k=4, dim=3)
    path = gf.paths.linear()
    x = 2 * jax.random.normal(jax.random.key(0), (5, 3))
    t = jnp.linspace(0.2, 0.8, 5)
    g = jax.vmap(jax.grad(lambda xi, ti: gm.log_prob(xi[None], ti[None], path)[0]))(x, t)
    np.testing.assert_allclose(gm.score(x, t, path), g, rtol=1e-4, atol=1e-5)
    a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
    np.testing.assert_allclose(gm.x0(x, t, path), (x + s**2 * g) / a, rtol=1e-4, atol=1e-4)
    # log-density at t=0 is the mixture density
    xs = gm.sample(jax.random.key(1), 20000)
    comp = gm.nearest_component(xs)
    assert np.bincount(np.asarray(comp), minlength=4).min() > 3000
    # Monte-Carlo check of E[x0 | x_t]: regress x0 on x_t near a point is hard; check the mean instead
    xt = path.add_noise(xs, jax.random.normal(jax.random.key(2), xs.shape), jnp.full((20000,), 0.5))
    np.testing.assert_allclose(gm.x0(xt, jnp.full((20000,), 0.5), path).mean(0), xs.mean(0), atol=0.05)


def test_oracle_model_kinds_consistent(gauss2):
    path = gf.paths.vp_linear()
    x = jax.random.normal(jax.random.key(0), (4, 2)); t = jnp.full((4,), 0.3)
    x0 = gauss2.model(path, "x0")(x, t)
    for kind in gf.param.KINDS:
        out = gauss2.model(path, kind)(x, t)
        np.testing.assert_allclose(gf.param.convert(out, x, t, path, kind, "x0"), x0, rtol=1e-4, atol=1e-5)


def test_integer_parameters_are_promoted_to_float():
    g = gf.oracles.Gaussian.diagonal([0, 0], 0.5)  # an integer mean must not truncate the variance
    np.testing.assert_allclose(g.var, [0.5, 0.5])
    assert jnp.issubdtype(g.sample(jax.random.key(0), 3).dtype, jnp.floating)
    g = gf.oracles.Gaussian.full([0, 1], [[2, 0], [0, 1]])
    np.testing.assert_allclose(np.sort(np.asarray(g.var)), [1.0, 2.0])
    assert jnp.issubdtype(g.mean.dtype, jnp.floating)
