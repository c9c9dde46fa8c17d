"""Guidance transformers against closed forms, and traced scales that never recompile."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf

PATH = gf.paths.vp_cosine()
COV = jnp.array([[0.5, 0.1], [0.1, 0.3]])
COND = gf.oracles.Gaussian.full(jnp.array([1.5, -0.5]), COV)
UNCOND = gf.oracles.Gaussian.full(jnp.array([-0.5, 0.5]), COV)


def _xt(n=64, t=0.6, key=0):
    x = jax.random.normal(jax.random.key(key), (n, 2))
    return x, jnp.full((n,), t)


def test_cfg_of_gaussians_samples_the_guided_gaussian():
    """With equal covariances, (1 - w) score_u + w score_c is the score of N(mu_u + w (mu_c - mu_u), C)
    at every t, so sampling the guided model reproduces that Gaussian's exact flow map."""
    w = 2.5
    guided = gf.guidance.cfg(COND.model(PATH, "eps"), UNCOND.model(PATH, "eps"), w)
    target = gf.oracles.Gaussian.full(UNCOND.mean + w * (COND.mean - UNCOND.mean), COV)
    x1 = jax.random.normal(jax.random.key(0), (256, 2))
    x, _ = gf.sample(guided, PATH, x1, prediction="eps", solver="dpm++3m", steps=40, schedule="logsnr")
    ref = target.flow_map(x1, 1.0, 0.0, PATH)
    assert float(jnp.sqrt(jnp.mean((x - ref) ** 2))) < 2e-3


_TRACED_LEAVES = {  # (what changes, how the guided model is built from it, three values of it)
    "scale": (lambda cond, v: gf.guidance.interval(gf.guidance.cfg(cond, UNCOND.model(PATH, "v"), v), 0.2, 0.8),
              (1.0, 3.0, 7.5)),
    "interval ends": (lambda cond, v: gf.guidance.interval(gf.guidance.cfg(cond, UNCOND.model(PATH, "v"), 3.0), *v),
                      ((0.2, 0.8), (0.3, 0.9), (0.1, 0.5))),
    "adaptive threshold": (lambda cond, v: gf.guidance.adaptive(gf.guidance.cfg(cond, UNCOND.model(PATH, "v"), 3.0), v),
                           (0.9, 0.95, 0.99)),
}


@pytest.mark.parametrize("what", sorted(_TRACED_LEAVES))
def test_changing_a_guidance_parameter_does_not_recompile(what):
    """The module docstring: scales, interval ends and thresholds are traced leaves, so a new value
    reuses the compiled sampler (interval ends kept as Python floats, or a threshold not made a
    leaf, recompiled it for every value) and changes the samples."""
    make, values = _TRACED_LEAVES[what]
    traces = []

    def cond(x, t):
        traces.append(1)  # runs only while tracing
        return COND.model(PATH, "v")(x, t)

    x1 = jax.random.normal(jax.random.key(0), (16, 2))
    outs, counts = [], []
    for v in values:
        outs.append(gf.sample(make(jax.tree_util.Partial(cond), v), PATH, x1, prediction="v", solver="unipc", steps=8)[0])
        counts.append(len(traces))
    assert counts[0] > 0 and counts[1] == counts[2] == counts[0], f"a new {what} must reuse the compiled sampler"
    if what != "adaptive threshold":  # (these thresholds need not switch guidance off at different steps)
        assert not np.allclose(outs[0], outs[1])


def test_batched_cfg_equals_two_calls():
    def net(x, t, y):  # a "conditional network": prediction depends on the label y in {0, 1}
        c, u = COND.model(PATH, "x0")(x, t), UNCOND.model(PATH, "x0")(x, t)
        return jnp.where((y == 1)[:, None], c, u)

    x, t = _xt()
    a = gf.guidance.cfg_batched(net, 1, 0, 4.0)(x, t)
    b = gf.guidance.cfg(functools.partial(net, y=jnp.ones(64, int)), functools.partial(net, y=jnp.zeros(64, int)),
                        4.0)(x, t)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # a scalar t, as CFG takes it (it failed to concatenate)
    np.testing.assert_allclose(gf.guidance.cfg_batched(net, 1, 0, 4.0)(x, t[0]),
                               gf.guidance.cfg_batched(net, 1, 0, 4.0)(x, jnp.full((64,), t[0])), rtol=1e-6, atol=1e-6)


def test_interval_guidance_only_inside_and_skips_the_unconditional_model():
    calls = []

    def uncond(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return UNCOND.model(PATH, "eps")(x, t)

    g = gf.guidance.cfg(COND.model(PATH, "eps"), jax.tree_util.Partial(uncond), 3.0)
    iv = gf.guidance.interval(g, 0.3, 0.7)
    fn = jax.jit(lambda x, t: iv(x, t))
    x, _ = _xt()
    for t, inside in ((0.5, True), (0.9, False), (0.1, False), (0.7, True), (0.3, False)):
        tt = jnp.full((64,), t)
        want = g(x, tt) if inside else COND.model(PATH, "eps")(x, tt)
        jax.effects_barrier()
        calls.clear()
        out = fn(x, tt)
        jax.effects_barrier()
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
        assert len(calls) == int(inside), t


def test_interval_guidance_with_per_sample_times():
    """A batch with times on both sides of the interval (as Restart / per-sample schedules give):
    each row is guided or conditional by its own t. (With every row outside, the unconditional
    branch returns (c, c), which hides the scale used outside: a scale of 0 there, instead of 1,
    only shows in a mixed batch.)"""
    g = gf.guidance.cfg(COND.model(PATH, "eps"), UNCOND.model(PATH, "eps"), 3.0)
    iv = jax.jit(lambda x, t: gf.guidance.interval(g, 0.3, 0.7)(x, t))
    x, _ = _xt()
    t = jnp.tile(jnp.array([0.5, 0.9, 0.1, 0.6, 0.7, 0.3, 0.31, 0.05]), x.shape[0] // 8)
    inside = (t > 0.3) & (t <= 0.7)
    want = jnp.where(inside[:, None], g(x, t), COND.model(PATH, "eps")(x, t))
    np.testing.assert_allclose(iv(x, t), want, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(g(x, t) - COND.model(PATH, "eps")(x, t)))) > 0.1  # (guidance does something)


def test_cads_condition_annealing():
    y = jax.random.normal(jax.random.key(1), (8, 16)) + 2.0
    key = jax.random.key(2)
    net = lambda x, t, c: c  # noqa: E731  reads the condition it is given
    c = gf.guidance.cads(net, y, key, tau1=0.4, tau2=0.8, noise_scale=0.5)
    x = jnp.zeros((8, 16))
    # gamma = 1 near the data: the condition is untouched
    np.testing.assert_allclose(c(x, jnp.full((8,), 0.3)), y, rtol=1e-6)
    np.testing.assert_allclose(gf.guidance.cads_gamma(jnp.array([0.3, 0.6, 0.9]), 0.4, 0.8), [1.0, 0.5, 0.0])
    # gamma = 0 at high noise: pure noise, rescaled to the per-sample mean and std of y
    hi = c(x, jnp.full((8,), 0.95))
    np.testing.assert_allclose(hi.mean(1), y.mean(1), atol=1e-5)
    np.testing.assert_allclose(hi.std(1), y.std(1), rtol=1e-4)
    assert abs(float(jnp.corrcoef(hi.ravel(), y.ravel())[0, 1])) < 0.3
    # in between: sqrt(gamma) y + s sqrt(1 - gamma) n without rescaling; fresh noise per time, fixed per key
    raw = gf.guidance.cads(net, y, key, 0.4, 0.8, noise_scale=0.5, rescale=False)
    mid = raw(x, jnp.full((8,), 0.6))
    n = (mid - jnp.sqrt(0.5) * y) / (0.5 * jnp.sqrt(0.5))
    assert 0.8 < float(n.std()) < 1.2
    np.testing.assert_allclose(raw(x, jnp.full((8,), 0.6)), mid)
    assert not np.allclose(raw(x, jnp.full((8,), 0.61)), mid)
    with pytest.raises(ValueError, match="tau1 < tau2"):
        gf.guidance.cads(net, y, key, 0.8, 0.4)


def test_adaptive_guidance_stops_when_predictions_agree():
    x, _ = _xt()
    t = jnp.linspace(0.05, 0.999, 64)  # eps predictions agree near the noise end, differ near the data
    same = gf.guidance.adaptive(gf.guidance.cfg(COND.model(PATH, "eps"), COND.model(PATH, "eps"), 5.0), 0.99)
    np.testing.assert_allclose(same(x, t), COND.model(PATH, "eps")(x, t), rtol=1e-6)
    differ = gf.guidance.cfg(COND.model(PATH, "eps"), UNCOND.model(PATH, "eps"), 5.0)
    ad = gf.guidance.adaptive(differ, 0.99)
    c, u = differ.parts(x, t)
    agree = np.asarray(ad.similarity(c, u) > 0.99)
    assert 0 < agree.sum() < agree.size  # both regimes occur in this batch
    out = np.asarray(ad(x, t))
    np.testing.assert_allclose(out[agree], np.asarray(c)[agree], rtol=1e-6)
    np.testing.assert_allclose(out[~agree], np.asarray(differ(x, t))[~agree], rtol=1e-5)


def test_classifier_guidance_with_the_exact_classifier_is_the_conditional_model():
    """Two equal-weight components: grad log p(x_t) + grad log p(y | x_t) = grad log p(x_t | y)
    (Bayes), so with scale 1 the guided unconditional model is exactly the component's model."""
    mix = gf.oracles.GaussianMixture(jnp.zeros(2), jnp.stack([COND.mean, UNCOND.mean]),
                                     jnp.array([[0.4, 0.3], [0.4, 0.3]]))
    comp = gf.oracles.Gaussian.diagonal(COND.mean, jnp.array([0.4, 0.3]))

    def logits(x, t):  # log p(k | x_t) up to a constant: the mixture responsibilities
        logp, *_ = mix._resp(x, t, PATH)
        return logp

    x, t = _xt()
    for kind in ("eps", "v", "velocity"):
        g = gf.guidance.classifier(mix.model(PATH, kind), PATH, kind, logits, 0, 1.0)
        np.testing.assert_allclose(g(x, t), comp.model(PATH, kind)(x, t), rtol=1e-4, atol=1e-4)
    # the guidance term is linear in the scale
    g0, g1, g2 = (gf.guidance.classifier(mix.model(PATH, "eps"), PATH, "eps", logits, 0, s)(x, t) for s in (0, 1, 2))
    np.testing.assert_allclose(g2 - g1, g1 - g0, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="integer class labels"):
        gf.guidance.classifier(mix.model(PATH, "eps"), PATH, "eps", logits, 0.5, 1.0)
    # from pure noise (alpha = 0 at t = 1 on the linear path) the guidance term is its finite limit
    # (velocity and x0 models were 0/0 there and every sample came back NaN; then unguided)
    lin = gf.paths.linear()

    def lin_logits(x, t):
        return mix._resp(x, t, lin)[0]

    x1 = lin.prior_sample(jax.random.key(0), (64, 2))
    for kind in ("velocity", "x0"):
        g = gf.guidance.classifier(mix.model(lin, kind), lin, kind, lin_logits, 0, 1.0)
        np.testing.assert_allclose(g(x1[:4], jnp.ones(4)), comp.model(lin, kind)(x1[:4], jnp.ones(4)), rtol=1e-4,
                                   atol=1e-4)
        xg, _ = gf.sample(g, lin, x1, prediction=kind, solver="euler", steps=50)
        xc, _ = gf.sample(comp.model(lin, kind), lin, x1, prediction=kind, solver="euler", steps=50)
        assert float(jnp.max(jnp.abs(xg - xc))) < 0.05, kind


def test_bad_inputs():
    with pytest.raises(TypeError, match="cond_fn must be a model function"):
        gf.guidance.cfg(3.0, UNCOND.model(PATH, "eps"), 1.0)
    with pytest.raises(TypeError, match="interval expects a CFG"):
        gf.guidance.interval(UNCOND.model(PATH, "eps"), 0.1, 0.5)
    with pytest.raises(ValueError, match="condition embedding"):
        gf.guidance.cads(lambda x, t, c: c, jnp.array([1, 2]), jax.random.key(0))
    for bad in (None, 0, jax.random.split(jax.random.key(0), 4)):  # (failed inside the sampler, unnamed)
        with pytest.raises(TypeError, match="cads: key must be one PRNG key"):
            gf.guidance.cads(lambda x, t, c: c, jnp.ones((2, 4)), bad)
    # arguments that silently did nothing or the wrong thing
    g = gf.guidance.cfg(COND.model(PATH, "eps"), UNCOND.model(PATH, "eps"), 2.0)
    with pytest.raises(ValueError, match="0 <= t_lo < t_hi <= 1"):
        gf.guidance.interval(g, 0.9, 0.1)  # never guided
    with pytest.raises(ValueError, match=r"threshold is a cosine similarity, expected in \[-1, 1\)"):
        gf.guidance.adaptive(g, 5.0)  # never stopped guiding
    with pytest.raises(ValueError, match="rescale=False"):  # one feature: std 0, y_hat was y exactly
        gf.guidance.cads(lambda x, t, c: c, jnp.ones((3, 1)), jax.random.key(0))
    with pytest.raises(ValueError, match="y holds 2 conditions"):
        gf.guidance.cads(lambda x, t, c: c, jnp.ones((2, 4)), jax.random.key(0))(jnp.ones((3, 2)), jnp.full((3,), 0.7))
    # labels out of the classifier's range gave the unguided model (and -1 the last class)
    logits = lambda x, t: jnp.zeros((x.shape[0], 2)) + x[:, :1]  # noqa: E731
    x, t = _xt()
    for bad in (2, -1):
        with pytest.raises(Exception, match=r"labels y must lie in \[0, 2\)"):
            gf.guidance.classifier(UNCOND.model(PATH, "eps"), PATH, "eps", logits, bad, 1.0)(x, t)
    gf.guidance.classifier(UNCOND.model(PATH, "eps"), PATH, "eps", logits, 1, 1.0)(x, t)


def test_cads_takes_token_embeddings():
    # a [B, L, F] condition (text tokens) failed inside the model; the rescaling restores each
    # sample's mean and std over all its entries
    y = jnp.arange(60.0).reshape(3, 5, 4)
    c = gf.guidance.cads(lambda x, t, c: c, y, jax.random.key(0)).condition(jnp.full((3,), 0.7))
    assert c.shape == y.shape and not np.allclose(c, y)
    np.testing.assert_allclose(c.mean((1, 2)), y.mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(c.std((1, 2)), y.std((1, 2)), rtol=1e-5)


def test_cads_takes_traced_interval_ends():
    # tau1 / tau2 are traced leaves (as in interval and adaptive), but the range check compared
    # tracers: TracerBoolConversionError under jit
    y = jax.random.normal(jax.random.key(1), (4, 8))
    net = lambda x, t, c: c  # noqa: E731
    x, t = jnp.zeros((4, 8)), jnp.full((4,), 0.6)
    f = jax.jit(lambda a: gf.guidance.cads(net, y, jax.random.key(2), tau1=a, tau2=0.9)(x, t))
    np.testing.assert_allclose(f(0.4), gf.guidance.cads(net, y, jax.random.key(2), tau1=0.4, tau2=0.9)(x, t),
                               rtol=1e-5, atol=1e-6)


def test_cfg_scale_one_is_the_conditional_model_exactly():
    # u + 1 * (c - u) rounds: it differed from c in most entries (by up to 7e-6 here)
    k1, k2 = jax.random.split(jax.random.key(0))
    c, u = 3.0 * jax.random.normal(k1, (64, 8)), 50.0 * jax.random.normal(k2, (64, 8))
    cond, unc = jax.tree_util.Partial(lambda x, t: c), jax.tree_util.Partial(lambda x, t: u)
    x, t = jnp.zeros((64, 8)), jnp.full((64,), 0.5)
    np.testing.assert_array_equal(gf.guidance.cfg(cond, unc, 1.0)(x, t), c)
    np.testing.assert_array_equal(gf.guidance.cfg(cond, unc, 0.0)(x, t), u)
    # the interval (inside) and adaptive guidance (where the predictions agree) return c exactly too
    np.testing.assert_array_equal(gf.guidance.interval(gf.guidance.cfg(cond, unc, 1.0), 0.2, 0.8)(x, t), c)
    np.testing.assert_array_equal(gf.guidance.adaptive(gf.guidance.cfg(cond, unc, 3.0), -1.0)(x, t), c)


def test_classifier_guidance_at_the_data_end_is_finite():
    # at t = 0 (sigma = 0) the x0 / score model was converted to eps and back: 0/0, NaN outputs
    mix = gf.oracles.GaussianMixture(jnp.zeros(2), jnp.stack([COND.mean, UNCOND.mean]),
                                     jnp.array([[0.4, 0.3], [0.4, 0.3]]))
    x = jax.random.normal(jax.random.key(0), (4, 2))
    for name in ("linear", "vp_cosine"):
        path = gf.paths.get(name)
        logits = lambda x, t, path=path: mix._resp(x, t, path)[0]  # noqa: E731
        for kind in gf.param.KINDS:
            out = gf.guidance.classifier(mix.model(path, kind), path, kind, logits, 0, 1.0)(x, jnp.zeros(4))
            assert np.all(np.isfinite(np.asarray(out))), (name, kind)
        # the x0 guidance term sigma^2 / alpha * grad vanishes at sigma = 0
        out = gf.guidance.classifier(mix.model(path, "x0"), path, "x0", logits, 0, 1.0)(x, jnp.zeros(4))
        np.testing.assert_allclose(out, mix.model(path, "x0")(x, jnp.zeros(4)), rtol=1e-6, atol=1e-6)


def test_guidance_takes_a_scalar_t_with_per_sample_scales():
    x = jax.random.normal(jax.random.key(0), (4, 2))
    w = jnp.array([1.0, 2.0, 3.0, 4.0])
    g = gf.guidance.cfg(COND.model(PATH, "eps"), UNCOND.model(PATH, "eps"), w)
    want = g(x, jnp.full((4,), 0.5))
    np.testing.assert_allclose(gf.guidance.interval(g, 0.2, 0.8)(x, jnp.float32(0.5)), want, rtol=1e-6)
    np.testing.assert_allclose(gf.guidance.adaptive(g, 0.999999)(x, jnp.float32(0.5)), want, rtol=1e-6)
    y = jax.random.normal(jax.random.key(1), (4, 8))
    c = gf.guidance.cads(lambda x, t, c: c, y, jax.random.key(2))
    np.testing.assert_allclose(c(x, jnp.float32(0.7)), c(x, jnp.full((4,), 0.7)))


def test_guidance_scale_of_wrong_shape_is_named():
    x, t = jnp.zeros((4, 2)), jnp.full((4,), 0.5)
    with pytest.raises(ValueError, match=r"scale must be a scalar or have shape \[B\] = \[4\]; got shape \(3,\)"):
        gf.guidance.cfg(COND.model(PATH, "eps"), UNCOND.model(PATH, "eps"), jnp.ones(3))(x, t)
    # interval and adaptive name it too (JAX's broadcasting error did, without the argument)
    g = gf.guidance.cfg(COND.model(PATH, "eps"), UNCOND.model(PATH, "eps"), jnp.ones(3))
    for wrapped in (gf.guidance.interval(g, 0.1, 0.9), gf.guidance.adaptive(g)):
        with pytest.raises(ValueError, match=r"scale must be a scalar or have shape \[B\] = \[4\]"):
            wrapped(x, t)
    # cfg_batched: labels for another batch size
    with pytest.raises(ValueError, match=r"cfg_batched: y holds 2 conditions \(2,\), but the model is called on a "
                                         r"batch of 4"):
        gf.guidance.cfg_batched(lambda x, t, c: x, jnp.array([1, 1]), 0, 2.0)(x, t)


def test_guidance_scale_must_be_real():
    # NumPy read cfg(scale="2") as 2.0; a bool scale was 1.0
    cond, unc = COND.model(PATH, "eps"), UNCOND.model(PATH, "eps")
    for bad in ("2", True, np.array(["2"])):
        with pytest.raises(TypeError, match="scale must be a real"):
            gf.guidance.cfg(cond, unc, bad)
    np.testing.assert_allclose(gf.guidance.cfg(cond, unc, np.int32(2)).scale, 2.0)


def test_cads_mixing_and_classifier_labels_are_checked():
    """CADS psi / noise_scale were not range-checked (psi = 2 extrapolated past the rescaled
    condition, NaN gave NaN samples); a classifier y of the wrong batch raised a broadcast error
    that did not name y."""
    y = jax.random.normal(jax.random.key(1), (8, 16))
    net = lambda x, t, c: c  # noqa: E731
    for name, bad in (("psi", 2.0), ("psi", -0.1), ("psi", float("nan")), ("noise_scale", -1.0),
                      ("noise_scale", "0.5")):
        with pytest.raises(ValueError, match=f"cads: {name} must be a float"):
            gf.guidance.cads(net, y, jax.random.key(2), **{name: bad})
    c = jax.jit(lambda p: gf.guidance.cads(net, y, jax.random.key(2), psi=p)(jnp.zeros((8, 16)), jnp.full((8,), 0.95)))
    assert np.all(np.isfinite(np.asarray(c(0.5))))  # a traced psi passes
    logits = lambda x, t: jnp.zeros(x.shape[:1] + (3,))  # noqa: E731
    x, t = _xt()
    with pytest.raises(ValueError, match=r"y must be a scalar label or have shape \[B\]"):
        gf.guidance.classifier(COND.model(PATH, "eps"), PATH, "eps", logits, jnp.zeros(3, jnp.int32), 1.0)(x, t)
    with pytest.raises(ValueError, match=r"y must be a scalar label or \[B\] labels"):
        gf.guidance.classifier(COND.model(PATH, "eps"), PATH, "eps", logits, jnp.zeros((2, 2), jnp.int32), 1.0)
    b = x.shape[0]
    out = gf.guidance.classifier(COND.model(PATH, "eps"), PATH, "eps", logits, jnp.zeros(b, jnp.int32), 1.0)(x, t)
    np.testing.assert_allclose(out, COND.model(PATH, "eps")(x, t), rtol=1e-6)  # flat logits: no guidance


def test_cads_psi_mixes_the_rescaled_and_the_raw_condition():
    """eq. 6 of Sadat et al. 2024: y_final = psi * rescaled(y_hat) + (1 - psi) * y_hat. The existing
    tests only check psi=1 (fully rescaled) and that a traced psi gives finite values, so a CADS that
    ignored psi passed them."""
    y = jax.random.normal(jax.random.key(1), (8, 16)) + 2.0
    net = lambda x, t, c: c  # noqa: E731  reads the condition it is given
    x, t = jnp.zeros((8, 16)), jnp.full((8,), 0.7)  # gamma = 0.25 for (tau1, tau2) = (0.6, 0.8)
    kw = dict(tau1=0.6, tau2=0.8, noise_scale=0.5)
    full = gf.guidance.cads(net, y, jax.random.key(2), psi=1.0, **kw)(x, t)
    raw = gf.guidance.cads(net, y, jax.random.key(2), rescale=False, **kw)(x, t)
    assert float(jnp.max(jnp.abs(full - raw))) > 0.1  # the two ends differ here
    for psi in (0.0, 0.3, 0.75):
        got = gf.guidance.cads(net, y, jax.random.key(2), psi=psi, **kw)(x, t)
        np.testing.assert_allclose(got, psi * full + (1 - psi) * raw, rtol=1e-5, atol=1e-5, err_msg=str(psi))


@pytest.mark.parametrize("kind", ["x0", "v", "velocity"])
def test_classifier_guidance_from_pure_noise_is_the_conditional_model(kind):
    """At alpha = 0 (t = 1 on the linear path) grad log p(y | x_t) = 0 but the x0 / v / velocity
    coefficient is 1 / alpha: the guided prediction is the limit t -> 1, i.e. with the exact
    classifier the component's model (E[x0 | x_1, y] = mu_y, not the mixture mean), so that it is
    continuous in t and the first step of a sampler from t = 1 is guided."""
    lin = gf.paths.linear()
    mix = gf.oracles.GaussianMixture(jnp.zeros(2), jnp.array([[2.0, -2.0], [-2.0, 2.0]]),
                                     jnp.array([[0.3, 0.5], [0.2, 0.8]]))
    comp = gf.oracles.Gaussian.diagonal(mix.means[0], mix.vars[0])

    def logits(x, t):
        return mix._resp(x, t, lin)[0]

    x = jax.random.normal(jax.random.key(0), (3, 2))
    for scale in (1.0, jnp.array([1.0, 2.0, 0.5])):
        g = gf.guidance.classifier(mix.model(lin, kind), lin, kind, logits, 0, scale)
        near, at = g(x, jnp.full((3,), 1.0 - 1e-4)), g(x, jnp.ones(3))
        np.testing.assert_allclose(at, near, atol=2e-3)  # continuous at t = 1
    g = gf.guidance.classifier(mix.model(lin, kind), lin, kind, logits, 0, 1.0)
    np.testing.assert_allclose(g(x, jnp.ones(3)), comp.model(lin, kind)(x, jnp.ones(3)), rtol=1e-5, atol=1e-5)
    # a batch that mixes t = 1 with other times
    t = jnp.array([1.0, 0.5, 1.0])
    np.testing.assert_allclose(g(x, t), comp.model(lin, kind)(x, t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_adaptive_guidance_similarity_in_low_precision(dtype):
    """The stopping test of adaptive guidance is made on the exact cosine similarity of the
    low-precision predictions: in bfloat16 a similarity of 0.9985 rounded to 1 (guidance stopped
    under a threshold of 0.9995), and in float16 the squared norm of 70,000 unit entries
    overflowed to inf (NaN similarity: guidance never stopped)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    c = jax.random.normal(k1, (2, 4096))
    u = (c + 0.055 * jax.random.normal(k2, (2, 4096))).astype(dtype)
    c = c.astype(dtype)
    c64, u64 = np.asarray(c, np.float64), np.asarray(u, np.float64)
    true = (c64 * u64).sum(-1) / np.linalg.norm(c64, axis=-1) / np.linalg.norm(u64, axis=-1)
    assert np.all(true < 0.9995)
    a = gf.guidance.adaptive(gf.guidance.cfg(lambda x, t: c, lambda x, t: u, 3.0), 0.9995)
    np.testing.assert_allclose(np.asarray(a.similarity(c, u), np.float64), true, rtol=0, atol=1e-5)
    out = a(c, jnp.full((2,), 0.5))  # still guided: 3 c - 2 u, not c
    np.testing.assert_allclose(np.asarray(out, np.float32), 3 * c64 - 2 * u64, atol=0.05)
    big = jnp.ones((1, 70_000), dtype)
    assert float(a.similarity(big, big)[0]) == pytest.approx(1.0, abs=1e-6)


def test_interval_of_batched_cfg_takes_a_scalar_t():
    """BatchedCFG broadcasts a scalar t to [B] for its doubled batch; the conditional-only branch
    that interval selects outside (t_lo, t_hi] passed the scalar on, and a network that embeds t
    per sample failed with "'float' object is not subscriptable" (both branches are traced)."""
    def net(x, t, c):
        return x * t[:, None] + c[:, None].astype(x.dtype)

    x = jnp.ones((3, 2))
    g = gf.guidance.cfg_batched(net, 1, 0, 2.0)
    iv = gf.guidance.interval(g, 0.2, 0.8)
    np.testing.assert_allclose(iv(x, 0.5), g(x, jnp.full((3,), 0.5)), rtol=1e-6)
    np.testing.assert_allclose(iv(x, 0.9), net(x, jnp.full((3,), 0.9), jnp.ones(3)), rtol=1e-6)


@pytest.mark.parametrize("kind", ["x0", "v", "velocity"])
def test_classifier_guidance_at_pure_noise_has_finite_gradients(kind):
    """The guided prediction is affine in the scale: at t = 1 on the linear path (alpha = 0), with
    the exact classifier, d guided / d scale = component model - mixture model. The unselected
    coef * grad = inf * 0 branch made this gradient (and the classifier parameters') NaN."""
    lin = gf.paths.linear()
    mix = gf.oracles.GaussianMixture(jnp.zeros(2), jnp.array([[2.0, -1.0], [-2.0, 2.0]]),
                                     jnp.array([[0.3, 0.5], [0.2, 0.8]]))
    comp = gf.oracles.Gaussian.diagonal(mix.means[0], mix.vars[0])
    x = jax.random.normal(jax.random.key(0), (3, 2))
    wts = jnp.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.3]])
    t = jnp.ones(3)

    def f(scale, means):
        m = gf.oracles.GaussianMixture(mix.logits, means, mix.vars)  # the classifier's parameters
        g = gf.guidance.classifier(mix.model(lin, kind), lin, kind, lambda z, tt: m._resp(z, tt, lin)[0], 0, scale)
        return jnp.sum(wts * g(x, t))

    ds, dm = jax.grad(f, argnums=(0, 1))(1.0, mix.means)
    want = jnp.sum(wts * (comp.model(lin, kind)(x, t) - mix.model(lin, kind)(x, t)))
    np.testing.assert_allclose(float(ds), float(want), rtol=1e-4)
    assert bool(jnp.all(jnp.isfinite(dm)))


@pytest.mark.parametrize("kind", ["x0", "v", "velocity"])
def test_classifier_guidance_from_pure_noise_on_a_path_with_flat_alpha_at_noise(kind):
    """alpha = cos(pi t / 2)^2 (paths.py's power_cosine example, k = 2) has alpha(1) = alpha'(1) = 0:
    grad' / alpha' is 0 / 0 there, and the guided model at t = 1 was silently the unguided one
    (x0: 0 where E[x0 | y] = mu_y). Its limit t -> 1 is grad'' / alpha''."""
    def _alpha(t, k):
        return jnp.sin(0.5 * jnp.pi * (1 - t)) ** k

    def _sigma(t, k):
        return jnp.sin(0.5 * jnp.pi * t)

    path = gf.paths.Path(alpha_fn=_alpha, sigma_fn=_sigma, params=dict(k=2.0), name="power_cosine")
    mix = gf.oracles.GaussianMixture(jnp.zeros(2), jnp.array([[2.0, -2.0], [-2.0, 2.0]]),
                                     jnp.array([[0.3, 0.5], [0.2, 0.8]]))
    comp = gf.oracles.Gaussian.diagonal(mix.means[0], mix.vars[0])
    x = jax.random.normal(jax.random.key(0), (3, 2))
    g = gf.guidance.classifier(mix.model(path, kind), path, kind, lambda z, t: mix._resp(z, t, path)[0], 0, 1.0)
    t = jnp.array([1.0, 0.5, 1.0])
    np.testing.assert_allclose(g(x, t), comp.model(path, kind)(x, t), rtol=1e-4, atol=1e-4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _RescaledCFG(gf.guidance.CFG):
    """Rescaled CFG (Lin et al. 2024): the guided prediction rescaled to the per-sample std of the
    conditional one, mixed by phi; a user's guidance formula, written as the CFG docstring says."""

    phi: float = 0.7

    def combine(self, c, u, w):
        g = super().combine(c, u, w)
        r = g * jnp.std(c, axis=-1, keepdims=True) / jnp.std(g, axis=-1, keepdims=True)
        return self.phi * r + (1 - self.phi) * g


def test_a_new_guidance_formula_is_applied_by_interval_and_adaptive():
    """interval and adaptive rebuilt the plain CFG formula from parts(): a subclass's own formula
    was silently dropped once wrapped (extension review helper's finding)."""
    base = gf.guidance.cfg(COND.model(PATH, "eps"), UNCOND.model(PATH, "eps"), 3.0)
    resc = _RescaledCFG(base.cond, base.uncond, base.scale)
    x, t = _xt()
    c, u = resc.parts(x, t)
    g = np.asarray(u + 3.0 * (c - u))
    want = 0.7 * g * np.std(np.asarray(c), -1, keepdims=True) / np.std(g, -1, keepdims=True) + 0.3 * g
    np.testing.assert_allclose(resc(x, t), want, rtol=1e-5)
    assert np.max(np.abs(want - g)) > 0.1  # (the formula matters here)
    np.testing.assert_allclose(gf.guidance.interval(resc, 0.0, 1.0)(x, t), want, rtol=1e-5)
    np.testing.assert_allclose(gf.guidance.interval(resc, 0.0, 0.5)(x, t), c, rtol=1e-5, atol=1e-7)  # outside: cond
    np.testing.assert_allclose(gf.guidance.adaptive(resc, 1.0 - 1e-7)(x, t), want, rtol=1e-5)
    x1 = jax.random.normal(jax.random.key(0), (64, 2))  # and through a sampler, as a pytree
    a, _ = gf.sample(gf.guidance.interval(resc, 0.0, 1.0), PATH, x1, prediction="eps", solver="dpm++2m", steps=8)
    b, _ = gf.sample(resc, PATH, x1, prediction="eps", solver="dpm++2m", steps=8)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class OnlyCall(gf.guidance.CFG):  # the formula in __call__: interval could not apply it
        def __call__(self, x, t):
            return 2.0 * super().__call__(x, t)

    for wrap in (gf.guidance.interval, gf.guidance.adaptive):
        with pytest.raises(TypeError, match="overrides __call__ but not combine"):
            wrap(OnlyCall(base.cond, base.uncond, base.scale), *((0.2, 0.8) if wrap is gf.guidance.interval else ()))


# -- from the seventh mutation audit (guidance; each test fails on its mutant) --
CG_MEANS = jnp.array([[1.5, -0.5], [-0.5, 0.5]])
CG_VARS = jnp.array([[0.4, 0.3], [0.4, 0.3]])


@pytest.mark.parametrize("kind", list(gf.param.KINDS))
def test_classifier_guidance_with_the_exact_classifier_in_every_kind(kind):
    """Bayes: score(x_t) + grad log p(y | x_t) = score(x_t | y), so with scale 1 and the exact
    classifier the guided mixture model equals the component's model, in every prediction kind
    (the suite checks eps / v / velocity at interior t, x0 and score only at the ends)."""
    mix = gf.oracles.GaussianMixture(jnp.zeros(2), CG_MEANS, CG_VARS)
    comp = gf.oracles.Gaussian.diagonal(CG_MEANS[0], CG_VARS[0])
    x = jax.random.normal(jax.random.key(0), (16, 2))
    t = jnp.linspace(0.1, 0.9, 16)
    g = gf.guidance.classifier(mix.model(PATH, kind), PATH, kind, lambda z, tt: mix._resp(z, tt, PATH)[0], 0, 1.0)
    np.testing.assert_allclose(g(x, t), comp.model(PATH, kind)(x, t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine", "linear", "edm"])
def test_classifier_guidance_at_the_data_end_is_the_conditional_model(name):
    """At t = 0 a velocity model's guidance term is -g^2 / 2 grad log p(y | x), not 0: on
    vp_linear g^2(0) = beta_min, and the term was dropped wherever sigma = 0 (a jump of 0.2 at
    t = 0 against t = 1e-6, which heun's last evaluation used). Every kind at t = 0, 1e-6 and 0.5
    on each path equals the component's model, and gradients in the scale stay finite there."""
    path = gf.paths.get(name)
    mix = gf.oracles.GaussianMixture(jnp.zeros(2), CG_MEANS, CG_VARS)
    comp = gf.oracles.Gaussian.diagonal(CG_MEANS[0], CG_VARS[0])
    x = jax.random.normal(jax.random.key(0), (4, 2))
    logits = lambda z, tt: mix._resp(z, tt, path)[0]  # noqa: E731
    for kind in gf.param.KINDS:
        # (one compiled program per kind for every t and the gradient: called eagerly, each call
        # compiled the guidance's lax.cond anew, 15 programs per path)
        guided = jax.jit(lambda tb, w: gf.guidance.classifier(mix.model(path, kind), path, kind, logits, 0, w)(x, tb))
        for t in (0.0, 1e-6, 0.5):
            tb = jnp.full((4,), t)
            np.testing.assert_allclose(guided(tb, 1.0), comp.model(path, kind)(x, tb), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{name} {kind} t={t}")
        grad = jax.grad(lambda w: jnp.sum(guided(jnp.zeros(4), w)))(1.0)
        assert np.isfinite(float(grad)), (name, kind)


def test_cfg_of_low_precision_models_is_rounded_once():
    """cfg of bfloat16 / float16 models rounded the scale to the models' dtype (1.1 -> 1.1016)
    and cancelled in w c + (1 - w) u: 1.7e-2 of the result's rms at w = 7.5 in bfloat16, where one
    rounding of the result is ~2e-3. Now within ~one rounding (exact: u + w (c - u) in float64)."""
    c = 3.0 * jax.random.normal(jax.random.key(0), (256, 64))
    u = c + 0.05 * jax.random.normal(jax.random.key(1), (256, 64))
    for dt, tol in ((jnp.bfloat16, 4e-3), (jnp.float16, 5e-4), (jnp.float32, 1e-6)):
        cd, ud = c.astype(dt), u.astype(dt)
        for w in (1.1, 3.0, 7.5):
            got = gf.guidance.cfg(lambda x, t: cd, lambda x, t: ud, w)(cd, jnp.full((256,), 0.5))
            assert got.dtype == dt
            c64, u64 = np.asarray(cd, np.float64), np.asarray(ud, np.float64)
            exact = u64 + w * (c64 - u64)
            err = np.sqrt(np.mean((np.asarray(got, np.float64) - exact) ** 2)) / np.sqrt(np.mean(exact ** 2))
            assert err < tol, (dt, w, err)
    # exact at both ends, and differentiable in the scale everywhere (a select of c at w == 1 made
    # jax.grad in w 0 there, where it is sum(c - u))
    c2, u2 = jnp.array([[1.0, 2.0]]), jnp.array([[0.5, 1.0]])
    g = lambda w: gf.guidance.cfg(lambda x, t: c2, lambda x, t: u2, w)(c2, jnp.full((1,), 0.5))  # noqa: E731
    np.testing.assert_array_equal(g(1.0), c2)
    np.testing.assert_array_equal(g(0.0), u2)
    for w in (0.0, 0.5, 0.999, 1.0, 7.5, jnp.ones(1)):
        np.testing.assert_allclose(jax.grad(lambda w: jnp.sum(g(w)))(w), 1.5 * np.ones(np.shape(w)), rtol=1e-6)


def test_cads_default_annealing_interval_is_the_papers():
    """Documented defaults tau1 = 0.6, tau2 = 0.9: y_hat = y for t <= 0.6 (gamma = 1) and, without
    rescaling, y_hat carries no y for t >= 0.9 (gamma = 0); in between it does."""
    y = jax.random.normal(jax.random.key(1), (4, 8)) + 2.0
    net = lambda x, t, c: c  # noqa: E731
    x = jnp.zeros((4, 8))
    cond = lambda yy, t, **kw: gf.guidance.cads(net, yy, jax.random.key(2), **kw)(x, jnp.full((4,), t))  # noqa: E731
    np.testing.assert_allclose(cond(y, 0.6), y, rtol=1e-6)
    assert not np.allclose(cond(y, 0.62), y, rtol=1e-3)
    for t in (0.9, 0.95):  # gamma = 0: the condition is noise alone, the same for any y
        np.testing.assert_allclose(cond(y, t, rescale=False), cond(y + 1.0, t, rescale=False), atol=1e-6)
    assert not np.allclose(cond(y, 0.88, rescale=False), cond(y + 1.0, 0.88, rescale=False), atol=1e-3)


def test_cads_draws_fresh_noise_for_every_time():
    """Documented: fresh noise n for every distinct time. Recover n from y_hat = sqrt(g) y +
    s sqrt(1 - g) n at two times (rescale=False): each is standard normal, and they are
    uncorrelated (a noise fixed per row for all t -- one draw for the whole trajectory -- is not
    what CADS anneals)."""
    y = jax.random.normal(jax.random.key(1), (16, 64))
    net = lambda x, t, c: c  # noqa: E731
    s, tau1, tau2 = 0.5, 0.2, 0.8
    c = gf.guidance.cads(net, y, jax.random.key(2), tau1, tau2, noise_scale=s, rescale=False)
    x = jnp.zeros((16, 64))
    ns = []
    for t in (0.5, 0.65):
        g = (tau2 - t) / (tau2 - tau1)
        ns.append(np.asarray((c(x, jnp.full((16,), t)) - np.sqrt(g) * y) / (s * np.sqrt(1 - g))))
    for n in ns:
        assert 0.9 < n.std() < 1.1 and abs(n.mean()) < 0.1
    assert abs(np.corrcoef(ns[0].ravel(), ns[1].ravel())[0, 1]) < 0.1


def test_adaptive_guides_at_a_similarity_equal_to_the_threshold():
    """Documented: ``guided`` while cos(cond, uncond) <= threshold, cond once above. Orthogonal
    predictions (cos = 0 exactly) with threshold 0 are guided."""
    c = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    u = jnp.array([[0.0, 3.0], [1.0, 0.0]])
    a = gf.guidance.adaptive(gf.guidance.cfg(lambda x, t: c, lambda x, t: u, 2.0), 0.0)
    np.testing.assert_array_equal(a.similarity(c, u), [0.0, 0.0])
    np.testing.assert_allclose(a(c, jnp.full((2,), 0.5)), 2.0 * c - u, rtol=1e-6)


def _alpha_lin(t, c):
    return 1.0 - t


def _sigma_scaled(t, c):
    return c * t


@pytest.mark.parametrize("kind", ["x0", "v", "velocity"])
def test_classifier_guidance_at_pure_noise_where_sigma_is_not_one(kind):
    """The limit at alpha = 0 (l'Hopital) carries sigma's powers: x0 sigma^2, v -sigma^3, velocity
    sigma^2 alpha'. On the built-in paths sigma = 1 there, which hides a wrong power; here
    x_t = (1 - t) x0 + 2 t eps (sigma(1) = 2): the guided model at t = 1 is the component's."""
    path = gf.paths.Path(alpha_fn=_alpha_lin, sigma_fn=_sigma_scaled, params=dict(c=2.0), name="linear_sigma2")
    mix = gf.oracles.GaussianMixture(jnp.zeros(2), jnp.array([[2.0, -2.0], [-2.0, 2.0]]),
                                     jnp.array([[0.3, 0.5], [0.2, 0.8]]))
    comp = gf.oracles.Gaussian.diagonal(mix.means[0], mix.vars[0])
    x = 2.0 * jax.random.normal(jax.random.key(0), (3, 2))
    g = gf.guidance.classifier(mix.model(path, kind), path, kind, lambda z, t: mix._resp(z, t, path)[0], 0, 1.0)
    t = jnp.array([1.0, 0.5, 1.0])
    np.testing.assert_allclose(g(x, t), comp.model(path, kind)(x, t), rtol=1e-4, atol=1e-4)
    near = jnp.full((3,), 1.0 - 1e-3)
    np.testing.assert_allclose(g(x, jnp.ones(3)), g(x, near), atol=2e-2)  # continuous at t = 1


def test_classifier_guidance_of_a_score_model_at_the_data_end():
    """Documented: where sigma = 0 the guidance term is 0 for every kind *but the score*: there
    score + grad log p(y | x_0) = score of the component (Bayes at t = 0)."""
    mix = gf.oracles.GaussianMixture(jnp.zeros(2), CG_MEANS, CG_VARS)
    comp = gf.oracles.Gaussian.diagonal(CG_MEANS[0], CG_VARS[0])
    x = jax.random.normal(jax.random.key(0), (8, 2))
    t = jnp.zeros(8)
    assert float(PATH.sigma(jnp.float32(0.0))) == 0.0
    g = gf.guidance.classifier(mix.model(PATH, "score"), PATH, "score", lambda z, tt: mix._resp(z, tt, PATH)[0], 0, 1.0)
    np.testing.assert_allclose(g(x, t), comp.model(PATH, "score")(x, t), rtol=1e-4, atol=1e-4)


def test_interval_keeps_its_closed_end_under_x64_and_cfg_batched_names_a_bad_null():
    """interval() stored its bounds in float32: under jax_enable_x64 a float64 grid time of
    exactly t_hi = 0.7 compared against float32(0.7) = 0.69999998 and was not guided (the
    documented interval is (t_lo, t_hi]); cfg_batched's null of the wrong shape failed in JAX's
    broadcast without naming it; a complex scale failed in float()."""
    g = gf.guidance.cfg(COND.model(PATH, "eps"), UNCOND.model(PATH, "eps"), 3.0)
    iv = gf.guidance.interval(g, 0.3, 0.7)
    for x64 in (False, True):
        with jax.enable_x64(x64):
            dt = jnp.float64 if x64 else jnp.float32
            x = jnp.ones((2, 2), dt)
            for t, inside in ((0.7, True), (0.3, False), (0.5, True), (0.71, False)):
                tt = jnp.full((2,), t, dt)
                want = g(x, tt) if inside else COND.model(PATH, "eps")(x, tt)
                np.testing.assert_allclose(iv(x, tt), want, rtol=1e-6, err_msg=f"x64={x64} t={t}")
                jitted = jax.jit(lambda f, x, t: f(x, t))(iv, x, tt)  # (the bounds as traced leaves)
                np.testing.assert_allclose(jitted, want, rtol=1e-6, err_msg=f"x64={x64} t={t} jit")
    fn = lambda x, t, y: x * (1.0 + y[:, None])  # noqa: E731
    bad = gf.guidance.cfg_batched(fn, jnp.ones((4,), jnp.int32), jnp.zeros(3, jnp.int32), 2.0)
    with pytest.raises(ValueError, match=r"cfg_batched: null of shape \(3,\) must broadcast to the labels' shape"):
        bad(jnp.ones((4, 2)), jnp.full((4,), 0.5))
    with pytest.raises(TypeError, match="scale must be a real number"):
        gf.guidance.cfg(COND.model(PATH, "eps"), UNCOND.model(PATH, "eps"), 1 + 2j)


def test_cfg_batched_refuses_a_null_that_is_no_label_of_its_dtype_and_t_of_the_wrong_shape_is_named():
    """cfg_batched cast null to the labels' dtype unchecked: 256 with uint8 labels ran the
    unconditional half on class 0, -1 on class 255 and 10.7 on class 10 (drop_labels refused the
    same values); a [B, 1] t failed in JAX's broadcasting in cfg_batched and cads, and interval
    blamed the guidance scale (shapes audit)."""
    seen = []

    def net(x, t, c):
        jax.debug.callback(lambda c: seen.append(np.asarray(c).tolist()), c)
        return x

    x, t = jnp.zeros((3, 2)), jnp.full((3,), 0.5)
    for y, null, msg in ((jnp.array([1, 2, 3], jnp.uint8), 256, r"null=256 is out of range for labels y of dtype uint8"),
                         (jnp.array([1, 2, 3], jnp.uint8), -1, r"null=-1 is out of range"),
                         (jnp.array([1, 2, 3], jnp.int32), 10.7, r"null must be an integer for integer labels y")):
        with pytest.raises(ValueError, match="cfg_batched: " + msg):
            gf.guidance.cfg_batched(net, y, null, 2.0)
    gf.guidance.cfg_batched(net, jnp.array([1, 2, 3], jnp.uint8), 255, 2.0)(x, t).block_until_ready()
    assert seen == [[1, 2, 3, 255, 255, 255]]
    t2 = jnp.array([[0.2], [0.5], [0.8]])
    guided = [("interval", gf.guidance.interval(gf.guidance.cfg(lambda x, t: x, lambda x, t: x, 3.0), 0.3, 0.9)),
              ("cads", gf.guidance.cads(lambda x, t, y: x, jnp.ones((3, 2)) * jnp.arange(2.0), jax.random.key(0))),
              ("cfg_batched", gf.guidance.cfg_batched(lambda x, t, y: x, jnp.arange(3), 5, 2.0))]
    for name, g in guided:
        with pytest.raises(ValueError, match=rf"{name}: t must be a scalar or have shape \[1\] or \[B\] = \[3\]; "
                                             rf"got shape \(3, 1\)"):
            g(jnp.ones((3, 4)), t2)
    for name, g in guided[1:]:  # ([1]: one time for all, as before; review)
        np.testing.assert_allclose(g(jnp.ones((3, 4)), jnp.array([0.5])), g(jnp.ones((3, 4)), jnp.full((3,), 0.5)))


def test_cads_rescales_a_float16_condition_with_a_constant_row_without_nan():
    """CADS's rescaling floored the noised condition's std at 1e-12, which is 0 in float16: a
    constant row (an all-zero null embedding) became 0/0 = NaN for t <= tau1 (shapes audit). The
    statistics are taken in float32: float16 now matches float32 to float16 rounding."""
    y = jax.random.normal(jax.random.key(0), (3, 8)).at[2].set(0.0)
    t = jnp.full((3,), 0.3)  # (t <= tau1: gamma = 1, the condition itself after the rescaling)
    ref = gf.guidance.cads(lambda x, t, c: x, y, jax.random.key(1)).condition(t)
    for dt in (jnp.float16, jnp.bfloat16):
        c = gf.guidance.cads(lambda x, t, c: x, y.astype(dt), jax.random.key(1)).condition(t)
        assert c.dtype == dt
        np.testing.assert_allclose(np.asarray(c, np.float32), ref, atol=2e-2 if dt == jnp.bfloat16 else 5e-3)
    np.testing.assert_array_equal(np.asarray(ref[2]), 0.0)


def test_guidance_array_scales_keep_their_float64_and_bfloat16_dtypes():
    """An array guidance scale keeps its own floating dtype (real_leaf: "an array in its own
    floating dtype"): a float64 [B] scale under x64 gives the float64 formula to 1e-14 (a float32
    cast was ~1e-7 off at 1.1), a bfloat16 one keeps a bfloat16 model's output bfloat16."""
    with jax.enable_x64(True):
        gc = gf.oracles.Gaussian.diagonal(np.array([1.0, -1.0]), np.array([0.5, 0.2]))
        gu = gf.oracles.Gaussian.diagonal(np.array([0.0, 0.5]), np.array([1.0, 0.7]))
        path = gf.paths.linear()
        c, u = gc.model(path, "eps"), gu.model(path, "eps")
        x = jax.random.normal(jax.random.key(0), (3, 2), jnp.float64)
        t = jnp.full((3,), 0.4, jnp.float64)
        w = jnp.array([1.1, 1.3, 2.7], jnp.float64)
        exact = u(x, t) + w[:, None] * (c(x, t) - u(x, t))
        out = gf.guidance.cfg(c, u, w)(x, t)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, exact, rtol=0, atol=1e-14)
    f = lambda x, t: 2 * x  # noqa: E731
    h = lambda x, t: x  # noqa: E731
    xb = jnp.ones((2, 2), jnp.bfloat16)
    out = gf.guidance.cfg(f, h, jnp.array([1.5, 2.0], jnp.bfloat16))(xb, jnp.full((2,), 0.5))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), [[2.5, 2.5], [3.0, 3.0]])


def test_cads_default_noise_scale_is_a_quarter():
    """cads' default noise_scale s = 0.25 (its signature): without rescaling, at gamma = 0
    (t >= tau2) the condition is s * n alone, of std 0.25."""
    net = lambda x, t, c: c  # noqa: E731  reads the condition it is given
    y = jax.random.normal(jax.random.key(1), (64, 256))
    out = gf.guidance.cads(net, y, jax.random.key(2), rescale=False)(jnp.zeros((64, 256)), jnp.full((64,), 1.0))
    assert abs(float(out.std()) - 0.25) < 0.01, float(out.std())


def test_adaptive_default_threshold_is_0_99():
    """adaptive's default threshold 0.99: predictions at cosine 0.995 are not guided (the
    conditional one is returned), at cosine 0.985 they are (u + w (c - u))."""
    x = jnp.zeros((1, 2))
    t = jnp.array([0.5])
    c = jnp.array([[1.0, 0.0]])
    for cos, guided in ((0.995, False), (0.985, True)):
        u = jnp.array([[cos, np.sqrt(1.0 - cos ** 2)]], jnp.float32)
        g = gf.guidance.cfg(lambda x, t: jnp.broadcast_to(c, x.shape), lambda x, t, u=u: jnp.broadcast_to(u, x.shape), 3.0)
        out = gf.guidance.adaptive(g)(x, t)
        want = u + 3.0 * (c - u) if guided else c
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_cfg_of_bfloat16_models_does_not_round_the_scale():
    """A bfloat16 model's cfg is u + w (c - u) computed in float32 and rounded once: with a
    scale that bfloat16 cannot hold (1.1 -> 1.1016, 2.3 -> 2.2969) and c - u of order 3, the
    result is the exact value rounded to bfloat16 (a scale rounded to the models' dtype first
    changed ~30% of the entries by one bfloat16 step)."""
    c = (3.0 * jax.random.normal(jax.random.key(0), (256, 64))).astype(jnp.bfloat16)
    u = (0.5 * jax.random.normal(jax.random.key(1), (256, 64))).astype(jnp.bfloat16)
    c64, u64 = np.asarray(c, np.float64), np.asarray(u, np.float64)
    for w in (1.1, 2.3):
        got = gf.guidance.cfg(lambda x, t: c, lambda x, t: u, w)(c, jnp.full((256,), 0.5))
        assert got.dtype == jnp.bfloat16
        exact = np.asarray(jnp.asarray(u64 + w * (c64 - u64), jnp.float32).astype(jnp.bfloat16), np.float32)
        assert np.mean(np.asarray(got, np.float32) != exact) < 0.01
