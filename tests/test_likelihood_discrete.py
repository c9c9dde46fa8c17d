"""Bits/dim, dequantization bounds against exact discrete probabilities, and the VDM ELBO against
its closed form for Gaussian data with the exact model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

import genflow as gf
from genflow import likelihood as L


from test_likelihood import float64  # noqa: E402,F401  (module-scoped autouse: float64 in this module only)


# -- bits per dimension --------------------------------------------------------------------------
def test_bits_per_dim_exact():
    # a uniform density over K bins of width w in D dims: P(x) = K^-D exactly, i.e. log2(K) bits/dim
    k, w, d = 17, 0.125, 64
    logp_density = jnp.full((3,), -d * math.log(k * w))
    np.testing.assert_allclose(L.bits_per_dim(logp_density, d, bin_width=w), math.log2(k), rtol=1e-12)
    # 8-bit data in [-1, 1] with bins 2/256: the familiar +7 bits
    np.testing.assert_allclose(L.bits_per_dim(jnp.zeros(()), 10, 2 / 256) - L.bits_per_dim(jnp.zeros(()), 10),
                               7.0, rtol=1e-12)
    # a discrete log-probability: -log P / (D ln 2)
    np.testing.assert_allclose(L.bits_per_dim(jnp.asarray(-10 * math.log(2.0)), 5), 2.0, rtol=1e-12)
    with pytest.raises(ValueError, match="num_dims"):
        L.bits_per_dim(jnp.zeros(()), 0)
    with pytest.raises(ValueError, match="bin_width"):
        L.bits_per_dim(jnp.zeros(()), 3, bin_width=0.0)


def test_uniform_dequantize_stays_in_bin():
    x = jnp.round(jax.random.uniform(jax.random.key(0), (500, 3), minval=-8, maxval=8)) / 8
    y, log_q = L.uniform_dequantize(jax.random.key(1), x, 1 / 8)
    assert np.all(np.abs(np.asarray(y - x)) <= 1 / 16)
    u = np.asarray((y - x) * 8 + 0.5).ravel()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    np.testing.assert_allclose(log_q, -3 * math.log(1 / 8))


def test_truncated_normal_dequantize_density():
    path = gf.paths.vp_cosine()
    w, tau = 2 / 16, 3.0
    x = jnp.round(jax.random.uniform(jax.random.key(2), (400, 2), minval=-8, maxval=8)) / 8
    z, log_q, t = L.truncated_normal_dequantize(jax.random.key(3), x, path, w, tau)
    a, s = float(path.alpha(t)), float(path.sigma(t))
    np.testing.assert_allclose(a / s, 2 * tau / w, rtol=1e-9)  # the support is exactly alpha * bin(x)
    eps = np.asarray((z - a * x) / s)
    assert np.all(np.abs(eps) <= tau + 1e-9)
    ref = stats.truncnorm.logpdf(eps, -tau, tau).sum(-1) - 2 * math.log(s)
    np.testing.assert_allclose(log_q, ref, rtol=1e-9)


def _discretized_gaussian(d=2):
    """Diagonal Gaussian data rounded to a grid of width 1/8: P(x) is a product of normal CDF
    differences, exactly."""
    g = gf.oracles.Gaussian.diagonal(jnp.array([0.3, -0.2]), jnp.array([0.5, 0.8]))
    x = jnp.round(g.sample(jax.random.key(4), 4) * 8) / 8
    return g, x, 1 / 8


def _exact_log_prob_bins(mean, var, x, w):
    sd = np.sqrt(np.asarray(var))
    lo, hi = (np.asarray(x) - w / 2 - np.asarray(mean)) / sd, (np.asarray(x) + w / 2 - np.asarray(mean)) / sd
    return np.log(special.ndtr(hi) - special.ndtr(lo)).sum(-1)


@pytest.mark.parametrize("deq", ["uniform", "truncated_normal"])
def test_dequantized_bound_below_exact_discrete_log_prob(deq):
    """E[bound] <= log P(x) (within 3 standard errors), with a small gap for a smooth density."""
    g, x, w = _discretized_gaussian()
    path = gf.paths.vp_cosine(logsnr_min=-20.0)
    n = 256
    bound, info = L.dequantized_log_prob(g.model(path, "velocity"), path, x, jax.random.key(5),
                                         prediction="velocity", bin_width=w, dequantization=deq, num_samples=n,
                                         rtol=1e-7, atol=1e-7, prior=jax.tree_util.Partial(
                                             gf.oracles.Gaussian.log_prob, g, t=1.0, path=path))
    samples = np.asarray(info["log_p"] - info["log_q"])  # [n, B]
    if deq == "uniform":
        exact = _exact_log_prob_bins(g.mean, g.var, x, w)
    else:  # the model's probability of the scaled bin alpha * bin(x) at t_eps
        t = float(info["t"])
        a, s = float(path.alpha(t)), float(path.sigma(t))
        exact = _exact_log_prob_bins(a * g.mean, a * a * g.var + s * s, a * x, a * w)
    np.testing.assert_allclose(bound, samples.mean(0), rtol=1e-12)
    se = samples.std(0) / math.sqrt(n)
    gap = exact - samples.mean(0)
    assert np.all(gap > -3 * se - 1e-6), (gap, se)
    if deq == "uniform":
        assert np.all(gap < 0.01), gap  # the density is nearly flat across a bin: measured ~1e-3 nats
    else:
        # ... so the truncated normal pays KL(TN || uniform on the bin) = log(2 tau) - H(TN) per dim
        # (it is tight for models whose density is lattice-peaked, which is what it is designed for)
        kl = 2 * (math.log(2 * 3.0) - stats.truncnorm.entropy(-3.0, 3.0))
        assert np.all(np.abs(gap - kl) < 3 * se + 0.005), (gap, kl, se)
    iw, _ = L.dequantized_log_prob(g.model(path, "velocity"), path, x, jax.random.key(5), prediction="velocity",
                                   bin_width=w, dequantization=deq, num_samples=n, importance_weighted=True,
                                   rtol=1e-7, atol=1e-7)
    assert np.all(np.asarray(iw) >= np.asarray(bound) - 1e-3)  # the IW bound is tighter (same draws)


def test_dequantized_errors():
    g, x, w = _discretized_gaussian()
    path = gf.paths.linear()
    with pytest.raises(ValueError, match="unknown dequantization"):
        L.dequantized_log_prob(g.model(path, "velocity"), path, x, jax.random.key(0), prediction="velocity",
                               bin_width=w, dequantization="variational")
    with pytest.raises(ValueError, match="num_samples"):
        L.dequantized_log_prob(g.model(path, "velocity"), path, x, jax.random.key(0), prediction="velocity",
                               bin_width=w, num_samples=0)


# -- the VDM ELBO ------------------------------------------------------------------------------------
def _rotated(d=3):
    a = jax.random.normal(jax.random.key(0), (d, d)) / 2
    return gf.oracles.Gaussian.full(jnp.array([0.5, -1.0, 0.3]), a @ a.T + 0.2 * jnp.eye(d))


def _kl_to_marginal(g, path, x, t):
    """KL(q(z_t | x) || q_t) with q(z_t|x) = N(alpha x, sigma^2 I), q_t = N(alpha mu, alpha^2 C + sigma^2 I)."""
    a, s = path.alpha(t), path.sigma(t)
    r = (a * x - a * g.mean) @ g.basis
    m = a * a * g.var + s * s
    return 0.5 * jnp.sum(s * s / m + r * r / m - 1 - jnp.log(s * s / m), -1)


def _closed_form_elbo(g, path, x, t0):
    """log p(x) - ELBO = E[log q(x|z0) - log p_dec(x|z0)] + KL(q(z1|x)||prior) - KL(q(z1|x)||q_1)
    (the continuous diffusion term with the exact denoiser equals KL_t0 - KL_1, de Bruijn)."""
    a0, s0 = path.alpha(t0), path.sigma(t0)
    r, v = (x - g.mean) @ g.basis, g.var
    post = 1 / (1 / v + a0**2 / s0**2)  # posterior variances of x given z0 (eigenbasis)
    gap_dec = jnp.sum(-0.5 * jnp.log(2 * jnp.pi * post) - 0.5 * post * (r * r / v**2 + a0**2 / s0**2)
                      + 0.5 * jnp.log(2 * jnp.pi * s0**2 / a0**2) + 0.5, -1)
    gap_prior = L.prior_term(path, x) - _kl_to_marginal(g, path, x, 1.0)
    return g.log_prob(x, 0.0, path) - gap_dec - gap_prior, _kl_to_marginal(g, path, x, t0) - _kl_to_marginal(
        g, path, x, 1.0)


CASES = [("vp_linear", "eps", "importance"), ("vp_linear", "eps", "uniform"), ("vp_cosine", "v", "importance"),
         ("vp_cosine", "v", "uniform")]


@pytest.fixture(scope="module")
def elbo_runs():
    """20 independent ELBO estimates (4000 draws each) per (path, kind, time sampling)."""
    g = _rotated()
    x = g.sample(jax.random.key(1), 4)
    out = {}
    for name, kind, ts in CASES:
        path = gf.paths.get(name)
        f = jax.jit(jax.vmap(lambda k: L.vdm_elbo(g.model(path, kind), path, x, k, prediction=kind, t_min=1e-3,
                                                  num_t=4000, time_sampling=ts)))
        elbo, parts = f(jax.random.split(jax.random.key(2), 20))
        out[name, kind, ts] = (np.asarray(elbo), {k: np.asarray(v) for k, v in parts.items()})
        cf, diff_cf = _closed_form_elbo(g, path, x, 1e-3)
        out[name] = (np.asarray(cf), np.asarray(diff_cf), np.asarray(g.log_prob(x, 0.0, path)))
    return out


@pytest.mark.parametrize("name,kind,ts", CASES)
def test_vdm_elbo_matches_closed_form(elbo_runs, name, kind, ts):
    elbo, parts = elbo_runs[name, kind, ts]
    cf, diff_cf, logp = elbo_runs[name]
    se = elbo.std(0) / math.sqrt(elbo.shape[0])
    assert np.all(np.abs(elbo.mean(0) - cf) < 3 * se), (elbo.mean(0) - cf, se)
    d = parts["diffusion"]
    assert np.all(np.abs(d.mean(0) - diff_cf) < 3 * d.std(0) / math.sqrt(d.shape[0])), (d.mean(0), diff_cf)
    # a lower bound on log p(x), tight to the decoder's and prior's known gaps: measured 2.5e-4 nats
    # (vp_linear) and 1.1e-5 (vp_cosine) over 3 dims
    assert np.all(cf <= logp) and np.all(logp - cf < 2e-3), logp - cf


def test_importance_sampling_reduces_variance(elbo_runs):
    for name, kind in (("vp_linear", "eps"), ("vp_cosine", "v")):
        v_is = elbo_runs[name, kind, "importance"][1]["diffusion"].var(0)
        v_u = elbo_runs[name, kind, "uniform"][1]["diffusion"].var(0)
        assert np.all(v_is < v_u), (name, v_is, v_u)


def test_sample_time_weights_integrate():
    """E[w(t) g(t)] = 1/2 int (-lambda') g dt for both samplings (here g = 1)."""
    path = gf.paths.vp_linear()
    exact = 0.5 * float(path.log_snr(jnp.asarray(1e-3)) - path.log_snr(jnp.asarray(1.0)))
    for ts in ("importance", "uniform"):
        t, w = L.sample_time(jax.random.key(0), 200_000, path, 1e-3, 1.0, ts, stratified=True, dtype=jnp.float64)
        assert float(t.min()) >= 1e-3 and float(t.max()) <= 1.0
        np.testing.assert_allclose(float(jnp.mean(w)), exact, rtol=2e-3)
    with pytest.raises(ValueError, match="unknown time sampling"):
        L.sample_time(jax.random.key(0), 4, path, 1e-3, 1.0, "sobol")


def test_discrete_reconstruction_term():
    """VDM's categorical decoder against a direct numpy softmax."""
    path = gf.paths.vp_linear()
    levels = jnp.linspace(-1, 1, 5)
    x = levels[jnp.array([[0, 2, 4], [1, 1, 3]])]
    t0 = 0.05
    rec = L.reconstruction_term(path, x, jax.random.key(3), t0, levels)
    eps = np.asarray(jax.random.normal(jax.random.key(3), x.shape, x.dtype))
    a, s = float(path.alpha(t0)), float(path.sigma(t0))
    zr = np.asarray(x) + s / a * eps
    logits = -0.5 * ((zr[..., None] - np.asarray(levels)) / (s / a)) ** 2
    logp = logits - special.logsumexp(logits, -1, keepdims=True)
    idx = np.array([[0, 2, 4], [1, 1, 3]])
    ref = np.take_along_axis(logp, idx[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(rec, ref, rtol=1e-10)
    elbo, parts = L.vdm_elbo(lambda z, t: jnp.zeros_like(z), path, x, jax.random.key(4), levels=levels, t_min=t0)
    bpd = L.bits_per_dim(elbo, 3)
    assert np.all(np.asarray(bpd) > 0) and np.all(np.isfinite(np.asarray(bpd)))
    np.testing.assert_allclose(elbo, parts["reconstruction"] - parts["prior"] - parts["diffusion"], rtol=1e-12)


def test_likelihood_loss_minimised_by_exact_model():
    """The diffusion term (likelihood weighting, importance-sampled time) is smallest for the true
    denoiser: a perturbed model has a larger loss on the same draws."""
    g = _rotated()
    path = gf.paths.vp_linear()
    x = g.sample(jax.random.key(5), 2048)
    loss_fn = L.likelihood_objective(lambda p, z, t: g.model(path, "eps")(z, t) + p["b"], path, prediction="eps")
    losses = jax.jit(jax.vmap(lambda b: loss_fn({"b": b}, {"x": x}, jax.random.key(6))[0]))(
        jnp.concatenate([jnp.zeros((1, 3)), 0.1 * jnp.eye(3), -0.1 * jnp.eye(3)]))
    assert np.all(np.asarray(losses[1:]) > float(losses[0])), losses
    with pytest.raises(ValueError, match="sigma=0"):
        L.vdm_elbo(g.model(path, "eps"), path, x, jax.random.key(0), t_min=0.0)


@pytest.mark.parametrize("path", [gf.paths.ve(), gf.paths.edm()], ids=["ve", "edm"])
def test_truncated_normal_dequantize_path_below_the_needed_snr(path):
    """ve(sigma_min=0.01) / edm(sigma_min=0.002) never reach alpha / sigma = 2 tau / bin_width (= 765
    for 8-bit data): t_eps clamps to 0, and z must still stay in the scaled bin, so that the bound stays
    below the exact probability of that bin."""
    w, tau = 2 / 255, 3.0
    g = gf.oracles.Gaussian.diagonal(jnp.array([0.1, -0.2]), jnp.array([0.3, 0.2]))
    x = jnp.round(g.sample(jax.random.key(4), 3) / w) * w
    n = 4000
    xs = jnp.tile(x, (n, 1))
    z, log_q, t = L.truncated_normal_dequantize(jax.random.key(3), xs, path, w, tau)
    a, s = float(path.alpha(t)), float(path.sigma(t))
    assert a / s < 2 * tau / w  # the premise: this path cannot reach the truncated normal's time
    assert np.all(np.abs(np.asarray(z - a * xs)) <= a * w / 2 * (1 + 1e-9))  # z in alpha * bin(x)
    tau_eff = a * w / (2 * s)
    eps = np.asarray((z - a * xs) / s)
    ref = stats.truncnorm.logpdf(eps, -tau_eff, tau_eff).sum(-1) - 2 * math.log(s)
    np.testing.assert_allclose(log_q, ref, rtol=1e-9)  # log_q is the density of z
    # the bound with the exact log p_t (no ODE): below log P(alpha * bin(x)) under the marginal at t
    w_ = np.asarray(g.log_prob(z, t, path) - log_q).reshape(n, -1)
    sd = np.sqrt(a * a * np.asarray(g.var) + s * s)
    lo, hi = (a * (np.asarray(x) - w / 2 - np.asarray(g.mean))) / sd, (a * (np.asarray(x) + w / 2 - np.asarray(g.mean))) / sd
    exact = np.log(special.ndtr(hi) - special.ndtr(lo)).sum(-1)
    assert np.all(w_.mean(0) <= exact + 3 * w_.std(0) / math.sqrt(n)), (w_.mean(0), exact)


def test_elbo_terms_refuse_bad_inputs():
    g = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.ones(2))
    path = gf.paths.vp_cosine()
    fn, x, key = g.model(path, "eps"), jnp.ones((3, 2)), jax.random.key(0)
    # t_min > t_max: the weights were negative and the diffusion term came out negative
    with pytest.raises(ValueError, match="t_min < t_max"):
        L.diffusion_term(fn, path, x, key, prediction="eps", t_min=0.5, t_max=0.1)
    with pytest.raises(ValueError, match="t_min < t_max"):
        L.sample_time(key, 4, path, 0.5, 0.1)
    # the decoder at sigma = 0 gave log p(x | z) = +inf
    with pytest.raises(ValueError, match="sigma=0"):
        L.reconstruction_term(path, x, key, 0.0)
    # x without a feature axis failed inside with "cannot reshape array"
    with pytest.raises(ValueError, match=r"x must have shape \[B, \.\.\.\]"):
        L.vdm_elbo(fn, path, jnp.ones(3), key, t_min=1e-3)


# ---- proposed for tests/test_likelihood_edges.py ----------------------------------------------


def test_truncated_normal_with_a_traced_path_names_the_problem():
    g = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.ones(2))
    f = jax.jit(lambda p, x, k: L.dequantized_log_prob(g.model(p, "eps"), p, x, k, prediction="eps", bin_width=0.1,
                                                       dequantization="truncated_normal", solver="heun", steps=2)[0])
    with pytest.raises(ValueError, match="concrete path"):  # was "t_min must be a float in [0, 1]; got JitTracer"
        f(gf.paths.vp_cosine(), jnp.zeros((2, 2)), jax.random.key(0))


def test_traced_t_min_and_bin_width_give_the_concrete_results():
    """``vdm_elbo(t_min=<traced>)`` and ``bits_per_dim(bin_width=<traced>)`` raised
    TracerBoolConversionError in their range checks (a sweep over t_min under jit / vmap); traced
    values now pass unchecked and equal the concrete results."""
    path = gf.paths.vp_cosine()
    x = jnp.array([[0.1, -0.3], [0.5, 0.2]])
    g = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.ones(2))
    key = jax.random.key(3)
    want = L.vdm_elbo(g.model(path, "eps"), path, x, key, t_min=1e-3)[0]
    got = jax.jit(lambda t0: L.vdm_elbo(g.model(path, "eps"), path, x, key, t_min=t0)[0])(1e-3)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    lp = jnp.array([-10.0, -3.0])
    np.testing.assert_allclose(jax.jit(lambda b: L.bits_per_dim(lp, 2, b))(2 / 256), L.bits_per_dim(lp, 2, 2 / 256),
                               rtol=1e-12)
    np.testing.assert_allclose(L.bits_per_dim(lp, 2, 2 / 256), -(lp + 2 * math.log(2 / 256)) / (2 * math.log(2)),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="need 0 <= t_min < t_max"):
        L.vdm_elbo(g.model(path, "eps"), path, x, key, t_min=0.5, t_max=0.4)


# ---- proposed for tests/test_likelihood_discrete.py (append) ------------------------------------
def test_dequantization_accepts_a_traced_bin_width():
    """check_positive_real lets a traced bin_width through (as bits_per_dim documents), but
    uniform_dequantize / truncated_normal_time then called math.log on it: ConcretizationTypeError."""
    x = jnp.round(jax.random.normal(jax.random.key(0), (3, 4)) * 8) / 8
    path = gf.paths.vp_cosine()
    key = jax.random.key(1)
    y, lq = jax.jit(lambda w: L.uniform_dequantize(key, x, w))(0.125)
    y0, lq0 = L.uniform_dequantize(key, x, 0.125)
    np.testing.assert_allclose(y, y0, rtol=1e-6)
    np.testing.assert_allclose(lq, -4 * math.log(0.125) * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(lq0, lq, rtol=1e-6)
    t = jax.jit(lambda w: L.truncated_normal_time(path, w))(0.125)
    np.testing.assert_allclose(t, L.truncated_normal_time(path, 0.125), rtol=1e-6)
    np.testing.assert_allclose(path.log_snr(t), 2 * math.log(2 * 3.0 / 0.125), rtol=1e-5)
    z, lq, _ = jax.jit(lambda w: L.truncated_normal_dequantize(key, x, path, w))(0.125)
    z0, lq0, _ = L.truncated_normal_dequantize(key, x, path, 0.125)
    np.testing.assert_allclose(z, z0, rtol=1e-6)
    np.testing.assert_allclose(lq, lq0, rtol=1e-6)


def test_prior_term_is_the_gaussian_kl_for_a_prior_std_of_ones_own():
    """KL(N(alpha_1 x, sigma_1^2 I) || N(0, s^2 I)) in closed form, also for s != sigma(1), where
    the log-variance-ratio term does not vanish (computed here by numerical integration in 1-D)."""
    path = gf.paths.vp_cosine(logsnr_min=-6.0)
    x = jnp.array([[0.7, -1.3], [2.0, 0.1]])
    a, s1 = float(path.alpha(1.0)), float(path.sigma(1.0))
    for s in (None, 0.5, 2.0):
        kl = np.asarray(gf.likelihood.prior_term(path, x, 1.0, prior_std=s))
        sd = s1 if s is None else s
        ref = np.zeros(2)
        for i in range(2):
            for j in range(2):
                q = stats.norm(a * float(x[i, j]), s1)
                f = lambda u: q.pdf(u) * (q.logpdf(u) - stats.norm.logpdf(u, scale=sd))  # noqa: E731
                ref[i] += integrate.quad(f, -12, 12, epsabs=1e-12)[0]
        np.testing.assert_allclose(kl, ref, rtol=1e-5, atol=1e-7, err_msg=str(s))
    assert math.isfinite(float(kl[0]))


def test_importance_weighted_bound_is_log_mean_exp_of_the_weights():
    """With importance_weighted, the bound is log (1/K) sum_k exp(log p_k - log q_k): between the
    mean and the max of the K log-weights (a log-sum-exp without the 1/K exceeds the max)."""
    path = gf.paths.linear()
    g = gf.oracles.Gaussian.diagonal(jnp.array([0.1, -0.2]), jnp.array([0.3, 0.2]))
    w = 0.25
    x = jnp.round(g.sample(jax.random.key(0), 3) / w) * w
    k = 4
    iw, info = L.dequantized_log_prob(g.model(path, "velocity"), path, x, jax.random.key(1), prediction="velocity",
                                      bin_width=w, num_samples=k, importance_weighted=True, solver="heun", steps=8)
    lw = np.asarray(info["log_p"] - info["log_q"], np.float64)  # [K, B]
    ref = np.log(np.mean(np.exp(lw - lw.max(0)), axis=0)) + lw.max(0)
    np.testing.assert_allclose(iw, ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(iw) <= lw.max(0) + 1e-5) and np.all(np.asarray(iw) >= lw.mean(0) - 1e-5)
    assert math.isfinite(float(iw[0]))


def test_stratified_time_sampling_gives_each_column_its_own_offset():
    """sample_time(stratified, strata=s) with n = s m draws: draw k m + j lies in stratum k with the
    offset of column j; the m columns have independent offsets (one shared offset would give every
    example of vdm_elbo's num_t draws the same times)."""
    s, m = 4, 64
    path = gf.paths.linear()  # uniform time sampling on [0, 1]: t = u
    t, w = gf.likelihood.sample_time(jax.random.key(0), s * m, path, 0.0, 1.0, "uniform", stratified=True, strata=s)
    u = np.asarray(t, np.float64).reshape(s, m)
    off = u * s - np.arange(s)[:, None]  # each in [0, 1)
    assert np.all((off >= -1e-5) & (off < 1 + 1e-5))
    np.testing.assert_allclose(off, np.broadcast_to(off[:1], off.shape), atol=1e-4)  # same offset down a column
    assert len(np.unique(np.round(off[0], 5))) == m  # independent offsets across the columns
    # the column offsets are uniform on [0, 1): mean 1/2, sd 1/sqrt(12 m)
    assert abs(off[0].mean() - 0.5) < 4 / np.sqrt(12 * m)


def test_prior_and_reconstruction_terms_accept_integer_data():
    """vdm_elbo widens integer data; its public parts must too: prior_term cast t1 = 0.9 and
    prior_std = 0.5 to the int 0 (a NaN KL), reconstruction_term drew its noise in int32 (a JAX
    dtype error)."""
    path = gf.paths.vp_cosine(logsnr_min=-6.0)
    levels = jnp.arange(4)
    x_int = jnp.array([[0, 1, 2], [3, 2, 1]], jnp.int32)
    x_f = x_int.astype(jnp.float32)
    for t1, std in ((0.9, None), (1.0, 0.5)):
        kl = L.prior_term(path, x_int, t1, prior_std=std)
        assert np.all(np.isfinite(np.asarray(kl))), (t1, std, kl)
        np.testing.assert_allclose(kl, L.prior_term(path, x_f, t1, prior_std=std), rtol=1e-6)
    key = jax.random.key(0)
    rec = L.reconstruction_term(path, x_int, key, 0.2, levels)
    np.testing.assert_allclose(rec, L.reconstruction_term(path, x_f, key, 0.2, levels), rtol=1e-6)


def test_likelihood_loss_is_the_diffusion_term_per_dimension():
    """Documented: the diffusion term of vdm_elbo in nats per dimension (not divided by D, 3x this, it
    passed: the only other test compares losses with each other). Against the closed form for
    Gaussian data with the exact model: E[diffusion] = KL(q(z_t0|x)||q_t0) - KL(q(z_1|x)||q_1)."""
    a_ = jax.random.normal(jax.random.key(0), (3, 3)) / 2
    g = gf.oracles.Gaussian.full(jnp.array([0.5, -1.0, 0.3]), a_ @ a_.T + 0.2 * jnp.eye(3))
    path = gf.paths.vp_linear()
    x = g.sample(jax.random.key(1), 4096)
    d = 3

    def kl(t):
        a, s = path.alpha(t), path.sigma(t)
        r = (a * x - a * g.mean) @ g.basis
        m = a * a * g.var + s * s
        return 0.5 * jnp.sum(s * s / m + r * r / m - 1 - jnp.log(s * s / m), -1)

    want = float(jnp.mean(kl(1e-3) - kl(1.0))) / d
    losses = np.asarray(jax.vmap(lambda k: L.likelihood_loss(g.model(path, "eps"), path, x, k, t_min=1e-3)[0])(
        jax.random.split(jax.random.key(2), 16)))
    se = losses.std() / math.sqrt(len(losses))
    assert abs(losses.mean() - want) < 4 * se + 1e-3, (losses.mean(), want, se)
    # and exactly the per-example diffusion term / D on the same draws
    loss, info = L.likelihood_loss(g.model(path, "eps"), path, x, jax.random.key(3), t_min=1e-3)
    ref = L.diffusion_term(g.model(path, "eps"), path, x, jax.random.key(3), prediction="eps", t_min=1e-3,
                           stratified=True) / d
    np.testing.assert_allclose(info["per_example"], ref, rtol=1e-10)


@pytest.mark.parametrize("t_min", [None, 0.05])
def test_uniform_dequantization_is_evaluated_at_t_min(t_min):
    """Documented: "uniform" is evaluated at t_min (default path.t_min; a t_min passed through
    **log_prob_kwargs is used, and reported in info["t"]). On vp_linear (t_min = 1e-3, where an eps
    model's velocity is singular at t = 0) the bound is log_prob at t_min minus log q."""
    g = gf.oracles.Gaussian.diagonal(jnp.array([0.3, -0.2]), jnp.array([0.5, 0.8]))
    path = gf.paths.vp_linear()
    w = 1 / 8
    x = jnp.round(g.sample(jax.random.key(4), 4) / w) * w
    kw = dict(solver="heun", steps=32)
    given = {} if t_min is None else dict(t_min=t_min)
    bound, info = L.dequantized_log_prob(g.model(path, "eps"), path, x, jax.random.key(5), prediction="eps",
                                         bin_width=w, **given, **kw)
    t_min = path.t_min if t_min is None else t_min
    assert float(info["t"]) == t_min
    y, log_q = L.uniform_dequantize(jax.random.split(jax.random.key(5))[0], x, w)
    lp, _ = gf.log_prob(g.model(path, "eps"), path, y, prediction="eps", t_min=t_min, **kw)
    np.testing.assert_allclose(bound, lp - log_q, rtol=1e-10)


def test_uniform_dequantize_of_bfloat16_data_works_in_float32():
    """bfloat16 data is dequantized in float32: y stays inside its bin (bfloat16 spacing near 1 is
    2^-7, a third of 8-bit data's half-bin) and log q = -D log(bin_width) to float32 accuracy."""
    w = 2 / 255
    x = (jnp.round(jnp.linspace(-1, 1, 64) / w) * w).reshape(8, 8).astype(jnp.bfloat16)
    y, log_q = L.uniform_dequantize(jax.random.key(0), x, w)
    assert y.dtype == jnp.float32 and log_q.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(y - x.astype(jnp.float32)))) <= w / 2
    np.testing.assert_allclose(log_q, np.full(8, -8 * np.log(w)), rtol=1e-6)


def test_truncated_normal_defaults_are_tau_3():
    """truncated_normal_time and truncated_normal_dequantize default to tau = 3 (as
    dequantized_log_prob): the same t_eps / z / log q as tau=3.0 given."""
    path = gf.paths.vp_linear()
    w = 2 / 255
    np.testing.assert_array_equal(L.truncated_normal_time(path, w), L.truncated_normal_time(path, w, 3.0))
    x = jnp.round(jax.random.normal(jax.random.key(0), (8, 2)) / w) * w
    got = L.truncated_normal_dequantize(jax.random.key(0), x, path, w)
    want = L.truncated_normal_dequantize(jax.random.key(0), x, path, w, 3.0)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
