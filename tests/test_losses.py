import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf

MU, V = jnp.array([0.5, -1.0]), jnp.array([0.3, 1.5])
N = 200_000


def _bayes_risk(path, kind, t_min=0.0, n=20001):
    """Closed-form E_t[ mean_d Var(target_kind | x_t) ] for Gaussian data (trapezoid rule in t).

    Var(eps | x_t) = alpha^2 v / (alpha^2 v + sigma^2); other kinds scale it by eps_scale^2."""
    t = np.linspace(t_min, 1.0, n)[1:-1]
    a, s = np.asarray(path.alpha(t)), np.asarray(path.sigma(t))
    c = np.asarray(gf.param.eps_scale(path, jnp.asarray(t), kind))
    r = (c[:, None] ** 2) * (a[:, None] ** 2 * np.asarray(V)) / (a[:, None] ** 2 * np.asarray(V) + s[:, None] ** 2)
    return float(np.mean(r))


@pytest.mark.parametrize("path_name,kind", [("vp_cosine", "eps"), ("vp_cosine", "x0"), ("vp_cosine", "v"),
                                            ("linear", "velocity"), ("linear", "v")])
def test_oracle_loss_equals_bayes_risk(path_name, kind):
    path = gf.paths.get(path_name)
    g = gf.oracles.Gaussian.diagonal(MU, V)
    x0 = g.sample(jax.random.key(0), N)
    loss, aux = jax.jit(lambda x, k: gf.losses.diffusion_loss(g.model(path, kind), path, x, k, prediction=kind))(
        x0, jax.random.key(1))
    se = float(jnp.std(aux["per_example"]) / np.sqrt(N))
    expected = _bayes_risk(path, kind)
    assert abs(float(loss) - expected) < 4 * se + 1e-3, (float(loss), expected, se)


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "velocity"])
def test_weighting_is_expressed_in_eps_space(kind):
    """weighting="eps" gives the eps-MSE whatever the prediction kind: the oracle's loss is the eps Bayes risk."""
    path = gf.paths.vp_cosine(logsnr_min=-10.0)
    g = gf.oracles.Gaussian.diagonal(MU, V)
    x0 = g.sample(jax.random.key(0), N)
    loss, aux = gf.losses.diffusion_loss(g.model(path, kind), path, x0, jax.random.key(1), prediction=kind,
                                         weighting="eps")
    se = float(jnp.std(aux["per_example"]) / np.sqrt(N))
    assert abs(float(loss) - _bayes_risk(path, "eps")) < 4 * se + 1e-3


def test_oracle_is_the_minimiser():
    path = gf.paths.linear()
    g = gf.oracles.Gaussian.diagonal(MU, V)
    x0 = g.sample(jax.random.key(0), 50_000)
    fn = g.model(path, "velocity")
    l0, _ = gf.losses.flow_matching_loss(fn, path, x0, jax.random.key(1))
    for delta in (0.05, -0.05):
        l1, _ = gf.losses.flow_matching_loss(lambda x, t: fn(x, t) + delta, path, x0, jax.random.key(1))
        # same key: same (t, noise); the excess loss is exactly delta^2 up to the cross term
        assert float(l1) > float(l0)
        assert abs(float(l1 - l0) - delta**2) < 0.2 * delta**2


def test_flow_matching_target_is_x1_minus_x0():
    path = gf.paths.linear()
    x0 = jnp.full((100_000, 2), 2.0)
    loss, _ = gf.losses.flow_matching_loss(lambda x, t: jnp.zeros_like(x), path, x0, jax.random.key(0))
    # E||x1 - x0||^2 / D = 1 + 4
    assert abs(float(loss) - 5.0) < 0.05


def test_named_weightings():
    path = gf.paths.vp_linear()
    t = jnp.linspace(0.05, 0.95, 7)
    snr = path.snr(t)
    w = lambda name, **kw: gf.losses.get_weighting(name, "eps", **kw)(path, t)
    np.testing.assert_allclose(w("uniform"), 1.0)
    # x0-space weightings (Hang et al. 2023), expressed on the eps-MSE (x0-MSE = eps-MSE / SNR)
    np.testing.assert_allclose(w("x0"), 1.0 / snr, rtol=1e-5)
    np.testing.assert_allclose(w("snr"), 1.0, rtol=1e-5)
    np.testing.assert_allclose(w("min_snr", gamma=5.0), np.minimum(snr, 5.0) / snr, rtol=1e-5)
    np.testing.assert_allclose(w("truncated_snr"), np.maximum(snr, 1.0) / snr, rtol=1e-5)
    np.testing.assert_allclose(w("elbo"), -0.5 * path.d_log_snr(t), rtol=1e-5)
    np.testing.assert_allclose(w("v"), 1.0 + 1.0 / snr, rtol=1e-4)  # (alpha^2+sigma^2)^2/alpha^2 on VP
    lam = path.log_snr(t)
    np.testing.assert_allclose(w("sigmoid", bias=1.0), -0.5 * path.d_log_snr(t) * jax.nn.sigmoid(1.0 - lam), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown weighting 'p2'"):
        w("p2")


def test_ot_coupling_is_exact():
    x0 = jax.random.normal(jax.random.key(0), (7, 2))
    x1 = jax.random.normal(jax.random.key(1), (7, 2))
    best = min(itertools.permutations(range(7)), key=lambda p: float(jnp.sum((x0 - x1[jnp.array(p)]) ** 2)))
    out = jax.jit(gf.losses.ot_coupling)(jax.random.key(2), x0, x1)
    np.testing.assert_allclose(out, x1[jnp.array(best)])
    # batched under vmap (one host call for the whole batch of problems)
    xb0, xb1 = jnp.stack([x0, x1]), jnp.stack([x1, x0])
    outb = jax.vmap(gf.losses.ot_coupling, in_axes=(None, 0, 0))(jax.random.key(2), xb0, xb1)
    np.testing.assert_allclose(outb[0], out)


def test_drop_labels_rate():
    y = jnp.zeros((100_000,), jnp.int32)
    d = gf.losses.drop_labels(jax.random.key(0), y, 0.2, 10)
    assert abs(float(jnp.mean(d == 10)) - 0.2) < 0.005
    assert set(np.unique(np.asarray(d)).tolist()) == {0, 10}


def test_times_never_hit_t_min_where_sigma_vanishes(monkeypatch):
    # a float32 uniform is exactly 0 with probability 2^-23; at t = 0 the linear and cosine paths
    # have sigma = 0 and x0/score targets and SNR weights were 0/0: key 593 draws such a 0 at
    # batch 4096, and the loss was NaN (training stopped on it about once per 33k steps at batch 256)
    x0 = jax.random.normal(jax.random.key(0), (4096, 2))
    for path in (gf.paths.vp_cosine(), gf.paths.linear()):
        for kind, w in (("x0", "min_snr"), ("eps", "sigmoid"), ("velocity", "sigmoid"), ("score", "score")):
            loss, aux = gf.losses.diffusion_loss(lambda x, t: 0.9 * x, path, x0, jax.random.key(593), prediction=kind,
                                                 weighting=w)
            assert np.all(np.isfinite(np.asarray(aux["per_example"]))) and float(jnp.min(aux["t"])) > 0, (path, kind)
    # every draw of 0 (plain or stratified) moves off t_min; the others are unchanged
    monkeypatch.setattr(jax.random, "uniform", lambda key, shape=(), *a, **k: jnp.zeros(shape, jnp.float32))
    t = np.asarray(gf.losses.sample_t(jax.random.key(0), 4, 0.0, 1.0))
    assert np.all(t > 0) and np.all(t < 1e-7), t
    t = np.asarray(gf.losses.sample_t(jax.random.key(0), 4, 0.0, 1.0, stratified=True))
    assert 0 < t[0] < 1e-7 and np.all(t[1:] == np.arange(1, 4) / 4), t


def test_times_never_hit_t_max(monkeypatch):
    # t_min + (t_max - t_min) u rounds up to t_max for the largest float32 uniform (1 - 2^-23)
    # whenever t_min >= 0.75 (and, under x64, float64 draws cast to float32 data rounded to 1 at any
    # t_min); at t = 1 the linear path's velocity / v losses with SNR weights were inf/inf = NaN
    top = jnp.float32(1.0) - jnp.float32(2.0 ** -23)
    monkeypatch.setattr(jax.random, "uniform", lambda key, shape=(), dtype=jnp.float32, *a, **k:
                        jnp.full(shape, top, dtype))
    t = np.asarray(gf.losses.sample_t(jax.random.key(0), 4, 0.8, 1.0))
    assert np.all(t < 1.0) and np.all(t > 0.99999), t
    assert np.all(np.asarray(gf.losses.sample_t(jax.random.key(0), 4, 0.5, 0.5)) == 0.5)  # degenerate interval
    x0 = jax.random.normal(jax.random.key(1), (4, 2))
    for kind, w in (("velocity", "sigmoid"), ("velocity", "elbo"), ("v", "sigmoid"), ("v", "elbo")):
        loss, aux = gf.losses.diffusion_loss(lambda x, t: 0.9 * x, gf.paths.linear(), x0, jax.random.key(2),
                                             prediction=kind, weighting=w, t_min=0.8)
        assert np.isfinite(float(loss)) and float(jnp.max(aux["t"])) < 1.0, (kind, w)


def test_weighting_must_return_one_weight_per_example():
    # a [B, 1] weight (e.g. built with broadcast_t) broadcast the [B] squared errors to [B, B]:
    # the loss was silently mean(w) * mean(sq)
    x0 = jax.random.normal(jax.random.key(0), (8, 3))
    ok = gf.losses.diffusion_loss(_zero, gf.paths.vp_cosine(), x0, jax.random.key(1),
                                  weighting=lambda p, t: 1.0 / p.snr(t))[1]["per_example"]
    assert ok.shape == (8,)
    with pytest.raises(ValueError, match=r"must return a scalar or shape \[B\] = \[8\]; got shape \(8, 1\)"):
        gf.losses.diffusion_loss(_zero, gf.paths.vp_cosine(), x0, jax.random.key(1),
                                 weighting=lambda p, t: 1.0 / p.snr(t)[:, None])
    # (a weighting without a return: "broadcast_to requires ndarray or scalar arguments", unnamed)
    with pytest.raises(ValueError, match=r"weighting .* must return an array \(a scalar or shape \[B\] = \[8\]\); "
                                         r"got NoneType"):
        gf.losses.diffusion_loss(_zero, gf.paths.vp_cosine(), x0, jax.random.key(1), weighting=lambda p, t: None)

    class Wrapped:  # (an object JAX reads through __jax_array__ is an array)
        def __jax_array__(self):
            return jnp.ones(8)

    wrapped = gf.losses.diffusion_loss(_zero, gf.paths.vp_cosine(), x0, jax.random.key(1),
                                       weighting=lambda p, t: Wrapped())[1]["per_example"]
    unit = gf.losses.diffusion_loss(_zero, gf.paths.vp_cosine(), x0, jax.random.key(1), weighting="uniform")
    np.testing.assert_allclose(wrapped, unit[1]["per_example"], rtol=1e-6)


def test_float64_data_under_x64_gives_the_float64_loss():
    # the weights and the squared error were cast to float32 whatever the data's dtype
    with jax.enable_x64(True):
        path = gf.paths.vp_cosine()
        x0 = jax.random.normal(jax.random.key(3), (64, 3), jnp.float64)
        loss, aux = gf.losses.diffusion_loss(_zero, path, x0, jax.random.key(4), prediction="x0", weighting="min_snr")
        t = aux["t"]
        x1 = jax.random.normal(jax.random.split(jax.random.key(4), 3)[1], x0.shape, jnp.float64)
        target = gf.param.from_x0_eps(x0, x1, path.add_noise(x0, x1, t), t, path, "x0")
        lam = jnp.minimum(path.snr(t), 5.0) / path.snr(t) / gf.param.eps_scale(path, t, "x0") ** 2
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(float(loss), float(jnp.mean(lam * jnp.mean(target ** 2, -1))), rtol=1e-12)


def test_stratified_times_cover_interval():
    t = gf.losses.sample_t(jax.random.key(0), 64, 0.1, 1.0, stratified=True)
    counts = np.histogram(np.asarray(t), bins=8, range=(0.1, 1.0))[0]
    assert counts.min() == counts.max() == 8


def test_stratified_offsets_are_uniform_on_the_whole_stratum():
    """Each draw is (k + u) / n with one u ~ U[0, 1) shared by the row: the offsets n t - k are
    equal within a row and uniform on [0, 1) across keys (an offset 0.5 u biased the mean time to
    0.47 and left the upper half of every stratum empty; counting per stratum cannot see that)."""
    n = 8
    u = np.stack([np.asarray(gf.losses.sample_t(jax.random.key(i), n, stratified=True)) * n - np.arange(n)
                  for i in range(2000)])
    assert np.ptp(u, axis=1).max() < 1e-5
    u = u[:, 0]
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.02 and u.max() > 0.95 and u.min() < 0.05  # (standard error of the mean 0.0065)
    assert abs(np.mean(u < 0.5) - 0.5) < 0.04


def test_bad_inputs():
    path = gf.paths.linear()
    x0 = jnp.ones((4, 2))
    with pytest.raises(ValueError, match="unknown coupling 'sinkhorn'"):
        gf.losses.diffusion_loss(lambda x, t: x, path, x0, jax.random.key(0), coupling="sinkhorn")
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        gf.losses.diffusion_loss(lambda x, t: x, path, x0, jax.random.key(0), prediction="noise")
    with pytest.raises(ValueError, match="does not match the data shape"):
        gf.losses.diffusion_loss(lambda x, t: x[:, :1], path, x0, jax.random.key(0))
    with pytest.raises(ValueError, match=r"x0 must be a floating-point array \[B, ...\] with B >= 1; got dtype float32, shape \(\)"):
        gf.losses.diffusion_loss(lambda x, t: x, path, jnp.float32(1.0), jax.random.key(0))
    with pytest.raises(ValueError, match=r"with B >= 1; got dtype float32, shape \(0, 2\)"):  # (mean loss: NaN)
        gf.losses.flow_matching_loss(lambda x, t: x, path, jnp.ones((0, 2)), jax.random.key(0))
    with pytest.raises(TypeError, match="dsm_loss fixes prediction='score' and weighting='score'; got weighting"):
        gf.losses.dsm_loss(lambda x, t: x, path, x0, jax.random.key(0), weighting="uniform")


def _zero(x, t):
    return jnp.zeros_like(x)


@pytest.mark.parametrize("path_name,kind,t_end", [("linear", "x0", 0.0), ("vp_cosine", "x0", 0.0),
                                                  ("linear", "velocity", 1.0), ("linear", "v", 1.0)])
def test_uniform_weighting_at_degenerate_endpoints(path_name, kind, t_end):
    # At these endpoints eps_scale is 0 or infinite; the plain MSE of the predicted kind is still
    # finite (lambda = 1 exactly): ||0 - target||^2 with the target in closed form.
    path = gf.paths.get(path_name)
    x0 = jax.random.normal(jax.random.key(1), (64, 3))
    loss, aux = gf.losses.diffusion_loss(_zero, path, x0, jax.random.key(2), prediction=kind, t_min=t_end, t_max=t_end)
    kn = jax.random.split(jax.random.key(2), 3)[1]
    x1 = jax.random.normal(kn, x0.shape)
    target = gf.param.from_x0_eps(x0, x1, path.add_noise(x0, x1, aux["t"]), aux["t"], path, kind)
    assert np.all(np.isfinite(np.asarray(target)))
    np.testing.assert_allclose(float(loss), float(jnp.mean(jnp.mean(target ** 2, -1))), rtol=1e-6)


def test_snr_weightings_have_finite_limits():
    path, t = gf.paths.linear(), jnp.array([0.0, 0.25, 0.5, 1.0])
    snr = np.asarray(path.snr(t[1:3]))
    w = gf.losses.get_weighting("min_snr", "eps", gamma=5.0)(path, t)
    np.testing.assert_allclose(w, [0.0, *(np.minimum(snr, 5.0) / snr), 1.0], rtol=1e-6)
    w = gf.losses.get_weighting("truncated_snr", "eps")(path, t)
    np.testing.assert_allclose(w[:3], [1.0, 1.0, 1.0], rtol=1e-6)  # SNR >= 1 for t <= 0.5 on linear
    assert np.isinf(float(w[3]))  # 1 / SNR at SNR = 0


@pytest.mark.parametrize("dtype,path_name,kind", [(jnp.bfloat16, "linear", "velocity"),
                                                  (jnp.float16, "edm", "v"), (jnp.float16, "edm", "velocity")])
def test_low_precision_data_gives_the_float32_loss(dtype, path_name, kind):
    # Times and weights are computed in float32: in bfloat16 t near 1 rounds to 1.0, in float16
    # EDM's c^2 overflows. The loss should match the float32 one up to the data's rounding.
    path = gf.paths.get(path_name)
    x0 = jax.random.normal(jax.random.key(3), (256, 4))
    t_hi = 1.0 - 1e-4
    kw = dict(prediction=kind, t_min=0.9, t_max=t_hi)
    lo, aux = gf.losses.diffusion_loss(_zero, path, x0.astype(dtype), jax.random.key(4), **kw)
    t = aux["t"]
    assert t.dtype == jnp.float32 and float(t.max()) < 1.0
    assert lo.dtype == jnp.float32
    # the same draws, the target in float32: ||0 - target||^2 with lambda = 1
    x1 = jax.random.normal(jax.random.split(jax.random.key(4), 3)[1], x0.shape, dtype).astype(jnp.float32)
    x0f = x0.astype(dtype).astype(jnp.float32)
    target = gf.param.from_x0_eps(x0f, x1, path.add_noise(x0f, x1, t), t, path, kind)
    assert np.isfinite(float(lo))
    np.testing.assert_allclose(float(lo), float(jnp.mean(jnp.mean(target ** 2, -1))), rtol=1e-5)


def test_loss_argument_checks():
    path, x0, key = gf.paths.linear(), jnp.ones((4, 2)), jax.random.key(0)
    with pytest.raises(ValueError, match=r"t_min must lie in \[0, 1\]"):
        gf.losses.flow_matching_loss(_zero, path, x0, key, t_min=-0.5)
    with pytest.raises(ValueError, match=r"t_max must lie in \[0, 1\]"):
        gf.losses.flow_matching_loss(_zero, path, x0, key, t_max=1.5)
    with pytest.raises(ValueError, match="t_min must be <= t_max"):
        gf.losses.flow_matching_loss(_zero, path, x0, key, t_min=0.8, t_max=0.2)
    with pytest.raises(ValueError, match="x0 must be a floating-point array"):
        gf.losses.flow_matching_loss(_zero, path, jnp.ones((4, 2), jnp.uint8), key)
    with pytest.raises(ValueError, match="gamma .* must be > 0"):
        gf.losses.diffusion_loss(_zero, path, x0, key, prediction="x0", weighting="min_snr", gamma=0.0)
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\]"):
        gf.losses.drop_labels(key, jnp.zeros((4,), jnp.int32), 1.5, 10)
    d = gf.losses.drop_labels(key, jnp.zeros((4,), jnp.int32), jnp.array([0.0, 1.0, 0.0, 1.0]), 10)  # per example
    np.testing.assert_array_equal(d, [0, 10, 0, 10])
    # a Python float inside jit (the images notebook's label dropout) is concrete: checked, not traced
    jax.jit(lambda k, y: gf.losses.drop_labels(k, y, 0.1, 10))(key, jnp.zeros((4,), jnp.int32))
    with pytest.raises(TypeError, match="fixes prediction='velocity' and weighting='uniform'"):
        gf.losses.flow_matching_loss(_zero, path, x0, key, weighting="elbo")
    # checks do not get in the way of jit (t_min / t_max are Python floats there too)
    f = jax.jit(lambda x, k: gf.losses.flow_matching_loss(_zero, path, x, k, t_min=0.1)[0])
    assert np.isfinite(float(f(x0, key)))


def test_drop_labels_drops_whole_conditions():
    # [B, L] conditions (token ids, one-hot, embeddings) were dropped entry by entry: 57% of the
    # samples came back as a mix of real and null tokens, none fully dropped
    y = jnp.tile(jnp.arange(1, 9, dtype=jnp.int32), (20_000, 1))
    d = gf.losses.drop_labels(jax.random.key(0), y, 0.1, 0)
    dropped, kept = jnp.all(d == 0, -1), jnp.all(d == y, -1)
    assert bool(jnp.all(dropped | kept))
    assert abs(float(dropped.mean()) - 0.1) < 0.01
    # [B] labels: unchanged behaviour (one draw per sample)
    d1 = gf.losses.drop_labels(jax.random.key(0), jnp.ones((20_000,), jnp.int32), 0.1, 0)
    np.testing.assert_array_equal(d1 == 0, dropped)


def test_sigmoid_bias_must_be_finite():
    x0 = jnp.ones((4, 2))
    with pytest.raises(ValueError, match="bias .* must be a finite real"):
        gf.losses.diffusion_loss(lambda x, t: x, gf.paths.vp_cosine(), x0, jax.random.key(0), weighting="sigmoid",
                                 bias=float("nan"))


def test_dsm_loss_of_the_oracle_score_is_the_eps_bayes_risk():
    """dsm_loss (sigma^2-weighted score matching) of the exact score is E_t mean_d Var(eps | x_t),
    the eps Bayes risk (sigma^2 |s - score_target|^2 = |sigma s + eps|^2), and any other score
    (here shifted by delta) scores higher by ~ E[sigma^2] delta^2."""
    path = gf.paths.vp_cosine()
    g = gf.oracles.Gaussian.diagonal(MU, V)
    x0 = g.sample(jax.random.key(0), N)
    fn = g.model(path, "score")
    run = jax.jit(lambda d, x, k: gf.losses.dsm_loss(lambda y, t: fn(y, t) + d, path, x, k))
    loss, aux = run(0.0, x0, jax.random.key(1))
    se = float(jnp.std(aux["per_example"]) / np.sqrt(N))
    expected = _bayes_risk(path, "eps")
    assert abs(float(loss) - expected) < 4 * se + 1e-3, (float(loss), expected, se)
    worse, _ = run(0.3, x0, jax.random.key(1))
    assert float(worse) > float(loss) + 0.3**2 * float(jnp.mean(path.sigma(aux["t"]) ** 2)) * 0.8


def test_independent_coupling_keeps_the_draw():
    """The independent coupling returns the noise batch unchanged (the pairing of the draw),
    whatever the key and the data, and is what coupling="independent" (the default) uses."""
    x0 = jax.random.normal(jax.random.key(0), (5, 3))
    x1 = jax.random.normal(jax.random.key(1), (5, 3))
    for k in (0, 1):
        np.testing.assert_array_equal(gf.losses.independent_coupling(jax.random.key(k), x0, x1), x1)
    np.testing.assert_array_equal(gf.losses.independent_coupling(jax.random.key(0), -x0, x1), x1)
    assert gf.losses.COUPLINGS["independent"] is gf.losses.independent_coupling
    # the default coupling gives the same loss as passing the function itself
    path = gf.paths.linear()
    fn = lambda x, t: 0.5 * x  # noqa: E731
    a, _ = gf.losses.flow_matching_loss(fn, path, x0, jax.random.key(2))
    b, _ = gf.losses.flow_matching_loss(fn, path, x0, jax.random.key(2), coupling=gf.losses.independent_coupling)
    assert float(a) == float(b)


@pytest.mark.parametrize("name", sorted(gf.losses.COUPLINGS))
def test_every_named_coupling_pairs_a_permutation_of_the_noise(name):
    """Every entry of COUPLINGS is accepted by name and returns x1 (or a row permutation of it),
    never new noise: the multiset of rows is unchanged and the loss matches the callable's."""
    x0 = jax.random.normal(jax.random.key(0), (6, 2))
    x1 = jax.random.normal(jax.random.key(1), (6, 2))
    out = np.asarray(gf.losses.COUPLINGS[name](jax.random.key(3), x0, x1))
    np.testing.assert_array_equal(np.sort(out, axis=0), np.sort(np.asarray(x1), axis=0))
    np.testing.assert_array_equal(np.sort(out.sum(1)), np.sort(np.asarray(x1).sum(1)))  # whole rows moved
    path = gf.paths.linear()
    fn = lambda x, t: 0.5 * x  # noqa: E731
    a, _ = gf.losses.flow_matching_loss(fn, path, x0, jax.random.key(2), coupling=name)
    b, _ = gf.losses.flow_matching_loss(fn, path, x0, jax.random.key(2), coupling=gf.losses.COUPLINGS[name])
    assert float(a) == float(b)


@pytest.mark.parametrize("kind", gf.param.KINDS)
def test_every_named_weighting_is_accepted_and_finite_inside(kind):
    """Every name in WEIGHTINGS builds a weighting for every prediction kind, returning finite,
    non-negative per-example weights [B] on interior times, and diffusion_loss accepts the name."""
    path = gf.paths.vp_cosine()
    t = jnp.linspace(0.05, 0.95, 7)
    x0 = jax.random.normal(jax.random.key(0), (7, 2))
    for name in gf.losses.WEIGHTINGS:
        w = jnp.broadcast_to(gf.losses.get_weighting(name, kind)(path, t), t.shape)
        assert np.all(np.isfinite(np.asarray(w))) and np.all(np.asarray(w) >= 0), (name, kind, w)
        loss, aux = gf.losses.diffusion_loss(lambda x, t: jnp.zeros_like(x), path, x0, jax.random.key(1),
                                             prediction=kind, weighting=name, t_min=0.05, t_max=0.95)
        assert np.isfinite(float(loss)) and aux["per_example"].shape == (7,), (name, kind)
    # "uniform" is the plain MSE of the predicted kind: w = c^2
    c = gf.param.eps_scale(path, t, kind)
    np.testing.assert_allclose(gf.losses.get_weighting("uniform", kind)(path, t), c * c, rtol=1e-6)


def test_drop_labels_refuses_a_fractional_null_label():
    """null_label=10.7 was cast to the integer label 10 (a real class, not "no label")."""
    y = jnp.arange(4)
    for bad in (10.7, "10", float("nan")):
        with pytest.raises(ValueError, match="null_label must be an integer"):
            gf.losses.drop_labels(jax.random.key(0), y, 1.0, bad)
    np.testing.assert_array_equal(gf.losses.drop_labels(jax.random.key(0), y, 1.0, 10.0), [10] * 4)
    np.testing.assert_array_equal(gf.losses.drop_labels(jax.random.key(0), jnp.ones((4, 2)), 1.0, 0.5),
                                  np.full((4, 2), 0.5))  # continuous conditions take a real null
    # a [B, 1] p failed in jax.random.bernoulli's broadcasting, naming no argument (shapes audit)
    with pytest.raises(ValueError, match=r"p must be a scalar or have shape \[1\] or \[B\] = \[4\]; got shape \(4, 1\)"):
        gf.losses.drop_labels(jax.random.key(0), y, jnp.full((4, 1), 0.5), 9)
    np.testing.assert_array_equal(gf.losses.drop_labels(jax.random.key(0), y, jnp.array([1.0]), 9), [9] * 4)
    np.testing.assert_array_equal(gf.losses.drop_labels(jax.random.key(0), y, jnp.array([1.0, 0, 1, 0]), 9), [9, 1, 9, 3])


def test_a_key_passed_as_data_is_named():
    """Swapping key and x0: the data check's hint test read the key dtype with NumPy, which raised
    "Cannot interpret 'key<fry>' as a data type"."""
    with pytest.raises(ValueError, match=r"x0 must be a floating-point array .* got dtype key<fry>, shape \(\)$"):
        gf.losses.diffusion_loss(lambda x, t: x, gf.paths.linear(), jax.random.key(0), jnp.ones((4, 2)),
                                 prediction="velocity")


def test_drop_labels_refuses_a_null_label_outside_the_label_dtype():
    """np.int64(300) as the null label of uint8 labels wrapped onto the real class 44; a Python
    256 or -1 was an OverflowError that did not name the argument."""
    y = jnp.array([1, 2, 3, 4], jnp.uint8)
    for bad in (np.int64(300), 256, -1, 300.0):
        with pytest.raises(ValueError, match=r"null_label=.* is out of range for labels y of dtype uint8 \(0..255\)"):
            gf.losses.drop_labels(jax.random.key(0), y, 1.0, bad)
    np.testing.assert_array_equal(gf.losses.drop_labels(jax.random.key(0), y, 1.0, np.int64(255)), [255] * 4)


def test_min_snr_of_an_x0_model_is_finite_where_the_snr_overflows():
    # Hang et al.'s min-SNR weights an x0 model's MSE by min(SNR, gamma) <= gamma. On
    # edm(sigma_min=0) at t < 1e-3, sigma^2 (so 1/SNR) underflows in float32 and the eps-space
    # weight min(SNR, gamma) / SNR divided by c^2 = 1/SNR was 0 / 0: a NaN loss for any x0 model.
    path = gf.paths.edm(sigma_min=0.0)
    x0 = jax.random.normal(jax.random.key(0), (64, 3))
    zero = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    loss, aux = gf.losses.diffusion_loss(zero, path, x0, jax.random.key(1), prediction="x0", weighting="min_snr",
                                         gamma=5.0, t_min=1e-4, t_max=5e-4)
    assert float(path.sigma(jnp.float32(5e-4)) ** 2) == 0.0  # the regime: 1/SNR underflows
    np.testing.assert_allclose(aux["per_example"], 5.0 * jnp.mean(x0 ** 2, -1), rtol=1e-6)
    # the x0-space definitions inside the range (min(SNR, gamma), max(SNR, 1) on the x0-MSE)
    path = gf.paths.vp_cosine()
    for name, f in (("min_snr", lambda snr: np.minimum(snr, 5.0)), ("truncated_snr", lambda snr: np.maximum(snr, 1.0))):
        loss, aux = gf.losses.diffusion_loss(zero, path, x0, jax.random.key(2), prediction="x0", weighting=name,
                                             gamma=5.0, t_min=0.05, t_max=0.95)
        snr = np.asarray(path.snr(aux["t"]))
        np.testing.assert_allclose(aux["per_example"], f(snr) * np.asarray(jnp.mean(x0 ** 2, -1)), rtol=1e-5)


def test_low_precision_model_sees_the_time_gf_sample_gives_it():
    """With bfloat16 data the model gets x_t in bfloat16 and t in float32, as from gf.sample (t
    rounded to bfloat16 took 128 values in [0.5, 1): a time embedding trained on a lattice)."""
    seen = {}

    def net(x, t):
        seen["x"], seen["t"] = x.dtype, t
        return jnp.zeros_like(x)

    path = gf.paths.linear()
    x0 = jax.random.normal(jax.random.key(3), (64, 2)).astype(jnp.bfloat16)
    _, aux = gf.losses.diffusion_loss(net, path, x0, jax.random.key(4), prediction="velocity", t_min=0.5)
    assert seen["x"] == jnp.bfloat16 and seen["t"].dtype == jnp.float32
    np.testing.assert_array_equal(seen["t"], aux["t"])  # the exact times of the targets
    gf.sample(net, path, x0, prediction="velocity", solver="euler", steps=1)
    assert seen["t"].dtype == jnp.float32


# -- from the sixth mutation audit (each test fails on its mutant) --
@pytest.mark.parametrize("kind", ["eps", "velocity", "v"])
def test_x_t_is_built_from_the_coupled_noise(kind):
    """x_t = alpha x0 + sigma x1 with x1 the coupling's OUTPUT (module docstring: (x0, x1) ~ coupling,
    then x_t): the model sees that x_t, and a model that reads the exact noise off x_t (knowing x0)
    has zero loss. The existing coupling tests compare two calls of the same code path, so an x_t
    built from the pre-coupling draw went unnoticed (harmless for "independent", wrong for "ot")."""
    path = gf.paths.vp_cosine() if kind != "velocity" else gf.paths.linear()
    x0 = jax.random.normal(jax.random.key(0), (16, 3))
    x1 = jax.random.normal(jax.random.key(1), (16, 3))
    coupling = lambda key, a, b: x1[::-1]  # noqa: E731  (a fixed permutation of the noise we know)
    want_x1 = np.asarray(x1)[::-1]
    seen = {}

    def perfect(x, t):  # eps read off x_t given x0, converted to the predicted kind
        seen["x"], seen["t"] = np.asarray(x), np.asarray(t)
        a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
        eps = (x - a * x0) / s
        return gf.param.from_x0_eps(x0, eps, x, t, path, kind)

    loss, aux = gf.losses.diffusion_loss(perfect, path, x0, jax.random.key(2), prediction=kind, coupling=coupling,
                                         t_min=0.05, t_max=0.95)
    a, s = np.asarray(path.alpha(aux["t"]))[:, None], np.asarray(path.sigma(aux["t"]))[:, None]
    np.testing.assert_allclose(seen["x"], a * np.asarray(x0) + s * want_x1, rtol=1e-5, atol=1e-6)
    assert float(loss) < 1e-8, float(loss)


def test_diffusion_loss_sigmoid_default_bias_is_get_weightings_default():
    """diffusion_loss(weighting="sigmoid") without bias= uses the same default bias as
    get_weighting("sigmoid", ...) (2.0 in both signatures): w = -dlambda/dt / 2 * sigmoid(2 - lambda)."""
    path = gf.paths.vp_cosine()
    x0 = jax.random.normal(jax.random.key(0), (32, 2))
    zero = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    _, a = gf.losses.diffusion_loss(zero, path, x0, jax.random.key(1), weighting="sigmoid", t_min=0.05, t_max=0.95)
    t = a["t"]
    w = -0.5 * np.asarray(path.d_log_snr(t)) * (1.0 / (1.0 + np.exp(-(2.0 - np.asarray(path.log_snr(t))))))
    np.testing.assert_allclose(np.asarray(gf.losses.get_weighting("sigmoid", "eps")(path, t)), w, rtol=1e-5)
    _, b = gf.losses.diffusion_loss(zero, path, x0, jax.random.key(1), weighting=lambda p, tt: jnp.asarray(w),
                                    t_min=0.05, t_max=0.95)
    np.testing.assert_allclose(a["per_example"], b["per_example"], rtol=1e-6)


def test_t_min_defaults_to_the_paths_t_min():
    """Documented: t_min defaults to path.t_min (vp_linear: 1e-3). With 20000 draws, a default of 0
    would put ~20 times below 1e-3 (probability of none ~2e-9)."""
    path = gf.paths.vp_linear()
    assert path.t_min > 0
    x0 = jnp.zeros((20000, 1))
    _, aux = gf.losses.diffusion_loss(lambda x, t: jnp.zeros_like(x), path, x0, jax.random.key(0))
    t = np.asarray(aux["t"])
    assert t.min() >= path.t_min and t.max() < 1.0
    assert abs(np.mean(t) - (1.0 + path.t_min) / 2) < 0.01  # uniform on [t_min, 1)


@pytest.mark.parametrize("weighting", ["eps", "snr", "min_snr", "elbo", "sigmoid"])
def test_score_model_loss_is_finite_where_sigma_squared_underflows(weighting):
    # On edm(sigma_min=0) at t < 1e-3, sigma ~ 1e-20: the eps-space weight w / c^2 = w sigma^2
    # underflowed to 0 and the score residual squared (~ 1/sigma^2) overflowed: 0 * inf = NaN for
    # every weighting of a score model (the true loss is the O(1) eps-space error). The residual is
    # now scaled before squaring: the loss is w(t) mean_d (eps_hat - eps)^2, eps_hat = -sigma score.
    path = gf.paths.edm(sigma_min=0.0)
    g = gf.oracles.Gaussian.diagonal(MU, V)
    x0 = g.sample(jax.random.key(0), 64)
    eps = jax.random.normal(jax.random.key(2), x0.shape)
    loss, aux = gf.losses.diffusion_loss(g.model(path, "score"), path, x0, jax.random.key(1), prediction="score",
                                         weighting=weighting, coupling=lambda k, a, b: eps, t_min=1e-5, t_max=1e-3)
    assert float(path.sigma(aux["t"][0]) ** 2) == 0.0  # the regime: sigma^2 underflows in float32
    with jax.enable_x64(True):
        t = jnp.asarray(aux["t"], jnp.float64)
        s = np.asarray(path.sigma(t))[:, None]
        xt = np.asarray(x0, np.float64) + s * np.asarray(eps, np.float64)  # (alpha = 1 on edm)
        eps_hat = s * (xt - np.asarray(MU)) / (np.asarray(V) + s**2)
        w = np.asarray(gf.losses.get_weighting(weighting, "eps")(path, t))
    want = w * np.mean((eps_hat - np.asarray(eps, np.float64)) ** 2, axis=-1)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(aux["per_example"], want, rtol=1e-4, atol=1e-30)  # (elbo, sigmoid: w ~ 1e-38)


def test_sample_t_and_conversions_check_their_times():
    # sample_t(t_min=0.8, t_max=0.2) returned all 0.8 and t_min=-1 negative times; to_x0_eps /
    # from_x0_eps extrapolated the path outside [0, 1] (convert refused it)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="t_min must be <= t_max"):
        gf.losses.sample_t(key, 4, t_min=0.8, t_max=0.2)
    with pytest.raises(ValueError, match="t_min"):
        gf.losses.sample_t(key, 4, t_min=-1.0)
    with pytest.raises(ValueError, match="n must be"):
        gf.losses.sample_t(key, 2.5)
    x = jnp.ones((2, 3))
    path = gf.paths.vp_cosine()
    with pytest.raises(ValueError, match="t"):
        gf.param.to_x0_eps(x, x, 1.5, path, "eps")
    with pytest.raises(ValueError, match="t"):
        gf.param.from_x0_eps(x, x, x, -0.5, path, "v")


def test_prior_sample_scale_is_exact_in_bfloat16():
    # sigma(1) was evaluated in the sample's dtype: 81.5 for edm's 80 in bfloat16 (a 1.9% wider prior)
    path = gf.paths.edm()
    z = jax.random.normal(jax.random.key(0), (64,), jnp.bfloat16)
    got = path.prior_sample(jax.random.key(0), (64,), jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    # (to bfloat16's rounding, 2^-8 relative; sigma(1) is 79.999985 in float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), 80.0 * np.asarray(z, np.float32), rtol=2.0**-8)


def test_weights_that_underflow_to_zero_keep_finite_gradients():
    # a first fix scaled the residual by sqrt(w): its derivative is inf at w = 0, so d loss / d bias of
    # the sigmoid weighting (which underflows to 0 at t < 1e-3 on edm(sigma_min=0)) was NaN
    x0 = jax.random.normal(jax.random.key(0), (8, 3))
    fn = lambda x, t: 0.5 * x  # noqa: E731
    path = gf.paths.edm(sigma_min=0.0)

    def loss(bias):
        return gf.losses.diffusion_loss(fn, path, x0, jax.random.key(1), weighting="sigmoid", bias=bias, t_min=1e-6,
                                        t_max=1e-3)[0]

    assert np.isfinite(float(jax.grad(loss)(2.0)))
