import dataclasses

import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf
from conftest import ALL_PATHS, count_compiles

T = jnp.linspace(0.02, 0.98, 25)


def _autodiff_twin(path):
    """The same path with every closed form removed: derivatives by autodiff, log-SNR by
    definition, its inverse by bisection."""
    return dataclasses.replace(path, d_alpha_fn=None, d_sigma_fn=None, log_snr_fn=None, t_from_log_snr_fn=None,
                               diffusion_sq_fn=None)


# vp_cosine with a finite logsnr_max: with the default (infinite) one theta_0 = 0, and a sign error
# in alpha' (th1 + th0 for th1 - th0) could not show
NON_DEFAULT_PATHS = {"vp_cosine(-10, 10)": gf.paths.vp_cosine(logsnr_min=-10.0, logsnr_max=10.0)}


@pytest.mark.parametrize("name", sorted(ALL_PATHS) + sorted(NON_DEFAULT_PATHS))
def test_closed_forms_match_autodiff(name):
    p = {**ALL_PATHS, **NON_DEFAULT_PATHS}[name]
    q = _autodiff_twin(p)
    with jax.enable_x64(True):
        t = jnp.asarray(np.linspace(0.02, 0.98, 25), jnp.float64)
        for f in ("d_alpha", "d_sigma", "log_snr", "d_log_snr", "drift_coef", "diffusion_sq"):
            np.testing.assert_allclose(getattr(p, f)(t), getattr(q, f)(t), rtol=1e-9, atol=1e-10, err_msg=f)
        # d_log_snr against forward-mode autodiff of log_snr (the twin above runs the same
        # d_log_snr method, so it could not see a wrong formula there)
        jvp = jax.jvp(q.log_snr, (t,), (jnp.ones_like(t),))[1]
        np.testing.assert_allclose(p.d_log_snr(t), jvp, rtol=1e-9, err_msg="d_log_snr vs jvp of log_snr")
        lam = p.log_snr(t)
        np.testing.assert_allclose(p.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(q.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-9)
        # the bisection differentiates as the inverse function does: dt/dlam = 1 / lambda'(t)
        np.testing.assert_allclose(jax.vmap(jax.grad(q.t_from_log_snr))(lam), 1.0 / p.d_log_snr(t), rtol=1e-7)
        np.testing.assert_allclose(jax.jvp(q.t_from_log_snr, (lam,), (jnp.ones_like(lam),))[1], 1.0 / p.d_log_snr(t),
                                   rtol=1e-7)
        # ... and in the path's hyper-parameters, as the closed form does (the first version of this
        # derivative had only the lam part: a round trip t(log_snr(t)) had a nonzero derivative)
        for hp, v in p.params.items():
            if not np.isfinite(float(v)):
                continue

            def inverse_at(v, path, hp=hp):
                return dataclasses.replace(path, params={**path.params, hp: v}).t_from_log_snr(lam[7])

            np.testing.assert_allclose(jax.grad(inverse_at)(jnp.float64(v), q), jax.grad(inverse_at)(jnp.float64(v), p),
                                       rtol=1e-6, atol=1e-12, err_msg=hp)


@pytest.mark.parametrize("name", sorted(ALL_PATHS))
def test_log_snr_decreasing_and_endpoints(name):
    p = ALL_PATHS[name]
    lam = np.asarray(p.log_snr(T))
    assert np.all(np.diff(lam) < 0), "log-SNR must decrease from data to noise"
    # data end: alpha ~ 1, sigma small; noise end: SNR small
    assert float(p.snr(jnp.float32(p.t_min + 1e-3))) > 1e2
    assert float(p.snr(jnp.float32(1.0))) < 1e-3


def test_specific_values():
    lin = gf.paths.linear()
    np.testing.assert_allclose(lin.alpha(0.3), 0.7)
    np.testing.assert_allclose(lin.sigma(0.3), 0.3)
    vp = gf.paths.vp_linear()
    t = jnp.float32(0.5)
    # score_sde's VP SDE: log mean coeff = -t^2 (b1 - b0)/4 - t b0/2
    np.testing.assert_allclose(vp.alpha(t), np.exp(-0.25 * 0.25 * 19.9 - 0.25 * 0.1), rtol=1e-6)
    np.testing.assert_allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, 1.0, rtol=1e-6)
    cos = gf.paths.vp_cosine(logsnr_min=-15.0)
    np.testing.assert_allclose(cos.log_snr(jnp.float32(1.0)), -15.0, rtol=1e-5)
    np.testing.assert_allclose(cos.alpha(0.0), 1.0)
    edm = gf.paths.edm()
    np.testing.assert_allclose(edm.sigma(1.0), 80.0, rtol=1e-5)
    np.testing.assert_allclose(edm.sigma(0.0), 0.002, rtol=1e-5)
    # uniform t-steps reproduce Karras et al.'s rho schedule
    i, n = np.arange(10), 9
    karras = (80 ** (1 / 7) + i / n * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(edm.sigma(1.0 - i / n), karras, rtol=1e-4)
    ve = gf.paths.ve(0.01, 50.0)
    np.testing.assert_allclose(ve.sigma(0.5), 0.01 * (5000.0 ** 0.5), rtol=1e-5)


def test_vmap_and_jit_and_no_recompile():
    traces = []

    @jax.jit
    def f(path, t):
        traces.append(1)
        return path.alpha(t) * path.sigma(t)

    t = jnp.linspace(0.1, 0.9, 5)
    a = f(gf.paths.vp_linear(0.1, 20.0), t)
    b = f(gf.paths.vp_linear(0.2, 10.0), t)  # new hyper-parameters: traced, no retrace
    assert len(traces) == 1
    assert not np.allclose(a, b)
    v = jax.vmap(lambda s: gf.paths.vp_cosine().sigma(s))(t)
    np.testing.assert_allclose(v, gf.paths.vp_cosine().sigma(t), rtol=1e-6)


def test_custom_path_is_one_function():
    def alpha(t, k):
        return jnp.cos(0.5 * jnp.pi * t) ** k

    def sigma(t, k):
        return jnp.sin(0.5 * jnp.pi * t)

    p = gf.paths.Path(alpha_fn=alpha, sigma_fn=sigma, params=dict(k=2.0), name="cos2")
    t = jnp.float32(0.3)
    np.testing.assert_allclose(p.d_alpha(t), -2 * np.cos(0.15 * np.pi) * np.sin(0.15 * np.pi) * 0.5 * np.pi, rtol=1e-5)
    lam = p.log_snr(t)
    np.testing.assert_allclose(p.t_from_log_snr(lam), t, atol=1e-5)


def _doc_alpha(t, k):  # the module docstring's example path
    return jnp.sin(0.5 * jnp.pi * (1 - t)) ** k


def _doc_sigma(t, k):
    return jnp.sin(0.5 * jnp.pi * t)


def power_cosine(k=1.0):
    return gf.paths.Path(alpha_fn=_doc_alpha, sigma_fn=_doc_sigma, params=dict(k=k), name="power_cosine")


def test_docstring_example_path_has_exact_ends_and_samples():
    # the example used cos(pi t / 2): alpha(1) = -4.4e-8 in float32, a NaN log-SNR, broken
    # Karras grids (noise levels 2.3e7, 3.2e6, ...) and an eps model from t = 1 not refused
    p = power_cosine()
    assert float(p.alpha(1.0)) == 0.0 and float(p.sigma(0.0)) == 0.0 and float(p.log_snr(1.0)) == -np.inf
    ts = gf.sampling.time_grid(p, 6, "karras")
    levels = np.asarray(p.sigma(ts[1:-1]) / p.alpha(ts[1:-1]))
    np.testing.assert_allclose(levels[[0, -1]], [80.0, 0.002], rtol=1e-3)
    g = gf.oracles.Gaussian.full(jnp.array([0.7, -1.2]), jnp.array([[0.8, 0.3], [0.3, 0.5]]))
    x1 = g.prior_sample(jax.random.key(0), 256, p, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        gf.sample(g.model(p, "eps"), p, x1, prediction="eps", solver="dpm++2m", steps=10)
    ref = g.flow_map(x1, 1.0, 0.0, p)
    err = {}
    for n in (10, 40):  # (the old example's 40-step Karras grid raised)
        x, _ = gf.sample(g.model(p, "x0"), p, x1, prediction="x0", solver="unipc", steps=n, schedule="karras")
        err[n] = float(jnp.sqrt(jnp.mean((x - ref) ** 2)))
    # measured 0.166 and 2.6e-3 (vp_cosine: 0.150 and 1.25e-2)
    assert err[40] < 5e-3 and err[10] > 20 * err[40], err


def test_velocity_models_where_alpha_and_its_rate_vanish_at_the_start():
    """power_cosine(2) has alpha(1) = alpha'(1) = 0: the velocity -> x0 conversion the scan and SDE
    solvers make is 0/0 there, and every one of them returned NaN samples silently (extension review
    helper's finding). They are refused; the velocity ODE solvers, which need no conversion, sample."""
    p = power_cosine(2.0)
    g = gf.oracles.Gaussian.diagonal(jnp.array([1.0, -1.0]), jnp.array([0.5, 0.2]))
    x1 = g.prior_sample(jax.random.key(0), 256, p, 1.0)
    for solver in ("ddim", "dpm++2m", "unipc", "edm_heun"):
        with pytest.raises(ValueError, match=f"t_start=1.0 has alpha sigma' - sigma alpha' = 0 on path "
                                             f"'power_cosine', where solver '{re.escape(solver)}'"):
            gf.sample(g.model(p, "velocity"), p, x1, prediction="velocity", solver=solver, steps=10)
        x, _ = gf.sample(g.model(p, "velocity"), p, x1, prediction="velocity", solver=solver, steps=10, t_start=0.999)
        assert np.all(np.isfinite(np.asarray(x)))
    x, _ = gf.sample(g.model(p, "velocity"), p, x1, prediction="velocity", solver="heun", steps=20)
    np.testing.assert_allclose(np.asarray(x), np.asarray(g.flow_map(x1, 1.0, 0.0, p)), atol=2e-2)


def test_new_hyper_parameters_do_not_recompile_samplers_or_likelihoods():
    # gf.sample / gf.log_prob are eqx.filter_jit'ed, which keeps Python floats static: every new
    # beta_max (or k of a user's path) compiled anew (1-6 s each)
    g = gf.oracles.Gaussian.full(jnp.array([0.7, -1.2]), jnp.array([[0.8, 0.3], [0.3, 0.5]]))
    x1 = jnp.ones((4, 2))

    def compiles(make, run):
        return [count_compiles(lambda: run(make(v))) for v in (20.0, 19.0, 18.0)]

    sample = lambda p: gf.sample(g.model(p, "eps"), p, x1, prediction="eps", solver="dpm++2m", steps=8)  # noqa: E731
    assert compiles(lambda v: gf.paths.vp_linear(beta_max=v), sample)[1:] == [0, 0]
    assert compiles(lambda v: power_cosine(v / 10.0),
                    lambda p: gf.sample(g.model(p, "x0"), p, x1, prediction="x0", solver="unipc", steps=8))[1:] == [0, 0]
    log_prob = lambda p: gf.log_prob(g.model(p, "eps"), p, x1, prediction="eps")  # noqa: E731
    assert compiles(lambda v: gf.paths.vp_linear(beta_max=v), log_prob)[1:] == [0, 0]


def test_add_noise_and_prior():
    p = gf.paths.linear()
    x0 = jnp.ones((4, 3)); eps = -jnp.ones((4, 3)); t = jnp.array([0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(p.add_noise(x0, eps, t)[:, 0], 1 - 2 * t)
    z = gf.paths.ve(0.01, 50.0).prior_sample(jax.random.key(0), (20000, 1))
    assert abs(float(z.std()) - 50.0) < 1.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown path 'nope'"):
        gf.paths.get("nope")
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[B\]"):
        gf.paths.linear().add_noise(jnp.ones((4, 2)), jnp.ones((4, 2)), jnp.ones((3,)))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        gf.paths.check_t(jnp.array([0.5, 1.5]))
    # a NaN is named (the range of the finite values alone read as a valid [0.5, 0.5])
    with pytest.raises(ValueError, match=r"got values in \[0.5, 0.5\] and 1 NaN value"):
        gf.paths.check_t(jnp.array([0.5, jnp.nan]))
    with pytest.raises(ValueError, match="got only NaN"):
        gf.paths.check_t(float("nan"))
    with pytest.raises(TypeError, match="alpha_fn and sigma_fn must be callables"):
        gf.paths.Path(alpha_fn=1.0, sigma_fn=lambda t: t)


def test_endpoints_of_diffusion_and_log_snr_inverse():
    # vp_linear: g^2 = beta(t), also at t = 0 where the generic 2 sigma sigma' is 0 * inf.
    vp = gf.paths.vp_linear(0.1, 20.0)
    np.testing.assert_allclose(vp.diffusion_sq(jnp.array([0.0, 0.5, 1.0])), [0.1, 10.05, 20.0], rtol=1e-6)
    # Outside a path's log-SNR range the inverse gives the nearer end, closed form or bisection.
    lam = jnp.array([-jnp.inf, -60.0, 60.0, jnp.inf])
    for name, p in ALL_PATHS.items():
        for q in (p, _autodiff_twin(p)):
            t = np.asarray(q.t_from_log_snr(lam))
            np.testing.assert_allclose(t, [1.0, 1.0, 0.0, 0.0], atol=1e-6, err_msg=name)


def test_check_t_is_a_no_op_under_tracing():
    f = jax.jit(lambda t: (gf.paths.check_t(t, "t"), gf.paths.check_t(0.5, "s"), 2 * t)[-1])
    assert float(f(0.25)) == 0.5
    assert float(jax.grad(lambda t: (gf.paths.check_t(t), t * t)[-1])(3.0)) == 6.0
    np.testing.assert_allclose(jax.vmap(lambda t: (gf.paths.check_t(t), t + 1)[-1])(jnp.ones(3)), 2.0)
    with pytest.raises(ValueError, match=r"t_min must lie in \[0, 1\]"):
        gf.paths.check_t(-0.5, "t_min")


def test_factories_refuse_hyper_parameters_that_reverse_or_break_the_path():
    # ve(50, 0.01), edm(80, 0.002), vp_cosine(5, -5) had a log-SNR increasing in t; vp_linear(-1, 20)
    # gave NaN sigma near 0; ve(sigma_min=0), edm(rho=0) failed later with a ZeroDivisionError
    for make, match in ((lambda: gf.paths.ve(50.0, 0.01), "0 < sigma_min < sigma_max"),
                        (lambda: gf.paths.ve(0.0, 50.0), "0 < sigma_min < sigma_max"),
                        (lambda: gf.paths.edm(80.0, 0.002), "sigma_min < sigma_max"),
                        (lambda: gf.paths.edm(rho=0.0), "rho > 0"),
                        (lambda: gf.paths.vp_cosine(5.0, -5.0), "logsnr_min < logsnr_max"),
                        (lambda: gf.paths.vp_linear(-1.0, 20.0), "beta_min >= 0"),
                        (lambda: gf.paths.vp_linear(0.1, float("nan")), "beta_max > 0")):
        with pytest.raises(ValueError, match=match):
            make()
    # traced hyper-parameters are not checked (and still work)
    sig = jax.jit(lambda lo: gf.paths.ve(lo, 50.0).sigma(jnp.float32(0.0)))(jnp.float32(0.02))
    assert abs(float(sig) - 0.02) < 1e-7


def test_vp_linear_without_beta_min_inverts_log_snr_at_the_data_end():
    # beta_min = 0: the closed-form inverse was 0/0 once log_sigmoid(lam) underflowed (lam > ~90)
    p = gf.paths.vp_linear(0.0, 20.0)
    t = np.asarray(p.t_from_log_snr(jnp.array([90.0, 200.0, jnp.inf], jnp.float32)))
    assert np.all(t == 0.0), t
    assert float(p.t_from_log_snr(p.log_snr(jnp.float32(0.0)))) == 0.0
    np.testing.assert_allclose(p.t_from_log_snr(p.log_snr(T)), T, rtol=2e-4, atol=1e-6)


def test_vp_cosine_with_infinite_logsnr_min_ends_at_pure_noise():
    # float32 arctan(inf) is above pi/2: alpha(1) was -4e-8 and log_snr(1) NaN
    p = gf.paths.vp_cosine(logsnr_min=-jnp.inf)
    assert float(p.alpha(jnp.float32(1.0))) == 0.0 and float(p.log_snr(jnp.float32(1.0))) == -np.inf
    assert float(p.t_from_log_snr(-jnp.inf)) == 1.0
    # the default path's log-SNR is unchanged up to float32 rounding of the new form
    d = gf.paths.vp_cosine()
    th = np.arctan(np.exp(-0.5 * np.array([np.inf, -15.0])))
    ref = -2.0 * np.log(np.tan(th[0] + np.asarray(T, np.float64) * (th[1] - th[0])))
    np.testing.assert_allclose(d.log_snr(T), ref, rtol=1e-5, atol=1e-5)


def test_vp_cosine_with_infinite_logsnr_min_reaches_pure_noise_in_float64():
    # cos(theta(1)) with theta(1) = float64(pi/2) is +6.1e-17, not 0: log_snr(1) was -74.7, an eps model
    # from t = 1 was not refused, and Karras grids started at noise level 1.6e16
    with jax.enable_x64(True):
        p = gf.paths.vp_cosine(logsnr_min=-jnp.inf)
        one = jnp.asarray(1.0, jnp.float64)
        assert float(p.alpha(one)) == 0.0 and float(p.log_snr(one)) == -np.inf
        assert float(p.sigma(jnp.asarray(0.0, jnp.float64))) == 0.0 and float(p.alpha(jnp.asarray(0.0, jnp.float64))) == 1.0
        g = gf.oracles.Gaussian.full(jnp.array([0.7, -1.2]), jnp.array([[0.8, 0.3], [0.3, 0.5]]))
        with pytest.raises(ValueError, match="alpha=0"):
            gf.sample(g.model(p, "eps"), p, jnp.ones((4, 2)), prediction="eps", solver="dpm++2m", steps=4)
    assert float(p.alpha(jnp.float32(1.0))) == 0.0  # (and still in float32)


def test_vp_linear_with_decreasing_beta_inverts_log_snr_below_its_range():
    # beta_min > beta_max is accepted; below log_snr(1) the closed-form inverse took sqrt(< 0): NaN, not 1
    p = gf.paths.vp_linear(20.0, 0.1)
    lam = jnp.array([-jnp.inf, -60.0, -10.1, -10.06], jnp.float32)
    np.testing.assert_array_equal(np.asarray(p.t_from_log_snr(lam)), 1.0)
    t = jnp.linspace(0.05, 0.95, 7)
    np.testing.assert_allclose(p.t_from_log_snr(p.log_snr(t)), t, rtol=1e-4)


def test_vp_linear_without_beta_min_has_a_finite_sigma_derivative_at_zero():
    # sigma ~ t sqrt(beta_max / 2): sigma'(0) = sqrt(10) for beta_max = 20, was 0/0 = NaN
    p = gf.paths.vp_linear(0.0, 20.0)
    np.testing.assert_allclose(p.d_sigma(jnp.array([0.0, 1e-6])), np.sqrt(10.0), rtol=1e-5)
    assert float(p.d_log_snr(jnp.float32(0.0))) == -np.inf
    assert float(gf.paths.vp_linear().d_sigma(jnp.float32(0.0))) == np.inf  # beta_min > 0: still singular


def test_int_hyper_parameters_do_not_recompile():
    # edm(rho=7), ve(sigma_max=50): Python ints stayed ints, which eqx.filter_jit (gf.sample) keeps static
    traces = []
    f = eqx.filter_jit(lambda p, t: (traces.append(1), p.sigma(t))[1])
    t = jnp.linspace(0.0, 1.0, 3)
    for rho in (7, 6, 5):
        np.testing.assert_allclose(f(gf.paths.edm(rho=rho), t), gf.paths.edm(rho=float(rho)).sigma(t), rtol=1e-5)
    for s in (50, 60):
        f(gf.paths.ve(sigma_max=s), t)
    assert len(traces) == 2, len(traces)  # one per path type


def test_factories_refuse_infinite_hyper_parameters():
    inf = float("inf")
    for make in (lambda: gf.paths.vp_linear(0.1, inf), lambda: gf.paths.vp_linear(inf, 20.0),
                 lambda: gf.paths.ve(0.01, inf), lambda: gf.paths.edm(sigma_max=inf), lambda: gf.paths.edm(rho=inf)):
        with pytest.raises(ValueError, match="inf|finite"):
            make()
    gf.paths.vp_cosine(-inf, inf)  # (the cosine path's infinite log-SNR ends are legitimate)


def test_get_refuses_hyper_parameters_with_a_path_and_non_string_names():
    with pytest.raises(ValueError, match="beta_max"):
        gf.paths.get(gf.paths.vp_linear(), beta_max=10.0)  # were silently ignored
    for bad in (["vp_linear"], {"a": 1}):
        with pytest.raises(ValueError, match="unknown path"):  # was TypeError: unhashable type
            gf.paths.get(bad)
    assert gf.paths.get(gf.paths.linear()).name == "linear"


def test_broadcast_t_shapes_values_and_errors():
    """broadcast_t: a scalar stays a scalar, [B] becomes [B, 1, ..., 1] against x [B, ...] (same
    values row by row), ints become floats; any other shape is refused with the shapes named."""
    x = jnp.zeros((3, 4, 5, 2))
    t = jnp.array([0.1, 0.5, 0.9])
    out = gf.paths.broadcast_t(t, x)
    assert out.shape == (3, 1, 1, 1)
    np.testing.assert_array_equal(out.reshape(3), t)
    np.testing.assert_array_equal((out * jnp.ones_like(x))[:, 2, 3, 1], t)  # row b gets t[b]
    assert gf.paths.broadcast_t(0.25, x).shape == ()
    assert gf.paths.broadcast_t(jnp.float32(0.25), jnp.zeros((3,))).shape == ()
    assert gf.paths.broadcast_t(jnp.array([0.3, 0.7]), jnp.zeros((2,))).shape == (2,)  # x without features
    ti = gf.paths.broadcast_t(jnp.array([0, 1, 1]), x)
    assert jnp.issubdtype(ti.dtype, jnp.floating)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[B\] = \[3\].*t.shape=\(2,\)"):
        gf.paths.broadcast_t(jnp.array([0.1, 0.2]), x)
    with pytest.raises(ValueError, match=r"t.shape=\(3, 1\)"):
        gf.paths.broadcast_t(jnp.zeros((3, 1)), x)
    # traced under jit with the same result
    np.testing.assert_array_equal(jax.jit(gf.paths.broadcast_t)(t, x), out)


def test_register_a_path_of_your_own():
    """gf.paths.register makes a user path available by name (gf.paths.get, the experiments'
    --path flags); a sub-VP path built from alpha and sigma alone then samples exactly on the
    Gaussian oracle. Existing names and non-Path factories are refused."""

    def sub_vp(beta_max=8.0):
        beta_max = float(beta_max)
        alpha = lambda t, beta_max: jnp.exp(-0.25 * t**2 * beta_max)  # noqa: E731
        sigma = lambda t, beta_max: 1.0 - jnp.exp(-0.5 * t**2 * beta_max)  # noqa: E731  (sub-VP: 1 - alpha^2)
        return gf.paths.Path(alpha_fn=alpha, sigma_fn=sigma, params=dict(beta_max=jnp.asarray(beta_max)),
                             name="test_sub_vp", t_min=1e-3)

    gf.paths.register("test_sub_vp", sub_vp)
    assert "test_sub_vp" in gf.paths.names()
    path = gf.paths.get("test_sub_vp", beta_max=10.0)
    np.testing.assert_allclose(path.alpha(jnp.asarray(1.0)), np.exp(-2.5), rtol=1e-6)
    g = gf.oracles.Gaussian.diagonal(jnp.array([1.0, -0.5]), jnp.array([0.5, 2.0]))
    t0 = 0.98
    x1 = g.prior_sample(jax.random.key(0), 64, path, t0)
    want = g.flow_map(x1, t0, 1e-3, path)
    errs = []
    for n in (80, 160):  # second order on the exact model: the error falls ~4x per doubling
        x, info = gf.sample(g.model(path, "eps"), path, x1, prediction="eps", solver="dpm++2m", steps=n, t_start=t0,
                            t_end=1e-3, denoise=False)
        errs.append(float(jnp.sqrt(jnp.mean((x - want) ** 2))))
        assert int(info.nfe) == n
    assert errs[1] < 5e-4 and 3.0 < errs[0] / errs[1] < 5.5, errs  # (measured 1.06e-3, 2.39e-4)
    with pytest.raises(ValueError, match="path 'linear' is already registered by genflow; pick another name"):
        gf.paths.register("linear", sub_vp, overwrite=True)
    # re-running a notebook cell: refused unless overwrite=True; unregister removes only user paths
    with pytest.raises(ValueError, match="'test_sub_vp' is already registered by you; pass overwrite=True"):
        gf.paths.register("test_sub_vp", sub_vp)
    gf.paths.register("test_sub_vp", lambda: sub_vp(beta_max=2.0), overwrite=np.True_)  # (NumPy bools too)
    np.testing.assert_allclose(gf.paths.get("test_sub_vp").alpha(jnp.asarray(1.0)), np.exp(-0.5), rtol=1e-6)
    assert gf.paths.unregister("test_sub_vp") is not sub_vp and "test_sub_vp" not in gf.paths.names()
    with pytest.raises(ValueError, match="path 'linear' comes from genflow; only names added by register"):
        gf.paths.unregister("linear")
    with pytest.raises(ValueError, match="'test_sub_vp' is not registered"):
        gf.paths.unregister("test_sub_vp")
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        gf.paths.register("test_x", sub_vp, overwrite=1)
    gf.paths.register("test_not_a_path", lambda: 3.0)  # (conftest unregisters it)
    with pytest.raises(TypeError, match="not a gf.paths.Path"):
        gf.paths.get("test_not_a_path")
    with pytest.raises(ValueError, match="gf.paths.register"):
        gf.paths.get("test_missing")


def test_vp_cosine_with_a_finite_logsnr_max_denoises_at_the_end():
    # Path.denoise_at_end is documented as true where sigma(t_min) > 0; vp_cosine(logsnr_max=10)
    # has sigma(0) = 6.7e-3 and samplers returned x_0 = alpha(0) x0 + sigma(0) eps, noise included.
    for lmax in (10.0, 15.0):
        path = gf.paths.vp_cosine(logsnr_max=lmax)
        s0 = float(path.sigma(path.t_min))
        np.testing.assert_allclose(s0, np.sin(np.arctan(np.exp(-0.5 * lmax))), rtol=1e-5)
        assert s0 > 0 and path.denoise_at_end
    path = gf.paths.vp_cosine()  # logsnr_max = inf: exact data at t = 0, nothing to denoise
    assert float(path.sigma(path.t_min)) == 0.0 and not path.denoise_at_end
    # a sampler's default then ends on the Tweedie estimate at t = 0 (one more NFE)
    path = gf.paths.vp_cosine(logsnr_max=10.0)
    g = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.full(2, 1e-4))
    x1 = path.prior_sample(jax.random.key(0), (8, 2))
    x_end, info = gf.sample(g.model(path, "eps"), path, x1, prediction="eps", solver="ddim", steps=4)
    x_raw, info_raw = gf.sample(g.model(path, "eps"), path, x1, prediction="eps", solver="ddim", steps=4, denoise=False)
    assert info.nfe == info_raw.nfe + 1
    np.testing.assert_allclose(x_end, g.x0(x_raw, jnp.zeros(8), path), rtol=1e-5, atol=1e-7)


def test_vp_cosine_sigma_derivative_is_accurate_at_the_noise_end():
    # sigma' = cos(theta) (th1 - th0) with theta -> pi/2: float32's cos(pi/2) is -4.4e-8, so with
    # logsnr_min = -inf sigma'(1) was negative (it is 0) and 5% off at t = 1 - 1e-6.
    path = gf.paths.vp_cosine(logsnr_min=-np.inf)
    assert float(path.d_sigma(jnp.float32(1.0))) == 0.0
    t = jnp.asarray([1 - 1e-6, 1 - 1e-5, 1 - 1e-4, 0.5], jnp.float32)
    exact = 0.5 * np.pi * np.cos(0.5 * np.pi * np.asarray(t, np.float64))  # theta = pi t / 2 here
    np.testing.assert_allclose(path.d_sigma(t), exact, rtol=1e-3)
    # consistent with the path's own alpha (sigma' = alpha (th1 - th0) on every vp_cosine)
    for p in (path, gf.paths.vp_cosine()):
        th0, th1 = (np.arctan(np.exp(-0.5 * p.params[k])) for k in ("logsnr_max", "logsnr_min"))
        np.testing.assert_allclose(p.d_sigma(t), np.asarray(p.alpha(t)) * (th1 - th0), rtol=1e-5)


def test_edm_with_sigma_min_zero_ends_at_clean_data_without_a_denoising_step():
    """denoise_at_end is documented as 'true where sigma(t_min) > 0'; edm hard-coded True, so
    edm(sigma_min=0) spent one more evaluation on every sample (dpm++2m 11 NFE for 10 steps) and
    replaced the final clean state by the model's x0 at sigma = 0."""
    assert gf.paths.edm().denoise_at_end and not gf.paths.edm(sigma_min=0.0).denoise_at_end
    for path in (gf.paths.edm(), gf.paths.edm(sigma_min=0.0), gf.paths.vp_cosine(), gf.paths.vp_linear(),
                 gf.paths.ve(), gf.paths.linear()):
        assert path.denoise_at_end == bool(float(path.sigma(path.t_min)) > 0), path.name
    path = gf.paths.edm(sigma_min=0.0)
    g = gf.oracles.Gaussian.diagonal([1.0, -1.0], [0.5, 0.2])
    x1 = g.prior_sample(jax.random.key(0), 4, path)
    _, info = gf.sample(g.model(path, "eps"), path, x1, prediction="eps", solver="dpm++2m", steps=10,
                        schedule="karras")
    assert int(info.nfe) == 10


def test_d_log_snr_is_minus_inf_where_sigma_vanishes():
    # edm(sigma_min=0) at t = 0: sigma = sigma' = 0 gave 0/0 = NaN (the elbo / sigmoid weights too)
    for path in (gf.paths.edm(sigma_min=0.0), gf.paths.linear(), gf.paths.vp_cosine()):
        assert float(path.d_log_snr(0.0)) == -np.inf, path.name
        g = jax.grad(lambda t: path.d_log_snr(t))(0.3)  # (a safe denominator: no NaN leaks into gradients)
        assert np.isfinite(float(g)), path.name


def test_paths_with_equal_hyper_parameters_can_be_donated_together():
    """A cache of flattened hyper-parameters (tried in this stop, ~0.04 ms per flatten) shared one
    array between equal paths: donating two of them in one call failed ("Attempt to use a buffer
    that was previously donated"), and donating one deleted the other's arrays."""
    f = jax.jit(lambda a, b: jax.tree.map(lambda u, v: u + v, a, b), donate_argnums=(0, 1))
    # gf.sample keeps such arrays for its own compiled calls only: the user's paths are untouched
    path = gf.paths.vp_linear()
    g = gf.oracles.Gaussian.diagonal(np.array([1.0, -1.0]), np.array([0.5, 0.2]))
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    a, b = (gf.sample(g.model(path, "eps"), path, x1, prediction="eps", solver="dpm++2m", steps=8,
                      schedule="logsnr")[0] for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert all(type(v) is float for v in path.params.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (donation is not implemented on every backend)
        out = f(gf.paths.vp_linear(), gf.paths.vp_linear())
        kept = jax.tree.map(jnp.asarray, gf.paths.vp_linear())
        jax.jit(lambda a: jax.tree.map(lambda u: 2 * u, a), donate_argnums=0)(gf.paths.vp_linear())
    assert float(out.params["beta_max"]) == 40.0 and float(kept.alpha(0.5)) > 0.0


# -- from the second paths / param audit (stop 39; each test fails on the code before it) --
def test_gradients_stay_finite_at_the_ends_of_the_log_snr_range():
    """t_from_log_snr below the range is 1 "with derivative 0": the closed forms' overflow
    (exp(-lam / 2)) times the clamp's zero cotangent gave NaN. vp_linear(beta_min=0) gave NaN
    inside its range once log_sigmoid(lam) underflowed."""
    for path, lam in ((gf.paths.vp_cosine(), -200.0), (gf.paths.edm(), -2000.0), (gf.paths.vp_linear(), -jnp.inf),
                      (gf.paths.linear(), -jnp.inf), (gf.paths.vp_cosine(), jnp.inf)):
        assert float(jax.grad(path.t_from_log_snr)(jnp.float32(lam))) == 0.0, (path.name, lam)
    p0 = gf.paths.vp_linear(0.0, 20.0)
    for lam in (80.0, 88.0, 100.0):
        g = float(jax.grad(p0.t_from_log_snr)(jnp.float32(lam)))
        assert np.isfinite(g) and abs(g) < 1e-15, (lam, g)
    f = lambda smin, lam: gf.paths.edm(smin, 80.0, 7.0).t_from_log_snr(lam)  # noqa: E731
    assert float(jax.grad(f)(0.0, -3.0)) == -np.inf  # (inside the range: the parent's value, not NaN)
    # the values are those of the clamp: 0 above, 1 below, the closed form inside, NaN for NaN
    path = gf.paths.vp_cosine()
    t = path.t_from_log_snr(jnp.array([-jnp.inf, -200.0, 0.0, 200.0, jnp.inf, jnp.nan]))
    np.testing.assert_array_equal(np.asarray(t)[[0, 1, 3, 4]], [1.0, 1.0, 0.0, 0.0])
    assert abs(float(path.log_snr(t[2]))) < 1e-5 and np.isnan(t[5])


def test_broadcast_t_names_a_scalar_x_and_add_noise_checks_t():
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[B\]"):
        gf.paths.broadcast_t(jnp.array([0.5]), jnp.float32(1.0))  # (an IndexError)
    x = jnp.ones((2, 2))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        gf.paths.linear().add_noise(x, x, 1.5)  # (alpha(1.5) = -0.5, silently)


def test_a_path_with_noise_at_t0_is_refused_where_it_is_sampled_and_scored():
    """A path written in the other convention (t=0 noise, t=1 data: alpha = t, sigma = 1 - t, as in
    Meta's flow_matching) was accepted: gf.sample returned samples from the wrong end with no error
    (mean [-0.41, 1.97] for data of mean [1, -1]) and gf.log_prob NaN (extension audit). Flipped
    in time, the same path samples the data; every built-in path passes."""
    rev = gf.paths.Path(alpha_fn=lambda t: t, sigma_fn=lambda t: 1.0 - t, name="reversed")
    g = gf.oracles.Gaussian.diagonal(jnp.array([1.0, -1.0]), jnp.array([0.5, 0.2]))
    x1 = jax.random.normal(jax.random.key(0), (8, 2))
    msg = "path 'reversed' does not run from data to noise"
    for solver in ("euler", "dpm++2m", "tsit5"):
        with pytest.raises(ValueError, match=msg):
            gf.sample(g.model(rev, "velocity"), rev, x1, prediction="velocity", solver=solver, steps=10)
    with pytest.raises(ValueError, match=msg):
        gf.log_prob(g.model(rev, "velocity"), rev, x1, prediction="velocity")
    op = gf.inverse.operators.Mask(jnp.array([1.0, 0.0]))
    with pytest.raises(ValueError, match=msg):
        gf.inverse.posterior_sample(g.model(rev, "velocity"), rev, x1, op.forward(x1), op, key=jax.random.key(1),
                                    prediction="velocity", method="dps", steps=4)
    flipped = gf.paths.Path(alpha_fn=lambda t: 1.0 - t, sigma_fn=lambda t: t, name="flipped")
    x, _ = gf.sample(g.model(flipped, "velocity"), flipped, x1, prediction="velocity", solver="heun", steps=10)
    np.testing.assert_allclose(x, g.flow_map(x1, 1.0, 0.0, gf.paths.linear()), atol=0.02)
    for path in ALL_PATHS.values():
        gf.paths.check_orientation(path, path.t_min, 1.0)
    with pytest.raises(ValueError, match=msg):
        gf.paths.check_orientation(rev, 0.2, 0.7)


def test_every_built_in_path_pickles_and_its_copy_is_equal_and_shares_the_compiled_sampler():
    """ve and edm held a log-SNR made by a factory (a local function): they failed to pickle
    ("Can't pickle local object '_sigma_only_log_snr.<locals>.log_snr'") -- no spawn worker, no
    pickle beside a checkpoint -- and a cloudpickle copy compared unequal and compiled the sampler
    anew (pickling audit). Every built-in path now round-trips to an equal path; sampling with the
    copy gives the same samples and compiles nothing."""
    import pickle

    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    g = gf.oracles.Gaussian.diagonal(jnp.array([1.0, -1.0]), jnp.array([0.5, 0.2]))
    for name in gf.paths.names():
        path = gf.paths.get(name)
        copy = pickle.loads(pickle.dumps(path))
        assert copy == path, name
        run = lambda p: gf.sample(g.model(p, "velocity"), p, x1, prediction="velocity", solver="heun",  # noqa: E731
                                  steps=3, t_start=0.99)[0]
        first = run(path)
        again = []
        assert count_compiles(lambda: again.append(run(copy))) == 0, name
        np.testing.assert_array_equal(again[0], first)


# Round 7 of the mutation audit (a second pass over paths.py and param.py): each test below failed on
# a bug the suite let through, named in its first comment.


def _ones_7(t):
    return jnp.ones_like(t)


def test_bisection_inverse_has_the_implicit_derivative_at_the_ends_of_its_range():
    # (P2) a path without a closed-form inverse: at lam = log_snr(0) and log_snr(1) exactly, lam is inside
    # the range (t = 0 / 1 exactly), so dt/dlam = 1 / lambda'(t) there, as just inside
    path = gf.paths.Path(alpha_fn=lambda t: 1.0 - 0.8 * t, sigma_fn=lambda t: 0.2 + 0.8 * t, name="finite_ends")
    for t_end in (0.0, 1.0):
        lam = path.log_snr(jnp.float32(t_end))
        g = float(jax.grad(path.t_from_log_snr)(lam))
        want = 1.0 / float(path.d_log_snr(jnp.float32(t_end)))
        np.testing.assert_allclose(g, want, rtol=1e-4, err_msg=str(t_end))


def test_prior_sample_in_bfloat16_uses_the_float32_sigma_at_t1():
    # (P3) edm's sigma(1) is 80; computed in bfloat16 it was 81.5 (1.9% too wide a prior)
    key = jax.random.key(0)
    z = gf.paths.edm().prior_sample(key, (64,), jnp.bfloat16)
    n = jax.random.normal(key, (64,), jnp.bfloat16).astype(jnp.float32)
    ratio = np.asarray(z.astype(jnp.float32)) / np.asarray(n)
    np.testing.assert_allclose(ratio, 80.0, rtol=0.008)  # bfloat16 rounding of the product (2^-8)


def test_check_orientation_refuses_a_path_whose_snr_does_not_fall():
    # (P6) a constant signal-to-noise ratio does not run from data to noise either
    flat = gf.paths.Path(alpha_fn=_ones_7, sigma_fn=_ones_7, name="flat")
    with pytest.raises(ValueError, match="does not run from data to noise"):
        gf.paths.check_orientation(flat, 0.0, 1.0)


def test_paths_with_traced_end_parameters_denoise_at_the_end():
    # (P10, P11) a traced logsnr_max / sigma_min may leave sigma(0) > 0: such a path denoises at the end
    seen = []

    def f(v):
        seen.append((gf.paths.vp_cosine(logsnr_max=v).denoise_at_end, gf.paths.edm(sigma_min=v * 1e-3).denoise_at_end))
        return v

    jax.jit(f)(10.0)
    assert seen == [(True, True)], seen
    assert not gf.paths.vp_cosine().denoise_at_end and not gf.paths.edm(sigma_min=0.0).denoise_at_end


def test_integer_times_keep_float32_conversions_float32_under_x64():
    # (P12) an int t (t = 1) is weakly typed like a Python float: under x64 it turned float32 conversions
    # into float64 ones
    with jax.enable_x64(True):
        x = jnp.ones((2, 3), jnp.float32)
        out = gf.param.convert(x, x, 1, gf.paths.vp_cosine(), "x0", "eps")
        assert out.dtype == jnp.float32, out.dtype
        assert gf.paths.linear().alpha(1).dtype == jnp.asarray(1.0).dtype


def test_numpy_float_hyper_parameters_do_not_recompile():
    # (P5) NumPy float hyper-parameters become weakly typed arrays at the jit boundary, as Python floats do:
    # left as np.float32 / np.float64 leaves, each new type (and a Python float after them) compiled anew
    traces = []
    f = eqx.filter_jit(lambda p, t: (traces.append(1), p.sigma(t))[1])
    t = jnp.linspace(0.0, 1.0, 3)
    for s in (50.0, np.float32(60.0), np.float64(70.0)):
        np.testing.assert_allclose(f(gf.paths.ve(sigma_max=s), t), gf.paths.ve(sigma_max=float(s)).sigma(t), rtol=1e-5)
    assert len(traces) == 1, len(traces)


def test_prior_sample_keeps_a_low_precision_dtype():
    """prior_sample(key, shape, dtype) returns dtype (sigma(1) is computed in float32, the
    product rounded back), with std sigma(1)."""
    for dt in (jnp.bfloat16, jnp.float16):
        x = gf.paths.edm().prior_sample(jax.random.key(0), (4096,), dt)
        assert x.dtype == dt, (dt, x.dtype)
        assert abs(float(jnp.std(x.astype(jnp.float32))) / 80.0 - 1.0) < 0.05


def test_vp_linear_stops_at_the_documented_t_min():
    """vp_linear's docstring: samplers stop at t_min = 1e-3 (sigma' is singular at 0) and finish
    with a denoising step; sigma(t_min) is then about sqrt(beta_min * 1e-3)."""
    p = gf.paths.vp_linear()
    assert p.t_min == 1e-3 and p.denoise_at_end
    np.testing.assert_allclose(float(p.sigma(p.t_min)), np.sqrt(-np.expm1(-0.25e-6 * 19.9 * 2 - 1e-3 * 0.1)), rtol=1e-4)


def test_an_integer_time_array_gives_the_default_float_width_under_x64():
    """An integer t is read as a float of JAX's default width (float64 under x64), as a Python
    int t is: the coefficients of jnp.array([0, 1]) are those of jnp.array([0.0, 1.0])."""
    with jax.enable_x64(True):
        p = gf.paths.vp_linear()
        ti, tf = jnp.array([0, 1]), jnp.array([0.0, 1.0])
        for f in (p.alpha, p.sigma, p.log_snr):
            assert f(ti).dtype == jnp.float64
            np.testing.assert_array_equal(f(ti), f(tf))


def test_ve_default_noise_range():
    """ve()'s defaults (its signature; Song et al. 2021's VE SDE): sigma from sigma_min = 0.01
    at t = 0 to sigma_max = 50 at t = 1, geometric in between."""
    p = gf.paths.ve()
    np.testing.assert_allclose(np.asarray(p.sigma(jnp.array([0.0, 0.5, 1.0]))), [0.01, np.sqrt(0.01 * 50.0), 50.0],
                               rtol=1e-5)


def test_prior_sample_refuses_dtype_overflow():
    # (ve(1e-3, 1e5) in float16 returned +-inf silently)
    with pytest.raises(ValueError, match=r"float16.*1e\+05|1e\+05.*float16"):
        gf.paths.ve(1e-3, 1e5).prior_sample(jax.random.key(0), (4,), jnp.float16)
    for dtype in (jnp.float16, jnp.bfloat16):  # (sigma_max 80 and 1e3 still fit)
        for smax in (80.0, 1e3):
            x = gf.paths.ve(1e-3, smax).prior_sample(jax.random.key(0), (64,), dtype)
            assert x.dtype == dtype and np.isfinite(np.asarray(x, np.float32)).all()


def _vp_la(t, beta_min, beta_max): return -0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min
def _vp_alpha(t, beta_min, beta_max): return jnp.exp(_vp_la(t, beta_min, beta_max))
def _vp_sigma(t, beta_min, beta_max): return jnp.sqrt(-jnp.expm1(2 * _vp_la(t, beta_min, beta_max)))


def _singular_vp(t_min=0.0):
    return gf.paths.Path(alpha_fn=_vp_alpha, sigma_fn=_vp_sigma, params=dict(beta_min=0.1, beta_max=20.0),
                         name="my_vp", t_min=t_min)


def test_singular_at_t_min_advice_not_circular():
    # (with the path's own t_min = 0 singular, the errors said "pass t_end=path.t_min (0.0)")
    p = _singular_vp()
    g = gf.oracles.Gaussian.diagonal(jnp.array([1.0, -0.5]), jnp.array([0.5, 0.2]))
    x1 = g.prior_sample(jax.random.key(0), 4, p)
    with pytest.raises(ValueError, match=r"give the Path a t_min > 0") as e:
        gf.sample(g.model(p, "eps"), p, x1, prediction="eps", solver="heun", steps=4)
    assert "pass t_end=path.t_min" not in str(e.value)
    with pytest.raises(ValueError, match=r"give the Path a t_min > 0") as e:
        gf.log_prob(g.model(p, "eps"), p, g.sample(jax.random.key(1), 4), prediction="eps")
    assert "pass t_min=path.t_min" not in str(e.value)
    assert np.isfinite(np.asarray(g.model(gf.paths.vp_linear(), "velocity")(x1, jnp.zeros(4)))).all()
    q = _singular_vp(1e-3)  # (the fix the message gives)
    x, _ = gf.sample(g.model(q, "eps"), q, x1, prediction="eps", solver="heun", steps=4)
    assert np.isfinite(np.asarray(x)).all()
    assert np.isfinite(np.asarray(g.model(q, "velocity")(x1, jnp.full(4, 1e-3)))).all()
