"""Every conversion on every path against the Gaussian oracle, whose denoiser, score and
probability-flow velocity are computed independently of genflow.param."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf
from conftest import ALL_PATHS, count_compiles

KINDS = gf.param.KINDS


def _truth(g, x, t, path):
    """Independent oracle values of every kind at (x, t)."""
    x0 = g.x0(x, t, path)
    score = g.score(x, t, path)
    tb = t[:, None]
    a, s = path.alpha(tb), path.sigma(tb)
    eps = -s * score
    # velocity: the time derivative of the exact flow map at t (autodiff through flow_map)
    vel = jax.jvp(lambda tt: g.flow_map(x, t, tt, path), (t,), (jnp.ones_like(t),))[1]
    return {"x0": x0, "eps": eps, "v": a * eps - s * x0, "score": score, "velocity": vel}


@pytest.mark.parametrize("name", sorted(ALL_PATHS))
def test_all_pairs_against_oracle(name, gauss2):
    path = ALL_PATHS[name]
    with jax.enable_x64(True):
        g = gf.oracles.Gaussian.full(jnp.asarray(gauss2.mean, jnp.float64), jnp.asarray(gauss2.cov, jnp.float64))
        t = jnp.asarray(np.linspace(0.05, 0.95, 16), jnp.float64)
        x = jax.vmap(lambda k, tt: g.prior_sample(k, 1, path, tt)[0])(jax.random.split(jax.random.key(2), 16), t)
        truth = _truth(g, x, t, path)
        # the velocity from the flow map agrees with alpha' x0 + sigma' eps (flow-Tweedie)
        da, ds = path.d_alpha(t)[:, None], path.d_sigma(t)[:, None]
        np.testing.assert_allclose(truth["velocity"], da * truth["x0"] + ds * truth["eps"], rtol=1e-8, atol=1e-8)
        for src, dst in itertools.product(KINDS, KINDS):
            out = gf.param.convert(truth[src], x, t, path, src, dst)
            np.testing.assert_allclose(out, truth[dst], rtol=1e-7, atol=1e-7, err_msg=f"{src}->{dst} on {name}")
            back = gf.param.convert(out, x, t, path, dst, src)
            np.testing.assert_allclose(back, truth[src], rtol=1e-7, atol=1e-7, err_msg=f"round trip {src}->{dst}->{src}")


def test_eps_scale(gauss2):
    path = gf.paths.vp_cosine()
    t = jnp.linspace(0.1, 0.9, 8)
    x = jax.random.normal(jax.random.key(0), (8, 2))
    e1, e2 = jax.random.normal(jax.random.key(1), (2, 8, 2))
    for kind in KINDS:
        p1 = gf.param.convert(e1, x, t, path, "eps", kind)
        p2 = gf.param.convert(e2, x, t, path, "eps", kind)
        c = gf.param.eps_scale(path, t, kind)[:, None]
        np.testing.assert_allclose(p1 - p2, c * (e1 - e2), rtol=2e-4, atol=2e-5, err_msg=kind)


def test_convert_fn_and_errors(gauss2):
    path = gf.paths.linear()
    fn = gauss2.model(path, "eps")
    vfn = gf.param.convert_fn(fn, path, "eps", "velocity")
    x = jnp.ones((3, 2)); t = jnp.full((3,), 0.4)
    np.testing.assert_allclose(vfn(x, t), gauss2.model(path, "velocity")(x, t), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown src 'noise'"):
        gf.param.convert(x, x, t, path, "noise", "eps")
    with pytest.raises(ValueError, match="unknown prediction 'epsilon'"):
        gf.param.check_kind("epsilon")


def test_check_model_output():
    x = jnp.zeros((4, 2))
    assert gf.param.check_model_output(x + 1, x).shape == (4, 2)
    with pytest.raises(ValueError, match=r"returned shape \(4, 1\) for x of shape \(4, 2\)"):
        gf.param.check_model_output(jnp.zeros((4, 1)), x)
    for dtype in (jnp.int32, jnp.bool_, jnp.complex64):  # (an int32 prediction was used silently)
        with pytest.raises(TypeError, match=f"returned dtype {jnp.dtype(dtype).name}; it must return a floating"):
            gf.param.check_model_output(jnp.zeros((4, 2), dtype), x)
    for dtype in (jnp.bfloat16, jnp.float16):
        gf.param.check_model_output(jnp.zeros((4, 2), dtype), x)


def test_convert_and_eps_scale_refuse_t_outside_the_unit_interval():
    p = gf.paths.linear()
    x = jnp.ones((2, 2))
    for t in (1.5, -0.25, jnp.array([0.5, 1.5])):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
            gf.param.convert(x, x, t, p, "eps", "x0")
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
            gf.param.eps_scale(p, t, "x0")
    # still traceable (the check is a no-op under jit)
    out = jax.jit(lambda t: gf.param.convert(x, x, t, p, "eps", "x0"))(jnp.array([0.5, 0.25]))
    assert out.shape == (2, 2)


def test_conversions_name_a_prediction_of_another_shape():
    """A [3, 1] state against a [3, 2] prediction broadcast silently (to_x0_eps returned [3, 2])."""
    p = gf.paths.linear()
    x, pred = jnp.ones((3, 1)), jnp.ones((3, 2))
    with pytest.raises(ValueError, match=r"pred must have the shape of x \(3, 1\); got pred.shape=\(3, 2\)"):
        gf.param.to_x0_eps(pred, x, 0.5, p, "v")
    for dst in ("x0", "eps"):  # (also when the kinds agree)
        with pytest.raises(ValueError, match="pred must have the shape of x"):
            gf.param.convert(pred, x, 0.5, p, "eps", dst)
    with pytest.raises(ValueError, match="eps must have the shape of x"):
        gf.param.from_x0_eps(x, pred, x, 0.5, p, "v")


def test_converted_fn_is_a_pytree_that_jit_traces():
    """convert_fn(src != dst) returns a ConvertedFn: a pytree whose leaves are the wrapped function's
    bound arrays and the path parameters (so jit traces, not hashes, them: new values reuse one
    compilation and give the new result), and src == dst returns fn itself."""
    path = gf.paths.vp_linear()
    g = gf.oracles.Gaussian.diagonal(jnp.array([0.5, -1.0]), jnp.array([0.7, 1.3]))
    eps_fn = g.model(path, "eps")
    assert gf.param.convert_fn(eps_fn, path, "eps", "eps") is eps_fn
    conv = gf.param.convert_fn(eps_fn, path, "eps", "x0")
    assert isinstance(conv, gf.param.ConvertedFn) and (conv.src, conv.dst) == ("eps", "x0")
    x = jax.random.normal(jax.random.key(0), (4, 2))
    t = jnp.array([0.05, 0.3, 0.6, 0.95])
    np.testing.assert_allclose(conv(x, t), g.model(path, "x0")(x, t), rtol=1e-4, atol=1e-5)

    leaves = jax.tree_util.tree_leaves(conv)
    assert any(leaf is g.mean for leaf in leaves)  # the oracle's arrays are leaves, not static
    traces = []

    @jax.jit
    def call(f, x, t):
        traces.append(1)
        return f(x, t)

    np.testing.assert_allclose(call(conv, x, t), conv(x, t), rtol=1e-6)
    g2 = gf.oracles.Gaussian.diagonal(jnp.array([2.0, 3.0]), jnp.array([0.7, 1.3]))
    conv2 = gf.param.convert_fn(g2.model(path, "eps"), path, "eps", "x0")
    np.testing.assert_allclose(call(conv2, x, t), g2.model(path, "x0")(x, t), rtol=1e-4, atol=1e-5)
    assert len(traces) == 1  # a new oracle (same structure) did not recompile
    # round trip eps -> x0 -> eps is the identity on the model's output
    back = gf.param.convert_fn(conv, path, "x0", "eps")
    np.testing.assert_allclose(back(x, t), eps_fn(x, t), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        gf.param.convert_fn(eps_fn, path, "eps", "noise")


def test_velocity_to_x0_at_clean_data_divides_by_alpha_on_a_custom_path():
    """Where sigma = 0, x is alpha(t) x0 exactly, so a velocity model's x0 is x / alpha: the
    special case in to_x0_eps must divide by alpha (every built-in path has alpha = 1 there,
    so only a path of one's own can tell)."""
    def _alpha(t):
        return 2.0 * (1.0 - t)

    def _sigma(t):
        return t

    path = gf.paths.Path(alpha_fn=_alpha, sigma_fn=_sigma, name="scaled_linear")
    x0 = jnp.array([[0.5, -1.5], [2.0, 0.25]])
    t = jnp.zeros((2,))
    x = path.add_noise(x0, jnp.zeros_like(x0), t)  # = 2 x0
    u = path.d_alpha(t)[:, None] * x0 + path.d_sigma(t)[:, None] * jnp.ones_like(x0)  # any eps: sigma = 0
    out = gf.param.convert(u, x, t, path, "velocity", "x0")
    np.testing.assert_allclose(out, x0, rtol=1e-6)
    # and just off the end the general formula agrees (continuity)
    t1 = jnp.full((2,), 1e-4)
    eps = jnp.array([[0.3, -0.7], [1.1, 0.2]])
    x1 = path.add_noise(x0, eps, t1)
    u1 = path.d_alpha(t1)[:, None] * x0 + path.d_sigma(t1)[:, None] * eps
    np.testing.assert_allclose(gf.param.convert(u1, x1, t1, path, "velocity", "x0"), x0, rtol=1e-4, atol=1e-5)


# -- bfloat16 predictions: conversions computed in float32, rounded once -----------------------------
@pytest.mark.parametrize("t_kind", ["python", "bf16_array"])
@pytest.mark.parametrize("src,dst,pname,tval", [("velocity", "v", "vp_linear", 0.02),
                                                ("x0", "score", "edm", 0.97),
                                                ("v", "velocity", "vp_linear", 0.5)])
def test_convert_bfloat16_is_computed_in_float32(src, dst, pname, tval, t_kind):
    # a bfloat16 prediction with a Python-float (or bfloat16) t was converted entirely in bfloat16
    # (coefficients rounded to bfloat16, every product and sum rounded): 2.5-4.4x the error of one
    # rounding of the float32 result, and its dtype depended on whether t was an array
    path = gf.paths.get(pname)
    b = 2048
    x0 = jax.random.normal(jax.random.key(0), (b, 4)) + 1.0
    eps = jax.random.normal(jax.random.key(1), (b, 4))
    t = jnp.full((b,), tval, jnp.bfloat16)  # exactly representable below: same t both ways
    x = path.add_noise(x0, eps, t.astype(jnp.float32))
    pred = gf.param.from_x0_eps(x0, eps, x, t.astype(jnp.float32), path, src)
    pb, xb = pred.astype(jnp.bfloat16), x.astype(jnp.bfloat16)
    tt = float(t[0]) if t_kind == "python" else t
    out = gf.param.convert(pb, xb, tt, path, src, dst)
    assert out.dtype == jnp.bfloat16  # the promoted dtype of the inputs
    ref = gf.param.convert(pb.astype(jnp.float32), xb.astype(jnp.float32), t.astype(jnp.float32), path, src, dst)
    err = jnp.abs(out.astype(jnp.float32) - ref)
    # one rounding of the float32 result: at most half an ulp of bfloat16 (2^-8 relative)
    assert float(jnp.max(err / jnp.maximum(jnp.abs(ref), 1e-30))) <= 2.0 ** -8
    x0h, epsh = gf.param.to_x0_eps(pb, xb, tt, path, src)
    x0r, epsr = gf.param.to_x0_eps(pb.astype(jnp.float32), xb.astype(jnp.float32), t.astype(jnp.float32), path, src)
    assert x0h.dtype == epsh.dtype == jnp.bfloat16
    for h, r in ((x0h, x0r), (epsh, epsr)):
        assert float(jnp.max(jnp.abs(h.astype(jnp.float32) - r) / jnp.maximum(jnp.abs(r), 1e-30))) <= 2.0 ** -8


def test_convert_dtype_follows_promotion():
    path = gf.paths.vp_linear()
    pb = jnp.ones((3, 2), jnp.bfloat16)
    assert gf.param.convert(pb, pb, 0.5, path, "eps", "x0").dtype == jnp.bfloat16
    assert gf.param.convert(pb, pb, jnp.full((3,), 0.5, jnp.float32), path, "eps", "x0").dtype == jnp.float32
    assert gf.param.convert(pb, pb.astype(jnp.float32), 0.5, path, "eps", "x0").dtype == jnp.float32
    assert gf.param.from_x0_eps(pb, pb, pb, 0.5, path, "velocity").dtype == jnp.bfloat16


# -- from the eighth mutation audit (param; each test fails on its mutant) --
@pytest.mark.parametrize("name", sorted(ALL_PATHS))
def test_eps_scale_on_every_path(name):
    """eps_scale: pred - target = c(t) (eps_hat - eps) at fixed x_t, for every kind, on every path
    (the existing check uses vp_cosine only, where alpha^2 + sigma^2 = 1 hides an error in v's
    (alpha^2 + sigma^2) / alpha)."""
    path = gf.paths.get(name)
    with jax.enable_x64(True):
        t = jnp.asarray(np.linspace(0.1, 0.9, 8), jnp.float64)
        x = jax.random.normal(jax.random.key(0), (8, 2), jnp.float64)
        e1, e2 = jax.random.normal(jax.random.key(1), (2, 8, 2), jnp.float64)
        for kind in gf.param.KINDS:
            p1 = gf.param.convert(e1, x, t, path, "eps", kind)
            p2 = gf.param.convert(e2, x, t, path, "eps", kind)
            c = np.asarray(gf.param.eps_scale(path, t, kind))[:, None]
            np.testing.assert_allclose(p1 - p2, c * (e1 - e2), rtol=1e-8, atol=1e-10, err_msg=kind)


def test_velocity_to_x0_at_clean_data_has_finite_gradients_where_sigma_prime_is_infinite():
    """to_x0_eps(velocity) where sigma = 0: x0 = x / alpha ('safe operands keep NaN out of gradients
    too'). On vp_linear at t = 0 sigma' = inf: d x0 / d x must be the finite 1 / alpha, d x0 / d u = 0."""
    path = gf.paths.vp_linear()
    t = jnp.zeros((3,))
    x = jax.random.normal(jax.random.key(0), (3, 2))
    u = jax.random.normal(jax.random.key(1), (3, 2))
    assert not np.isfinite(float(path.d_sigma(jnp.zeros(())))) and float(path.sigma(jnp.zeros(()))) == 0.0
    a = float(path.alpha(jnp.zeros(())))
    f = lambda u, x: jnp.sum(gf.param.convert(u, x, t, path, "velocity", "x0"))  # noqa: E731
    np.testing.assert_allclose(gf.param.convert(u, x, t, path, "velocity", "x0"), x / a, rtol=1e-6)
    gu, gx = jax.grad(f, argnums=(0, 1))(u, x)
    np.testing.assert_allclose(gx, np.full((3, 2), 1.0 / a), rtol=1e-6)
    np.testing.assert_allclose(gu, 0.0, atol=0)


def test_conversions_name_a_path_given_by_name():
    """A path name failed as "'str' object has no attribute 'alpha'" (convert_fn accepted it and
    failed only when the converted function was called)."""
    x = jnp.ones((2, 2))
    calls = [lambda p: gf.param.convert(x, x, 0.5, p, "eps", "x0"), lambda p: gf.param.convert_fn(lambda x, t: x, p,
                                                                                                 "eps", "x0"),
             lambda p: gf.param.eps_scale(p, 0.5, "x0"), lambda p: gf.param.to_x0_eps(x, x, 0.5, p, "eps"),
             lambda p: gf.param.from_x0_eps(x, x, x, 0.5, p, "eps")]
    for call in calls:
        with pytest.raises(TypeError, match="path must be a genflow.paths.Path; got str"):
            call("linear")


def test_a_sigma_conditioned_denoiser_is_an_exact_x0_model_on_every_path():
    """k-diffusion / EDM denoisers take the noise level: D(z, sigma) = E[x0 | z = x0 + sigma eps].
    from_sigma_denoiser(D, path) is the x0 model x0_hat = D(x / alpha, sigma / alpha): with the
    closed-form D of a diagonal Gaussian it equals the oracle's x0 on every path, at per-sample
    and scalar t, and samples as the oracle does; it is a pytree (new arrays do not recompile)."""
    mean, var = jnp.array([1.0, -0.5, 0.3]), jnp.array([0.2, 1.0, 0.5])
    g = gf.oracles.Gaussian.diagonal(mean, var)

    def denoiser(z, sigma):
        return mean + var / (var + sigma[:, None] ** 2) * (z - mean)

    x = jax.random.normal(jax.random.key(0), (5, 3))
    t = jnp.linspace(0.05, 0.95, 5)
    for name, path in ALL_PATHS.items():
        fn = gf.param.from_sigma_denoiser(denoiser, path)
        np.testing.assert_allclose(fn(x, t), g.x0(x, t, path), atol=1e-6, err_msg=name)
        np.testing.assert_allclose(fn(x, 0.5), g.x0(x, 0.5, path), atol=1e-6, err_msg=name)
    path = gf.paths.vp_cosine()
    x1 = path.prior_sample(jax.random.key(1), (64, 3))
    fn = gf.param.from_sigma_denoiser(denoiser, path)
    a, _ = gf.sample(fn, path, x1, prediction="x0", solver="dpm++2m", steps=20)
    b, _ = gf.sample(g.model(path, "x0"), path, x1, prediction="x0", solver="dpm++2m", steps=20)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # a pytree: a denoiser bound to new arrays (a Partial) samples without recompiling
    def shifted(m, z, sigma):
        return denoiser(z - m, sigma) + m

    def run(m):
        fn = gf.param.from_sigma_denoiser(jax.tree_util.Partial(shifted, m), path)
        return gf.sample(fn, path, x1, prediction="x0", solver="dpm++2m", steps=20)[0]

    first = run(jnp.zeros(3))
    out = {}
    assert count_compiles(lambda: out.update(second=run(jnp.ones(3)))) == 0
    # the data mean moved by 1 (up to the alpha(1) = 5.5e-4 of it in the starting noise)
    np.testing.assert_allclose(out["second"] - first, 1.0, atol=2e-3)
    # a functools.partial (a network's apply and its parameters) too: inside the wrapper it was a
    # static leaf, compiled again on every call (review)
    def run_partial(m):
        fn = gf.param.from_sigma_denoiser(functools.partial(shifted, m), path)
        return gf.sample(fn, path, x1, prediction="x0", solver="dpm++2m", steps=20)[0]

    run_partial(jnp.zeros(3))
    assert count_compiles(lambda: run_partial(jnp.ones(3))) == 0
    # from t = 1 on the linear path (alpha = 0: an infinite noise level, floored), as the oracle
    lin = gf.paths.linear()
    x1 = lin.prior_sample(jax.random.key(2), (64, 3))
    a, info = gf.sample(gf.param.from_sigma_denoiser(denoiser, lin), lin, x1, prediction="x0", solver="dpm++2m", steps=20)
    b, _ = gf.sample(g.model(lin, "x0"), lin, x1, prediction="x0", solver="dpm++2m", steps=20)
    assert float(info.ts[0]) == 1.0
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(TypeError, match="denoiser must be a callable"):
        gf.param.from_sigma_denoiser("edm", path)
    with pytest.raises(ValueError, match=r"denoiser\(z, sigma\) returned shape \(5, 2\)"):
        gf.param.from_sigma_denoiser(lambda z, s: z[:, :2], path)(x, t)
    with pytest.raises(ValueError, match="t must lie in"):
        gf.param.from_sigma_denoiser(denoiser, path)(x, 1.5)


def test_convert_fn_traces_the_arrays_of_a_functools_partial():
    """A functools.partial inside ConvertedFn was a static leaf: its arrays compiled in, and a
    sampler called with new parameters compiled again (review)."""
    path = gf.paths.vp_cosine()
    x1 = path.prior_sample(jax.random.key(0), (8, 2))

    def eps_model(scale, x, t):
        return scale * x

    def run(scale):
        fn = gf.param.convert_fn(functools.partial(eps_model, scale), path, "eps", "x0")
        return gf.sample(fn, path, x1, prediction="x0", solver="dpm++2m", steps=4, t_start=0.99)[0]

    a = run(jnp.float32(0.5))
    out = {}
    assert count_compiles(lambda: out.update(b=run(jnp.float32(0.7)))) == 0
    assert not np.allclose(a, out["b"])


def test_sigma_denoiser_returns_the_promoted_dtype_of_x_and_its_output():
    # (Q4) a bfloat16 denoiser on a float32 state gives a float32 x0 model, as convert_fn does
    fn = gf.param.from_sigma_denoiser(lambda z, s: (0.5 * z).astype(jnp.bfloat16), gf.paths.edm())
    out = fn(jnp.ones((2, 3), jnp.float32), jnp.full((2,), 0.5))
    assert out.dtype == jnp.float32, out.dtype


def _sqrt_alpha(t):
    return jnp.sqrt(1.0 - t)


def _lin_sigma(t):
    return t


def test_singular_velocity_names_an_infinite_alpha_prime():
    """singular_velocity's docstring: an infinite alpha' *or* sigma' makes the velocity
    alpha' x0 + sigma' eps undefined; alpha = sqrt(1 - t) has alpha'(1) = -inf."""
    from genflow.param import singular_velocity
    p = gf.paths.Path(alpha_fn=_sqrt_alpha, sigma_fn=_lin_sigma, name="sqrt_alpha")
    assert singular_velocity(p, 1.0, "eps") is not None
    assert singular_velocity(p, 0.5, "eps") is None
    assert singular_velocity(p, 1.0, "velocity") is None
