import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf
from conftest import assert_same_under_strict_rank_promotion, count_compiles


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


def test_log_probs_match_scipy_normalising_constants_included():
    # the score = grad log_prob checks cannot see the normalising constants
    from scipy.stats import multivariate_normal

    with jax.enable_x64(True):
        mean = np.array([0.7, -1.2, 0.3])
        cov = np.array([[0.8, 0.3, 0.1], [0.3, 0.5, 0.0], [0.1, 0.0, 0.4]])
        g = gf.oracles.Gaussian.full(jnp.asarray(mean), jnp.asarray(cov))
        gm = gf.oracles.GaussianMixture(jnp.array([0.2, -0.5]), jnp.array([[0.0, 1, 2], [1, -1, 0.0]]),
                                        jnp.array([[0.3, 0.5, 0.2], [1.0, 0.4, 0.6]]))
        w = np.exp([0.2, -0.5]) / np.exp([0.2, -0.5]).sum()
        x = np.asarray(jax.random.normal(jax.random.key(0), (4, 3), jnp.float64))
        t = np.array([0.0, 0.3, 0.7, 1.0])
        for name in ("vp_cosine", "linear", "ve"):
            path = gf.paths.get(name)
            lp, lpm = np.asarray(g.log_prob(jnp.asarray(x), jnp.asarray(t), path)), np.asarray(
                gm.log_prob(jnp.asarray(x), jnp.asarray(t), path))
            for i in range(4):
                a, s = float(path.alpha(t[i])), float(path.sigma(t[i]))
                ref = multivariate_normal(a * mean, a * a * cov + s * s * np.eye(3)).logpdf(x[i])
                refm = np.log(sum(w[k] * multivariate_normal(a * np.asarray(gm.means[k]), np.diag(
                    a * a * np.asarray(gm.vars[k]) + s * s)).pdf(x[i]) for k in range(2)))
                np.testing.assert_allclose(lp[i], ref, rtol=1e-10, err_msg=name)
                np.testing.assert_allclose(lpm[i], refm, rtol=1e-10, err_msg=name)


def test_mixture_denoiser_matches_importance_sampling():
    # E[x0 | x_t] by self-normalised importance sampling from the prior: a denoiser that returned
    # the prior mean would pass the tower-property check above, not this one
    gm = gf.oracles.GaussianMixture(jnp.array([0.2, -0.5]), jnp.array([[0.0, 1, 2], [1, -1, 0.0]]),
                                    jnp.array([[0.3, 0.5, 0.2], [1.0, 0.4, 0.6]]))
    path = gf.paths.linear()
    x0s = np.asarray(gm.sample(jax.random.key(5), 400_000), np.float64)
    xq, tq = np.array([[0.4, -0.3, 0.9]]), 0.3
    a, s = float(path.alpha(tq)), float(path.sigma(tq))
    logw = -0.5 * np.sum((xq - a * x0s) ** 2, -1) / s**2
    ww = np.exp(logw - logw.max())
    mc = (ww[:, None] * x0s).sum(0) / ww.sum()
    got = np.asarray(gm.x0(jnp.asarray(xq, jnp.float32), jnp.array([tq]), path))[0]
    np.testing.assert_allclose(got, mc, atol=0.02)
    assert np.max(np.abs(got - np.asarray(gm.mean))) > 0.3  # far from the prior mean: the check has teeth


def test_oracle_velocity_is_finite_where_sigma_prime_is_singular():
    # vp_linear at t = 0: alpha' x0 + sigma' eps was inf * 0 = NaN; the probability-flow form is finite
    path = gf.paths.vp_linear()
    g = gf.oracles.Gaussian.diagonal(jnp.array([0.3, -0.2]), jnp.array([0.5, 2.0]))
    x = jnp.array([[0.1, 0.4], [-1.0, 0.2]])
    for t in (0.0, 1e-6, 0.5):
        tb = jnp.full((2,), t)
        v = np.asarray(g.model(path, "velocity")(x, tb))
        pf = np.asarray(path.drift_coef(tb)[:, None] * x - 0.5 * path.diffusion_sq(tb)[:, None] * g.score(x, tb, path))
        np.testing.assert_allclose(v, pf, rtol=1e-4, atol=1e-6, err_msg=str(t))
    # the linear path at t = 1 (alpha = 0, drift_coef infinite) keeps alpha' x0 + sigma' eps
    lin = gf.paths.linear()
    v = g.model(lin, "velocity")(x, jnp.ones((2,)))
    np.testing.assert_allclose(v, -g.x0(x, jnp.ones((2,)), lin) - g.score(x, jnp.ones((2,)), lin), rtol=1e-5)


def test_oracles_refuse_negative_variances():
    with pytest.raises(ValueError, match="var must be >= 0"):
        gf.oracles.Gaussian.diagonal([0.0, 0.0], [-0.5, 1.0])
    with pytest.raises(ValueError, match="cov must be positive semi-definite"):
        gf.oracles.Gaussian.full([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]])  # eigenvalues -1, 3
    with pytest.raises(ValueError, match="vars must be >= 0"):
        gf.oracles.GaussianMixture(jnp.zeros(2), jnp.zeros((2, 2)), -jnp.ones((2, 2)))
    g = gf.oracles.Gaussian.full([0.0, 0.0], [[1.0, 1.0], [1.0, 1.0]])  # singular: allowed
    assert float(jnp.min(g.var)) >= 0.0


def test_oracles_name_bad_shapes_paths_keys_and_times():
    """Before, an x with 1 feature (or an unbatched [D] x) broadcast against a 3-D oracle and
    log_prob returned densities of other points; mixture arrays of inconsistent shapes normalised
    over one component and sampled only it; a list of variances skipped the variance check; a
    non-symmetric cov was symmetrised silently; a path name, key 0, n = -1 and t = 1.5 (score /
    velocity / log_prob extrapolated the path) failed far away or not at all."""
    p = gf.paths.vp_cosine()
    g = gf.oracles.Gaussian.diagonal(jnp.zeros(3), jnp.ones(3))
    m = gf.oracles.GaussianMixture(jnp.zeros(2), jnp.zeros((2, 3)), jnp.ones((2, 3)))
    for o in (g, m):
        for x in (jnp.ones((2, 1)), jnp.ones(3), jnp.ones((2, 2))):
            with pytest.raises(ValueError, match=r"x must be \[B, ...\] with 3 features"):
                o.log_prob(x, 0.5, p)
        with pytest.raises(TypeError, match="path must be a genflow.paths.Path"):
            o.model("linear")
        with pytest.raises(TypeError, match="path must be a genflow.paths.Path"):
            o.x0(jnp.ones((2, 3)), 0.5, "linear")
        with pytest.raises(TypeError, match="key must be one PRNG key"):
            o.sample(0, 2)
        with pytest.raises(ValueError, match="n must be"):
            o.sample(jax.random.key(0), -1)
        for kind in ("score", "velocity", "x0"):
            with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
                o.model(p, kind)(jnp.ones((2, 3)), 1.5)
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
            o.log_prob(jnp.ones((2, 3)), 1.5, p)
        for s, t, name in ((1.5, 0.1, "s"), (0.5, 1.3, "t")):  # (the start s was called t)
            with pytest.raises(ValueError, match=rf"^{name} must lie in \[0, 1\]"):
                o.flow_map(jnp.ones((2, 3)), s, t, p)
    # image-shaped x with D features still works
    assert g.log_prob(jnp.ones((2, 3, 1)), 0.5, p).shape == (2,)
    with pytest.raises(ValueError, match=r"logits: \[K\], means: \[K, D\] and vars: \[K, D\]"):
        gf.oracles.GaussianMixture(jnp.zeros(1), jnp.zeros((2, 3)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"logits: \[K\], means: \[K, D\] and vars: \[K, D\]"):
        gf.oracles.GaussianMixture(jnp.zeros(3), jnp.zeros((3, 3)), jnp.ones(3))  # vars [K]
    with pytest.raises(ValueError, match="vars must be >= 0"):
        gf.oracles.GaussianMixture([0.0, 0.0], [[0.0, 0.0], [1.0, 1.0]], [[1.0, -1.0], [1.0, 1.0]])
    lm = gf.oracles.GaussianMixture([0, 0], [[0, 0], [1, 1]], [[1, 1], [1, 1]])  # lists of ints
    assert lm.sample(jax.random.key(0), 4).shape == (4, 2) and lm.vars.dtype == jnp.result_type(float)
    iso = gf.oracles.GaussianMixture(jnp.zeros(2), jnp.zeros((2, 3)), jnp.ones((2, 1)))  # [K, 1]: isotropic
    np.testing.assert_allclose(iso.log_prob(jnp.ones((1, 3)), 0.5, p), g.log_prob(jnp.ones((1, 3)), 0.5, p),
                               rtol=1e-6)
    with pytest.raises(ValueError, match=r"mean must be a \[D\] vector"):
        gf.oracles.Gaussian.diagonal(0.0, 1.0)
    with pytest.raises(ValueError, match=r"cov: \[D, D\]"):
        gf.oracles.Gaussian.full(jnp.zeros(2), jnp.eye(3))
    with pytest.raises(ValueError, match="cov must be symmetric"):
        gf.oracles.Gaussian.full(jnp.zeros(2), jnp.array([[1.0, 0.0], [0.9, 1.0]]))
    with pytest.raises(ValueError, match="cov must be finite"):
        gf.oracles.Gaussian.full(jnp.zeros(2), jnp.array([[1.0, jnp.nan], [jnp.nan, 1.0]]))
    # traced, batched and mapped mixtures are not checked and still work: jit, a batch of mixtures from
    # vmap or stacking, scan outputs, tree.map to shapes or norms (a first version refused them all)
    f = jax.jit(lambda o, x: o.log_prob(x, 0.5, p))
    np.testing.assert_allclose(f(m, jnp.ones((2, 3))), m.log_prob(jnp.ones((2, 3)), 0.5, p), rtol=1e-6)
    GM = gf.oracles.GaussianMixture
    batch = jax.vmap(lambda k: GM.random(k, 3, 2))(jax.random.split(jax.random.key(0), 4))
    assert batch.means.shape == (4, 3, 2) and jax.vmap(lambda g: g.mean)(batch).shape == (4, 2)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), m, m)
    assert stacked.logits.shape == (2, 2)
    _, scanned = jax.lax.scan(lambda c, k: (c, GM.random(k, 3, 2)), 0, jax.random.split(jax.random.key(0), 2))
    assert scanned.vars.shape == (2, 3, 2)
    assert jax.tree.map(lambda a: a.shape, m).means == (2, 3)
    assert float(jax.tree.map(jnp.linalg.norm, m).means) == 0.0


def test_oracle_models_name_a_time_of_another_batch_size():
    x = jnp.ones((3, 2))
    for oracle in (gf.oracles.Gaussian.diagonal(jnp.zeros(2), 1.0),
                   gf.oracles.GaussianMixture(jnp.zeros(2), jnp.zeros((2, 2)), jnp.ones((2, 2)))):
        with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[B\] = \[3\]"):
            oracle.model(gf.paths.linear(), "eps")(x, jnp.full((2,), 0.5))


def test_oracle_velocity_has_finite_reverse_mode_gradients_where_sigma_prime_is_singular():
    # the unselected alpha' x0 + sigma' eps branch was inf * 0 at t = 0 on vp_linear: the value was
    # finite but a vjp (0 cotangent * inf) was NaN, while the jvp was finite
    path = gf.paths.vp_linear()
    g = gf.oracles.Gaussian.diagonal(jnp.array([0.3, -0.2]), jnp.array([0.5, 2.0]))
    fn = g.model(path, "velocity")
    x = jnp.array([[0.1, 0.4], [-1.0, 0.2]])
    for t in (0.0, 0.5):
        tb = jnp.full((2,), t)
        v, vjp = jax.vjp(lambda a: fn(a, tb), x)
        (back,) = vjp(jnp.ones_like(v))
        _, fwd = jax.jvp(lambda a: fn(a, tb), (x,), (jnp.ones_like(x),))
        # the Jacobian is diagonal (diagonal Gaussian): J^T 1 = J 1
        np.testing.assert_allclose(back, fwd, rtol=1e-5, atol=1e-6, err_msg=str(t))


def test_singular_gaussian_denoiser_at_t0():
    # a singular covariance is accepted, but a * var / (a^2 var + sigma^2) was 0/0 at t = 0 and the
    # whole denoised row was NaN; E[x0 | x_0 = x] = x for x on the data's support
    lin = gf.paths.linear()
    g = gf.oracles.Gaussian.full([0.0, 0.0], [[1.0, 1.0], [1.0, 1.0]])
    x = jnp.array([[0.3, 0.3], [1.0, 1.0]])
    np.testing.assert_allclose(g.x0(x, jnp.zeros(2), lin), x, atol=1e-6)
    gd = gf.oracles.Gaussian.diagonal([0.5, 0.0], [1.0, 0.0])
    np.testing.assert_allclose(gd.x0(jnp.array([[2.0, 0.0]]), jnp.zeros(1), lin), [[2.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(gd.x0(jnp.array([[2.0, 0.0]]), jnp.full((1,), 1e-4), lin), [[2.0, 0.0]], atol=1e-3)


def test_mixture_with_zero_variances_denoises_its_support_at_t0():
    # a zero variance made a^2 v + sigma^2 = 0 at t = 0 and every denoised row NaN (0 / 0); on the
    # support E[x0 | x_0 = x] = x, the denoiser's limit as t -> 0, with finite gradients (the identity
    # Jacobian is a convention: for t > 0 it is 0 along a zero-variance direction); also where
    # sigma^2 underflows (edm with sigma_min = 0 near t = 0: the formula with a replaced denominator
    # was 2e-3 off)
    gm = gf.oracles.GaussianMixture(jnp.zeros(2), jnp.array([[0.0, 1.0], [2.0, 3.0]]),
                                    jnp.array([[0.0, 0.5], [0.1, 0.0]]))
    x = jnp.array([[0.0, 1.2], [2.2, 3.0], [0.0, -0.4]])  # in the support of components 0, 1, 0
    for path in (gf.paths.linear(), gf.paths.vp_linear()):
        np.testing.assert_allclose(gm.x0(x, jnp.zeros(3), path), x, atol=1e-6)
        np.testing.assert_allclose(gm.x0(x, jnp.full((3,), 1e-5), path), x, atol=1e-3)
        jac = jax.jacfwd(lambda z: gm.x0(z[None], jnp.zeros(1), path)[0])(x[0])
        np.testing.assert_allclose(jac, np.eye(2), atol=1e-6)
        g = jax.grad(lambda z: jnp.sum(gm.x0(z, jnp.zeros(3), path)))(x)
        np.testing.assert_allclose(g, 1.0, atol=1e-6)
    edm0 = gf.paths.edm(sigma_min=0.0)
    s32 = edm0.sigma(jnp.float32(1e-3))
    assert float(s32 * s32) == 0.0 < float(s32)  # (float32 underflow)
    np.testing.assert_allclose(gm.x0(x, jnp.full((3,), 1e-3), edm0), x, atol=1e-6)
    # away from t = 0 nothing changed: Tweedie against the score
    lin, t = gf.paths.linear(), jnp.full((3,), 0.3)
    a, s = lin.alpha(t)[:, None], lin.sigma(t)[:, None]
    np.testing.assert_allclose(gm.x0(x, t, lin), (x + s**2 * gm.score(x, t, lin)) / a, rtol=1e-5, atol=1e-5)


def test_reference_flow_map_matches_the_gaussian_closed_form():
    """reference_flow_map (the adaptive Diffrax solve in linear-path coordinates behind
    GaussianMixture.flow_map) agrees with Gaussian.flow_map, the exact probability-flow map, from
    noise to near the data on vp_linear (alpha + sigma != 1 there, so the change of coordinates
    x_lin = x / (alpha + sigma) is exercised). Tsit5 instead of the default Dopri8: the same
    transformation, a third of the compile time."""
    import diffrax

    with jax.enable_x64(True):
        g = gf.oracles.Gaussian.full(jnp.array([0.7, -1.2]), jnp.array([[0.8, 0.3], [0.3, 0.5]]))
        path = gf.paths.vp_linear()
        x = g.prior_sample(jax.random.key(0), 6, path, t=0.9).astype(jnp.float64)
        got = gf.oracles.reference_flow_map(g, x, 0.9, 0.05, path, rtol=1e-10, atol=1e-10, solver=diffrax.Tsit5())
        assert got.shape == x.shape and got.dtype == jnp.float64
        np.testing.assert_allclose(got, g.flow_map(x, 0.9, 0.05, path), rtol=1e-6, atol=1e-6)


def test_reference_flow_map_compiles_once_per_oracle_type():
    # it built a new closure per call and recompiled every time (~2 s a call): a new oracle, new
    # times or a new path hyper-parameter now reuse the compiled solve
    import logging

    x = jax.random.normal(jax.random.key(0), (8, 2))
    calls = [(gf.oracles.Gaussian.diagonal(jnp.array([0.3, -0.2]), jnp.array([0.5, 2.0])), 0.9, 0.05, 20.0),
             (gf.oracles.Gaussian.diagonal(jnp.array([0.1, 0.4]), jnp.array([0.7, 1.0])), 0.8, 0.1, 20.0),
             (gf.oracles.Gaussian.diagonal(jnp.array([-0.5, 0.0]), jnp.array([1.5, 0.3])), 0.7, 0.2, 15.0)]
    counts = []
    for g, s, t, beta_max in calls:
        path = gf.paths.vp_linear(beta_max=beta_max)
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        with jax.log_compiles(True):
            logging.getLogger("jax").addHandler(handler)
            try:
                y = gf.oracles.reference_flow_map(g, x, s, t, path, rtol=1e-6, atol=1e-6)
            finally:
                logging.getLogger("jax").removeHandler(handler)
        counts.append(sum("Compiling" in r.getMessage() for r in records))
        np.testing.assert_allclose(y, g.flow_map(x, s, t, path), rtol=1e-4, atol=1e-4)  # still the flow map
    assert counts[0] > 0 and counts[1:] == [0, 0], counts


# -- from the eighth mutation audit (oracles; each test fails on its mutant) --
def test_gaussian_prior_sample_has_the_marginal_moments():
    """prior_sample: 'exact samples of the marginal at time t' = N(alpha mean, alpha^2 C + sigma^2 I)
    (at t = 1 on VP paths alpha ~ 0, sigma = 1, where sigma and sigma^2 agree: test mid-path)."""
    mean, cov = np.array([0.7, -1.2]), np.array([[0.8, 0.3], [0.3, 0.5]])
    g = gf.oracles.Gaussian.full(jnp.asarray(mean), jnp.asarray(cov))
    for name, t in (("linear", 0.5), ("vp_cosine", 0.4)):
        path = gf.paths.get(name)
        a, s = float(path.alpha(t)), float(path.sigma(t))
        x = np.asarray(g.prior_sample(jax.random.key(0), 200_000, path, t), np.float64)
        np.testing.assert_allclose(x.mean(0), a * mean, atol=0.01, err_msg=name)
        np.testing.assert_allclose(np.cov(x.T), a * a * cov + s * s * np.eye(2), atol=0.02, err_msg=name)


def test_data_samples_have_the_documented_moments():
    """Gaussian.sample ~ N(mean, U diag(var) U^T); GaussianMixture.sample ~ sum_k w_k N(mu_k, diag v_k)
    with w = softmax(logits); GaussianMixture.mean = sum_k w_k mu_k."""
    g = gf.oracles.Gaussian.full(jnp.array([0.7, -1.2]), jnp.array([[0.8, 0.3], [0.3, 0.5]]))
    xs = np.asarray(g.sample(jax.random.key(0), 200_000), np.float64)
    np.testing.assert_allclose(xs.mean(0), [0.7, -1.2], atol=0.01)
    np.testing.assert_allclose(np.cov(xs.T), [[0.8, 0.3], [0.3, 0.5]], atol=0.015)

    logits = np.array([1.0, -0.5, 0.0])
    means = np.array([[0.0, 2.0], [3.0, -1.0], [-2.0, 0.5]])
    vars_ = np.array([[0.3, 0.5], [1.0, 0.2], [0.6, 2.0]])
    gm = gf.oracles.GaussianMixture(jnp.asarray(logits, jnp.float32), jnp.asarray(means, jnp.float32),
                                    jnp.asarray(vars_, jnp.float32))
    w = np.exp(logits) / np.exp(logits).sum()
    mu = w @ means
    np.testing.assert_allclose(np.asarray(gm.mean), mu, rtol=1e-6)
    second = np.einsum("k,kd->d", w, vars_ + means**2)
    xm = np.asarray(gm.sample(jax.random.key(1), 400_000), np.float64)
    np.testing.assert_allclose(xm.mean(0), mu, atol=0.015)
    np.testing.assert_allclose(xm.var(0), second - mu**2, rtol=0.02)


def test_nearest_component_accounts_for_the_component_widths():
    """nearest_component: the most responsible component, argmax_k log w_k + log N(x; mu_k, diag v_k):
    for two components at the same mean, a point near the mean belongs to the narrow one and a
    point far out to the wide one."""
    gm = gf.oracles.GaussianMixture(jnp.zeros(2), jnp.zeros((2, 1)), jnp.array([[0.01], [4.0]]))
    x = jnp.array([[0.05], [3.0]])
    ref = [int(np.argmax([-0.5 * (float(xi) ** 2 / v + np.log(2 * np.pi * v)) for v in (0.01, 4.0)]))
           for xi in x[:, 0]]
    assert ref == [0, 1]
    np.testing.assert_array_equal(np.asarray(gm.nearest_component(x)), ref)


def _scaled_alpha(t):
    return 2.0 * (1.0 - t)


def _plain_sigma(t):
    return t


def test_mixture_denoiser_at_clean_data_divides_by_alpha_on_a_custom_path():
    """GaussianMixture.x0 docstring: 'Where sigma^2 = 0 it is x_t / alpha, the data themselves'. Every
    built-in path has alpha(0) = 1; on a path with alpha(0) = 2 the t = 0 value must be x_t / 2, and
    it must be the limit of the general formula as t -> 0."""
    path = gf.paths.Path(alpha_fn=_scaled_alpha, sigma_fn=_plain_sigma, name="scaled_linear_mix")
    gm = gf.oracles.GaussianMixture(jnp.zeros(2), jnp.array([[0.0, 1.0], [2.0, 3.0]]),
                                    jnp.array([[0.3, 0.5], [0.1, 0.2]]))
    x0 = jnp.array([[0.1, 1.2], [2.2, 2.9]])
    xt = 2.0 * x0  # x_0 = alpha(0) x0 on this path
    np.testing.assert_allclose(gm.x0(xt, jnp.zeros(2), path), x0, rtol=1e-6)
    np.testing.assert_allclose(gm.x0(xt, jnp.full((2,), 1e-4), path), x0, atol=1e-3)  # continuity


def test_oracles_run_under_rank_promotion_raise(gauss2):
    """The oracles' [D] arrays met [B, 1] times and [B, D] points by implicit rank promotion, so
    under jax_numpy_rank_promotion='raise' a Gaussian's model, log_prob, flow_map and samplers (and
    a mixture's) failed ('Operands could not be broadcast together ... (4, 1) (2,)'); they
    broadcast explicitly now, with the same results."""
    path = gf.paths.vp_cosine()
    x = jax.random.normal(jax.random.key(0), (4, 2))
    t = jnp.array([0.1, 0.4, 0.6, 0.9])
    gm = gf.oracles.GaussianMixture.random(jax.random.key(1), k=3, dim=2)

    def run():
        out = [gauss2.model(path, kind)(x, t) for kind in ("x0", "eps", "velocity", "score")]
        out += [gauss2.log_prob(x, t, path), gauss2.flow_map(x, 0.9, 0.2, path), gauss2.cov,
                gauss2.sample(jax.random.key(2), 3), gauss2.prior_sample(jax.random.key(3), 3, path, 0.5)]
        out += [gm.model(path, "velocity")(x, t), gm.log_prob(x, t, path), gm.nearest_component(x)]
        return [np.asarray(a) for a in out]

    assert_same_under_strict_rank_promotion(run)


def test_nearest_component_weighs_components_by_their_mixture_weights():
    """argmax_k log w_k + log N(x; mu_k, v_k) (the docstring's rule): with weights 0.99 / 0.01 and
    equal widths, x = 0.5 is nearer mu_1 = 1 but belongs to component 0 (-1.135 vs -4.730)."""
    gm = gf.oracles.GaussianMixture(jnp.log(jnp.array([0.99, 0.01])), jnp.array([[-1.0], [1.0]]),
                                    jnp.ones((2, 1)))
    x = jnp.array([[0.5], [3.0], [-0.2]])
    w, mu = np.array([0.99, 0.01]), np.array([-1.0, 1.0])
    ref = [int(np.argmax(np.log(w) - 0.5 * (xi - mu) ** 2)) for xi in np.asarray(x)[:, 0]]
    assert ref == [0, 1, 0]
    np.testing.assert_array_equal(np.asarray(gm.nearest_component(x)), ref)


def test_full_gaussian_oracle_in_3d_matches_closed_forms():
    """A full-covariance Gaussian in 3-D, where the eigenbasis U is not symmetric (every test used
    the 2-D gauss2, whose eigh basis is a symmetric reflection, so U and U^T were interchangeable):
    sample / prior_sample covariances, score = -(a^2 C + s^2 I)^-1 (x - a m), x0 by Tweedie and
    flow_map = a_t m + C_t^(1/2) C_s^(-1/2) (x - a_s m), all against NumPy."""
    mean = np.array([0.3, -0.5, 1.0])
    cov = np.array([[1.0, 0.6, 0.2], [0.6, 0.8, -0.3], [0.2, -0.3, 0.5]])
    with jax.enable_x64(True):
        g = gf.oracles.Gaussian.full(jnp.asarray(mean), jnp.asarray(cov))
        assert not np.allclose(g.basis, g.basis.T)
        path = gf.paths.linear()
        xs = np.asarray(g.sample(jax.random.key(0), 100_000))
        np.testing.assert_allclose(np.cov(xs.T), cov, atol=0.02)
        t = 0.5
        a, s = float(path.alpha(t)), float(path.sigma(t))
        ct = a * a * cov + s * s * np.eye(3)
        xp = np.asarray(g.prior_sample(jax.random.key(1), 100_000, path, t))
        np.testing.assert_allclose(np.cov(xp.T), ct, atol=0.02)
        x = np.asarray(jax.random.normal(jax.random.key(2), (5, 3), jnp.float64))
        tt = jnp.full((5,), t)
        score = -np.linalg.solve(ct, (x - a * mean).T).T
        np.testing.assert_allclose(g.score(jnp.asarray(x), tt, path), score, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g.x0(jnp.asarray(x), tt, path), (x + s * s * score) / a, rtol=1e-10, atol=1e-12)

        def msqrt(m, p):
            w, v = np.linalg.eigh(m)
            return (v * w ** p) @ v.T

        t1 = 0.2
        a1, s1 = float(path.alpha(t1)), float(path.sigma(t1))
        c1 = a1 * a1 * cov + s1 * s1 * np.eye(3)
        want = a1 * mean + (msqrt(c1, 0.5) @ msqrt(ct, -0.5) @ (x - a * mean).T).T
        np.testing.assert_allclose(g.flow_map(jnp.asarray(x), t, t1, path), want, rtol=1e-10, atol=1e-12)


def test_full_gaussian_with_a_singular_covariance_samples_finitely():
    """Gaussian.full of a rank-1 covariance: eigh rounds its zero eigenvalues to about +-1e-7 to
    1e-6, which must be zero (var is a variance) -- unclipped, sample() took sqrt of the negative
    ones: NaN samples; the positive ones (+7.2e-8 on an AMD EPYC CPU) put samples up to 6e-4 off the
    line."""
    v = np.array([0.3, -1.1, 2.7, 0.9], np.float32)
    g = gf.oracles.Gaussian.full(jnp.zeros(4), np.outer(v, v))
    assert float(jnp.min(g.var)) >= 0.0 and int(jnp.sum(g.var > 0)) == 1, g.var
    x = g.sample(jax.random.key(0), 64)
    assert bool(jnp.all(jnp.isfinite(x)))
    # the samples lie on the line through the mean along v
    np.testing.assert_allclose(np.asarray(x) - np.outer(np.asarray(x) @ v / (v @ v), v), 0.0, atol=1e-4)


def test_reference_flow_map_meets_its_float64_default_tolerance():
    """Documented default rtol = atol = 1e-10 for float64 x: the solve then matches the Gaussian's
    closed-form flow map to ~1e-11 (a 1e-8 default gave ~1e-8)."""
    with jax.enable_x64(True):
        g = gf.oracles.Gaussian.full(jnp.array([0.5, -1.0], jnp.float64),
                                     jnp.array([[0.8, 0.3], [0.3, 0.5]], jnp.float64))
        path = gf.paths.linear()
        x = jax.random.normal(jax.random.key(0), (16, 2), jnp.float64)
        ref = gf.oracles.reference_flow_map(g, x, 0.9, 0.05, path)
        assert ref.dtype == jnp.float64
        np.testing.assert_allclose(ref, g.flow_map(x, 0.9, 0.05, path), rtol=0, atol=1e-9)


def test_oracle_velocity_has_finite_gradients_mid_path_on_the_linear_path():
    """The velocity model's unselected probability-flow branch is evaluated at a harmless t; on the
    linear path alpha(1) = 0 makes drift_coef(1) infinite, so t = 1 is not harmless: jax.grad mid-path
    (t = 0.5, where nothing is singular) was NaN."""
    g = gf.oracles.Gaussian.diagonal(jnp.array([0.5, -1.0]), jnp.array([0.8, 0.3]))
    path = gf.paths.linear()
    m = g.model(path, "velocity")
    x = jnp.array([[0.3, 0.2], [1.0, -0.5]])
    gx = jax.grad(lambda x: m(x, jnp.full((2,), 0.5)).sum())(x)
    gt = jax.grad(lambda t: m(x, jnp.full((2,), t)).sum())(0.5)
    assert bool(jnp.all(jnp.isfinite(gx))) and bool(jnp.isfinite(gt))
    h = 1e-3
    fd = (m(x, jnp.full((2,), 0.5 + h)).sum() - m(x, jnp.full((2,), 0.5 - h)).sum()) / (2 * h)
    np.testing.assert_allclose(float(gt), float(fd), rtol=1e-2)


def test_an_oracle_call_compiles_one_program():
    """Each closed form runs as one compiled program: called op by op, a first call compiled one per
    primitive (measured: 18 for a mixture's velocity model, 41 for its x0 of a new batch size, ~25 ms
    each). (At most one: another test on this worker may have compiled the same one.)"""
    p = gf.paths.vp_linear()
    g = gf.oracles.Gaussian.full(jnp.array([0.5, -1.0, 0.2]), jnp.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1],
                                                                         [0.0, 0.1, 0.7]]))
    m = gf.oracles.GaussianMixture.random(jax.random.key(0), 3, 3)
    x = jax.random.normal(jax.random.key(1), (13, 3))
    g.x0(x[:2], 0.3, p)  # (and once per process JAX compiles a program that hands it the path's floats)
    for o in (g, m):
        calls = [lambda: o.x0(x, 0.3, p), lambda: o.score(x, 0.3, p), lambda: o.log_prob(x, 0.3, p)]
        calls += [lambda k=k: o.model(p, k)(x, 0.3) for k in ("eps", "velocity", "score")]
        for call in calls:
            assert count_compiles(call) <= 1
    assert count_compiles(lambda: g.flow_map(x, 0.8, 0.2, p)) <= 1
