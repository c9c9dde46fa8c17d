"""Samplers against the Gaussian oracle (closed-form probability-flow map)."""

import dataclasses
import functools
import gc
import weakref
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf
from conftest import count_compiles, many_arrays
from conftest import ALL_PATHS

B = 256
STEPS = (24, 48, 96)
# the natural prediction kind per path (every kind is covered by the conversion tests)
KIND = {"linear": "velocity", "vp_linear": "eps", "vp_cosine": "v", "ve": "eps", "edm": "x0"}


def _setup(path, gauss2):
    x1 = gauss2.prior_sample(jax.random.key(0), B, path, 1.0)
    t_end = max(path.t_min, 0.0)
    ref = gauss2.flow_map(x1, 1.0, t_end, path)
    return x1, ref


def _err(x, ref):
    return float(jnp.sqrt(jnp.mean((x - ref) ** 2)) / jnp.sqrt(jnp.mean(ref**2)))


@pytest.mark.parametrize("name", ["linear", "vp_linear", "edm"])
def test_adaptive_solver_meets_tolerance(name, gauss2):
    path = ALL_PATHS[name]
    x1, ref = _setup(path, gauss2)
    x, info = gf.sample(gauss2.model(path, "eps" if name != "linear" else "velocity"), path, x1,
                        prediction="eps" if name != "linear" else "velocity", solver="tsit5", rtol=1e-5, atol=1e-5,
                        denoise=False)
    assert _err(x, ref) < 2e-4
    assert int(info.nfe) == 1 + 6 * int(info.stats["num_steps"])


def test_nfe_is_counted_honestly_with_a_bfloat16_model_and_a_batch_of_one(gauss2):
    """For every solver: info.nfe equals the network calls actually executed (counted by a host
    callback), with a bfloat16 model and a single sample; deterministic solvers stay close to the
    exact flow map, stochastic ones finite."""
    path = gf.paths.linear()
    calls = []
    model = gauss2.model(path, "velocity")

    def fn(x, t):
        jax.debug.callback(lambda tt: calls.append(1), t)
        return model(x.astype(jnp.float32), t).astype(jnp.bfloat16)

    x1 = jax.random.normal(jax.random.key(0), (1, 2))
    for solver, spec in gf.sampling.solvers().items():
        calls.clear()
        t_start = 0.999 if solver in ("euler_maruyama", "shark", "pc") else 1.0
        x, info = gf.sample(fn, path, x1.astype(jnp.bfloat16), prediction="velocity", solver=solver, steps=16,
                            key=jax.random.key(1), t_start=t_start)
        jax.block_until_ready(x)
        jax.effects_barrier()
        assert len(calls) == int(info.nfe), solver
        assert x.dtype == jnp.bfloat16 and x.shape == (1, 2), solver
        assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))), solver
        if spec.target == "flow_map":
            ref = gauss2.flow_map(x1, t_start, 0.0, path)
            assert _err(x.astype(jnp.float32), ref) < 0.1, solver


@pytest.mark.parametrize("name", ["vp_linear", "ve"])
def test_euler_maruyama_reaches_the_data_marginal(name, gauss2):
    path = ALL_PATHS[name]
    n = 20_000
    x1 = gauss2.prior_sample(jax.random.key(0), n, path, 1.0)
    x, info = gf.sample(gauss2.model(path, "eps"), path, x1, prediction="eps", solver="euler_maruyama", steps=200,
                        key=jax.random.key(1))
    assert int(info.nfe) == 200 + int(path.denoise_at_end)
    # after the final denoising step the samples are E[x0 | x_tmin]: covariance shrinks by the
    # posterior variance at t_min, which is tiny; compare with the data moments.
    np.testing.assert_allclose(np.asarray(x.mean(0)), np.asarray(gauss2.mean), atol=0.03)
    np.testing.assert_allclose(np.cov(np.asarray(x).T), np.asarray(gauss2.cov), atol=0.04)


def test_denoise_trajectory_and_batch_of_one(gauss2):
    path = gf.paths.vp_linear()
    fn = gauss2.model(path, "eps")
    x1 = gauss2.prior_sample(jax.random.key(0), 4, path, 1.0)
    x, info = gf.sample(fn, path, x1, prediction="eps", solver="heun", steps=10, save_trajectory=True, denoise=True)
    assert info.trajectory.shape == (11, 4, 2)
    np.testing.assert_allclose(info.trajectory[0], x1)
    t_end = info.ts[-1]
    np.testing.assert_allclose(x, gauss2.x0(info.trajectory[-1], jnp.full((4,), t_end), path), rtol=1e-5, atol=1e-5)
    assert int(info.nfe) == 21
    x_one, _ = gf.sample(fn, path, x1[:1], prediction="eps", solver="heun", steps=10)
    np.testing.assert_allclose(x_one, x[:1], rtol=1e-5, atol=1e-5)
    # the scan solvers' trajectory (genflow's own loop, not Diffrax's): starts at x1, ends where the
    # samples are (without the final denoising), and its states follow the exact flow
    for solver in ("dpm++2m", "dpm++2s", "unipc"):
        x, info = gf.sample(fn, path, x1, prediction="eps", solver=solver, steps=10, save_trajectory=True, denoise=False)
        assert info.trajectory.shape == (11, 4, 2), solver
        np.testing.assert_array_equal(info.trajectory[0], x1)
        np.testing.assert_array_equal(info.trajectory[-1], x)
        exact = gauss2.flow_map(x1, 1.0, info.ts[5], path)
        np.testing.assert_allclose(info.trajectory[5], exact, atol=0.05, err_msg=solver)


def test_bfloat16_model_and_state(gauss2):
    path = gf.paths.linear()
    model = gauss2.model(path, "velocity")
    fn = lambda x, t: model(x.astype(jnp.float32), t).astype(jnp.bfloat16)
    x1 = jax.random.normal(jax.random.key(0), (64, 2))
    ref, _ = gf.sample(gauss2.model(path, "velocity"), path, x1, prediction="velocity", solver="heun", steps=20)
    xb, _ = gf.sample(fn, path, x1.astype(jnp.bfloat16), prediction="velocity", solver="heun", steps=20)
    assert xb.dtype == jnp.bfloat16
    assert _err(xb.astype(jnp.float32), ref) < 2e-2


def test_new_parameters_do_not_recompile():
    traces = []
    model = gf.nets.MLP(hidden=(16,))

    def apply(params, x, t):
        traces.append(1)
        return model.apply(params, x, t)

    p1 = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
    p2 = jax.tree.map(lambda a: a + 0.1, p1)
    x1 = jax.random.normal(jax.random.key(1), (8, 2))
    path = gf.paths.linear()
    import functools

    a, _ = gf.sample(functools.partial(apply, p1), path, x1, prediction="velocity", solver="euler", steps=4)
    n = len(traces)
    b, _ = gf.sample(functools.partial(apply, p2), path, x1, prediction="velocity", solver="euler", steps=4)
    assert len(traces) == n, "a new functools.partial over new params must reuse the compiled sampler"
    assert not np.allclose(a, b)


def test_time_grids():
    path = gf.paths.vp_linear()
    for sched in gf.sampling.SCHEDULES:
        ts = gf.sampling.time_grid(path, 10, sched)
        assert ts.shape == (11,)
        assert float(ts[0]) == 1.0 and abs(float(ts[-1]) - 1e-3) < 1e-7
        assert np.all(np.diff(np.asarray(ts)) < 0)
    lam = path.log_snr(gf.sampling.time_grid(path, 10, "logsnr"))
    np.testing.assert_allclose(np.diff(np.asarray(lam)), np.diff(np.asarray(lam)).mean(), rtol=1e-3)
    # NumPy / JAX scalar endpoints (a 0-d JAX t_start failed: "JAX arrays are immutable")
    want = gf.sampling.time_grid(path, 4, "uniform", t_start=0.9, t_end=0.1)
    for t0, t1 in ((np.float32(0.9), np.float64(0.1)), (jnp.float32(0.9), jnp.asarray(0.1))):
        np.testing.assert_allclose(gf.sampling.time_grid(path, 4, "uniform", t_start=t0, t_end=t1), want, rtol=1e-6)
    with pytest.raises(ValueError, match="must be concrete real scalars"):
        jax.jit(lambda t0: gf.sampling.time_grid(path, 4, "karras", t_start=t0))(0.9)


def test_solver_table():
    table = gf.sampling.solvers()
    for name in ("euler", "heun", "midpoint", "tsit5", "dopri5", "euler_maruyama"):
        assert name in table
    assert table["heun"].order == 2 and table["heun"].nfe_per_step == 2 and not table["heun"].stochastic
    assert table["euler_maruyama"].stochastic and table["tsit5"].adaptive


def test_bad_inputs(gauss2):
    path = gf.paths.linear()
    fn = gauss2.model(path, "velocity")
    x1 = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        gf.sample(fn, path, x1, prediction="velocity", solver="rk4")
    with pytest.raises(ValueError, match="unknown prediction 'flow'"):
        gf.sample(fn, path, x1, prediction="flow")
    with pytest.raises(TypeError, match="prediction"):
        gf.sample(fn, path, x1)
    with pytest.raises(ValueError, match="is stochastic: pass key"):
        gf.sample(fn, path, x1, prediction="velocity", solver="euler_maruyama")
    with pytest.raises(ValueError, match="t_end < t_start"):
        gf.sample(fn, path, x1, prediction="velocity", t_start=1.2)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        gf.sample(fn, path, x1, prediction="velocity", steps=0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        gf.sample(fn, path, x1, prediction="velocity", schedule=jnp.array([0.0, 0.5, 1.0]))
    with pytest.raises(TypeError, match=r"fn must be a model function fn\(x: \[B, ...\], t: \[B\]\).*got int"):
        gf.sample(3, path, x1, prediction="velocity")  # (a bare "'int' object is not callable")
    with pytest.raises(ValueError, match="alpha=0"):
        gf.sample(fn, path, x1, prediction="eps")
    with pytest.raises(ValueError, match="batch dimension"):
        gf.sample(fn, path, jnp.float32(1.0), prediction="velocity")
    # accepted before: negative tolerances, a truthy string for denoise; max_steps=0 failed in Diffrax
    for kw, err, match in ((dict(rtol=-1e-3), ValueError, "rtol must be a finite real >= 0"),
                           (dict(atol="1e-5"), ValueError, "atol must be a finite real >= 0"),
                           (dict(rtol=np.inf), ValueError, "rtol must be a finite real >= 0; got inf"),
                           (dict(max_steps=0), ValueError, "max_steps must be a positive int"),
                           (dict(denoise="no"), TypeError, "denoise must be None, True or False")):
        with pytest.raises(err, match=match):
            gf.sample(fn, path, x1, prediction="velocity", solver="tsit5", **kw)


def test_new_step_counts_reuse_the_compiled_sampler(gauss2, caplog):
    """Scan solvers and Diffrax's fixed-step solvers run a traced number of steps over a grid
    padded to a bucket (64, 128, ...): a new step count compiles nothing, and the samples equal
    those of the fixed-length scan / ``diffeqsolve`` (taken when the trajectory is saved), with the
    same per-step noise for stochastic solvers."""
    import logging

    path = gf.paths.linear()
    x1 = gauss2.prior_sample(jax.random.key(0), 64, path, 1.0)
    for solver in ("dpm++2m", "ddpm", "heun"):
        kind = "velocity" if solver == "heun" else "x0"  # the velocity of an x0 model is singular at t = 0
        fn = gauss2.model(path, kind)
        kw = dict(prediction=kind, solver=solver, schedule="karras", key=jax.random.key(3))
        gf.sample(fn, path, x1, steps=7, **kw)
        with jax.log_compiles(True), caplog.at_level(logging.DEBUG, logger="jax"):
            caplog.clear()
            outs = {n: gf.sample(fn, path, x1, steps=n, **kw) for n in (9, 12, 20)}
            compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
        assert not compiled, compiled
        for n, (x, info) in outs.items():
            assert int(info.nfe) == n * gf.sampling.solvers()[solver].nfe_per_step and info.ts.shape == (n + 1,)
        y, info_y = gf.sample(fn, path, x1, steps=12, save_trajectory=True, **kw)
        np.testing.assert_allclose(outs[12][0], y, rtol=1e-5, atol=1e-5)
        assert info_y.trajectory.shape == (13,) + x1.shape
    # solvers with stages (their stage grid's ends were read from the device grid: one small slice
    # program compiled per step count; perf review helper's finding)
    for solver in ("edm_heun", "deis", "dpm++2s"):
        kw = dict(prediction="x0", solver=solver, schedule="karras", key=jax.random.key(3))
        gf.sample(gauss2.model(path, "x0"), path, x1, steps=7, **kw)
        with jax.log_compiles(True), caplog.at_level(logging.DEBUG, logger="jax"):
            caplog.clear()
            for n in (9, 12, 20):
                gf.sample(gauss2.model(path, "x0"), path, x1, steps=n, **kw)
            compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
        assert not compiled, (solver, compiled)


def test_new_values_of_real_solver_options_reuse_the_compiled_sampler(gauss2, caplog):
    """The real options that only enter the arithmetic (momentum beta, d2_weight, EDM's s_noise /
    s_tmin / s_tmax, the pc snr, restart's rho) are traced: a sweep over Python floats compiles
    once (each new value compiled a new sampler, ~1 s), and the samples move with the value."""
    import logging

    path = gf.paths.vp_cosine()
    x1 = gauss2.prior_sample(jax.random.key(0), 16, path, 1.0)
    fn = gauss2.model(path, "eps")
    for solver, name, values in (("dpm++2m_hb", "beta", (0.5, 0.6, 0.7)), ("dpm++3m", "d2_weight", (1.0, 1.5, 2.0)),
                                 ("edm_heun_churn", "s_noise", (1.0, 1.05, 1.1)), ("pc", "snr", (0.1, 0.15, 0.2)),
                                 ("restart", "rho", (7.0, 5.0, 3.0))):
        kw = dict(prediction="eps", solver=solver, steps=6, key=jax.random.key(1), t_start=0.99)
        first = gf.sample(fn, path, x1, **kw, **{name: values[0]})[0]
        with jax.log_compiles(True), caplog.at_level(logging.DEBUG, logger="jax"):
            caplog.clear()
            outs = [gf.sample(fn, path, x1, **kw, **{name: v})[0] for v in values[1:]]
            compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
        assert not compiled, (solver, name, compiled)
        assert all(float(jnp.max(jnp.abs(o - first))) > 0 for o in outs), (solver, name)  # (the value is used)


def test_option_shape_and_endpoint_checks(gauss2):
    path = gf.paths.linear()
    fn, x1, key = gauss2.model(path, "velocity"), jnp.zeros((4, 2)), jax.random.key(0)
    bad = [("unipc", dict(order=4), "order must be an int in 1..3"), ("deis", dict(order=0), "order must be an int >= 1"),
           ("ddim", dict(eta=2.0), r"eta must be a float in \[0, 1\]"),
           ("ddim", dict(eta=1.0 + 1e-6), r"eta must be a float in \[0, 1\]"),  # (the bound is 1, not 2)
           ("ddim", dict(eta=True), r"eta must be a float in \[0, 1\]"),  # (a bool is not read as eta=1)
           ("pc", dict(corrector_steps=-1), "corrector_steps must be an int >= 0"),
           # these gave silently wrong samples (or, brownian_tol < 0, never returned)
           ("pc", dict(snr=-0.1), "snr must be a float >= 0"),
           ("dpm++2m_hb", dict(beta=0.0), r"beta must be a float in \(0, 1\]"),
           ("edm_heun_churn", dict(churn=-5.0), "churn must be a float >= 0"),
           ("edm_heun_churn", dict(s_noise=-1.0), "s_noise must be a float >= 0"),
           ("euler_maruyama", dict(brownian_tol=0.0), "brownian_tol must be None or a float > 0"),
           ("shark", dict(brownian_tol=-1.0), "brownian_tol must be None or a float > 0"),
           # strings read as numbers passed the checks and failed later with unrelated TypeErrors
           ("pc", dict(snr="0.16"), "snr must be a float >= 0"),
           ("edm_heun_churn", dict(churn="40"), "churn must be a float >= 0")]
    for solver, opts, msg in bad:
        with pytest.raises(ValueError, match=f"solver '{re.escape(solver)}': option {msg}"):
            gf.sample(fn, path, x1, prediction="velocity", solver=solver, key=key, t_start=0.99, **opts)
    # a model whose output does not have the shape of x (it used to broadcast silently)
    with pytest.raises(ValueError, match=r"returned shape \(4, 1\) for x of shape \(4, 2\)"):
        gf.sample(lambda x, t: fn(x, t)[:, :1], path, x1, prediction="velocity", solver="euler", steps=4)
    # an x0 model at a clean-data end with a solver that evaluates there: 0/0, refused by name
    x0_fn = gauss2.model(path, "x0")
    for solver in ("heun", "tsit5"):
        with pytest.raises(ValueError, match=f"t_end=0.0 has sigma=0 on path 'linear': solver '{solver}'"):
            gf.sample(x0_fn, path, x1, prediction="x0", solver=solver, steps=4, t_start=0.99)
    x, _ = gf.sample(x0_fn, path, x1, prediction="x0", solver="heun", steps=4, t_start=0.99, t_end=1e-3)
    assert np.all(np.isfinite(np.asarray(x)))
    # a Karras / log-SNR grid whose finite end lies outside [sigma_min, sigma_max] (times repeated)
    with pytest.raises(ValueError, match="gives repeated times"):
        gf.sampling.time_grid(path, 5, "logsnr", t_start=1.0, t_end=0.995)
    with pytest.raises(ValueError, match="gives repeated times"):
        gf.sampling.time_grid(path, 5, "karras", t_start=1e-3, t_end=0.0)


def test_restart_under_x64(gauss2):
    path = gf.paths.edm()
    with jax.enable_x64(True):
        fn = gauss2.model(path, "x0")
        x1 = path.prior_sample(jax.random.key(1), (8000, 2), jnp.float64)
        x, info = gf.sample(fn, path, x1, prediction="x0", solver="restart", steps=32, key=jax.random.key(2))
        assert x.dtype == jnp.float64 and info.nfe.dtype == jnp.int32 and np.all(np.isfinite(np.asarray(x)))
        # ... and in law (the test was dtype and finiteness only): measured mean 0.008 and covariance
        # 0.020 off at 32 steps (0.32 at 8, 0.06 at 16); standard errors ~0.01
        np.testing.assert_allclose(np.asarray(x.mean(0)), np.asarray(gauss2.mean), atol=0.03)
        np.testing.assert_allclose(np.cov(np.asarray(x).T), np.asarray(gauss2.cov), atol=0.05)


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "tsit5"])
def test_float32_state_under_x64_with_diffrax_ode_solvers(solver, gauss2):
    # under x64 the grid is float64, and Diffrax's y + dt f turned the float32 state float64
    # (loop-carry type errors in every Diffrax ODE solver; the scan solvers were fine)
    path = gf.paths.linear()
    x1 = jax.random.normal(jax.random.key(0), (4, 2), jnp.float32)
    kw = dict(prediction="velocity", solver=solver, steps=16)
    want, _ = gf.sample(gauss2.model(path, "velocity"), path, x1, **kw)
    with jax.enable_x64(True):
        x, _ = gf.sample(gauss2.model(path, "velocity"), path, x1, **kw)
        assert x.dtype == jnp.float32
    np.testing.assert_allclose(x, want, atol=1e-5)  # the float32 solve, whatever x64 says


def test_default_denoise_of_a_velocity_model_at_a_clean_end_is_finite(gauss2):
    # vp_linear denoises at the end by default; at t_end = 0 (sigma = 0, sigma' = inf) the
    # velocity -> x0 conversion was inf / inf; x0_hat = x / alpha there
    path = gf.paths.vp_linear()
    x1 = gauss2.prior_sample(jax.random.key(0), 4, path, 1.0)
    kw = dict(prediction="velocity", solver="euler", steps=16, t_end=0.0)
    x, info = gf.sample(gauss2.model(path, "velocity"), path, x1, **kw)
    y, _ = gf.sample(gauss2.model(path, "velocity"), path, x1, denoise=False, **kw)
    assert bool(jnp.all(jnp.isfinite(x)))
    np.testing.assert_allclose(x, y, atol=1e-6)
    # and the conversion's gradient there is finite (no NaN leaks through the unselected branch)
    g = jax.grad(lambda p: jnp.sum(gf.param.to_x0_eps(p * x, x, 0.0, path, "velocity")[0]))(1.0)
    assert np.isfinite(float(g))


def test_model_reverse_drift_takes_a_per_sample_time(gauss2):
    # a [B] time lined up with the last axis of x ([B, D]): wrong drifts for B == D, an error else
    path = gf.paths.vp_linear()
    m = gf.sampling.Model(gauss2.model(path, "eps"), path, "eps")
    x = jnp.array([[1.0, 2.0], [-0.5, 0.3]])
    t = jnp.array([0.3, 0.8])
    per_sample = jnp.concatenate([m.reverse_drift(x[i:i + 1], t[i]) for i in range(2)])
    np.testing.assert_allclose(m.reverse_drift(x, t), per_sample, rtol=1e-5)
    assert m.reverse_drift(jnp.ones((3, 2)), jnp.array([0.2, 0.5, 0.7])).shape == (3, 2)
    # pc's one evaluation for both: the score and the drift of separate calls, on a velocity model
    mv = gf.sampling.Model(gauss2.model(path, "velocity"), path, "velocity")
    score, drift = mv.score_and_reverse_drift(x, t)
    np.testing.assert_array_equal(score, mv.predict(x, t, "score"))
    np.testing.assert_array_equal(drift, mv.reverse_drift(x, t))
    np.testing.assert_allclose(score, gauss2.score(x, t, path), rtol=1e-5)


@pytest.mark.parametrize("eta", [np.float32(0.5), jnp.float32(0.5)])
def test_ddim_eta_accepts_numpy_and_jax_scalars(eta, gauss2):
    path = gf.paths.linear()
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    kw = dict(prediction="velocity", solver="ddim", steps=4, key=jax.random.key(1))
    a, _ = gf.sample(gauss2.model(path, "velocity"), path, x1, eta=eta, **kw)
    b, _ = gf.sample(gauss2.model(path, "velocity"), path, x1, eta=0.5, **kw)
    np.testing.assert_allclose(a, b)


def test_structural_options_are_refused_as_traced(gauss2):
    """eta and churn choose a Python branch, order / corrector_steps / restart_* the program itself,
    so they must be concrete: a traced one (passed as a jit argument) was reported as out of range
    ("must be a float in [0, 1]; got JitTracer", "must be an int in 1..3; got JitTracer")."""
    path = gf.paths.linear()
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    fn = gauss2.model(path, "velocity")
    for solver, name, value, kind in (("ddim", "eta", 0.5, "float"), ("edm_heun", "churn", 0.5, "float"),
                                      ("unipc", "order", 3, "value"), ("deis", "order", 2, "value"),
                                      ("pc", "corrector_steps", 1, "value"), ("restart", "restart_times", 2, "value"),
                                      ("restart", "restart_steps", 2, "value"),
                                      ("restart", "restart_interval", (0.1, 0.5), "value")):
        run = jax.jit(lambda v: gf.sample(fn, path, x1, prediction="velocity", solver=solver, steps=4,
                                          t_start=0.999, key=jax.random.key(1), **{name: v})[0])
        with pytest.raises(TypeError, match=f"solver '{solver}': option {name} must be a concrete Python {kind} "
                                            f"\\(.*\\); got a traced value"):
            run(value)
    # a user's solver decides for itself: its traced eta / order arrive as they were passed (not None)
    def scaled_euler(model, ts, x, key, rtol, atol, max_steps, save_trajectory, eta=1.0, order=1):
        x, _ = jax.lax.scan(lambda x, tt: (x + eta * (tt[1] - tt[0]) * model.velocity(x, tt[0]), None), x,
                            (ts[:-1], ts[1:]))
        return x, ts.shape[0] - 1, None, {}

    gf.sampling.register(gf.sampling.SolverSpec("test_scaled_euler", 1, False, 1, False, scaled_euler,
                                                options=("eta", "order")))
    run = jax.jit(lambda v: gf.sample(fn, path, x1, prediction="velocity", solver="test_scaled_euler", steps=4,
                                      eta=v, order=v)[0])
    np.testing.assert_allclose(run(0.5), gf.sample(fn, path, x1, prediction="velocity", solver="test_scaled_euler",
                                                   steps=4, eta=0.5)[0], rtol=1e-6)
    # the options that only enter the arithmetic stay traceable: one compile for a sweep
    run = jax.jit(lambda v: gf.sample(fn, path, x1, prediction="velocity", solver="edm_heun", steps=4,
                                      key=jax.random.key(1), churn=10.0, s_noise=v)[0])
    a, b = run(1.0), gf.sample(fn, path, x1, prediction="velocity", solver="edm_heun", steps=4,
                               key=jax.random.key(1), churn=10.0, s_noise=1.0)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_trajectory_has_the_dtype_of_the_samples(gauss2):
    # a bfloat16 x1 gave a float32 trajectory whose last entry differed from the samples
    path = gf.paths.linear()
    x1 = jax.random.normal(jax.random.key(0), (4, 2), jnp.bfloat16)
    for solver in ("heun", "dpm++2m"):
        x, info = gf.sample(gauss2.model(path, "velocity"), path, x1, prediction="velocity", solver=solver, steps=4,
                            save_trajectory=True)
        assert info.trajectory.dtype == x.dtype == jnp.bfloat16, solver
        np.testing.assert_array_equal(info.trajectory[-1], x)
    # fixed-step Diffrax solves report the same counters with or without a saved trajectory
    for save in (False, True):
        _, info = gf.sample(gauss2.model(path, "velocity"), path, x1, prediction="velocity", solver="heun", steps=4,
                            save_trajectory=save)
        assert {k: int(v) for k, v in info.stats.items()} == {"num_steps": 4, "num_accepted_steps": 4,
                                                                "num_rejected_steps": 0}, save


def test_register_a_diffrax_solver_from_outside(gauss2):
    # a new solver is one entry, from user code (it needed the private table before)
    import diffrax

    spec = gf.sampling.register(gf.sampling.diffrax_solver("test_ralston", diffrax.Ralston(), order=2, nfe_per_step=2))
    assert gf.sampling.solvers()["test_ralston"] is spec
    path = gf.paths.linear()
    x1 = gauss2.prior_sample(jax.random.key(0), 64, path, 1.0)
    ref = gauss2.flow_map(x1, 1.0, 0.0, path)
    errs = []
    for n in (8, 32):
        x, info = gf.sample(gauss2.model(path, "velocity"), path, x1, prediction="velocity", solver="test_ralston",
                            steps=n)
        assert int(info.nfe) == 2 * n
        errs.append(float(jnp.sqrt(jnp.mean((x - ref) ** 2))))
    assert 1.7 < np.log2(errs[0] / errs[1]) / 2 < 2.3, errs  # second order (measured 1.9)
    with pytest.raises(ValueError, match="'test_ralston' is already registered by you; pass overwrite=True"):
        gf.sampling.register(spec)
    with pytest.raises(TypeError, match="SolverSpec"):
        gf.sampling.register("rk4")
    # re-running a notebook cell: overwrite=True replaces one of your own, and gf.sample runs the new
    # solver (the compiled sampler was keyed by the name: the old program would have run)
    euler = gf.sampling.register(gf.sampling.diffrax_solver("test_ralston", diffrax.Euler()), overwrite=True)
    x, info = gf.sample(gauss2.model(path, "velocity"), path, x1, prediction="velocity", solver="test_ralston", steps=8)
    want, _ = gf.sample(gauss2.model(path, "velocity"), path, x1, prediction="velocity", solver="euler", steps=8)
    assert int(info.nfe) == 8 and gf.sampling.solvers()["test_ralston"] is euler
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)
    assert gf.sampling.unregister("test_ralston") is euler and "test_ralston" not in gf.sampling.solvers()
    # ... also when the replacement differs only in what it runs (same name, order, NFE per step and
    # description: SolverSpec compared its run and stepper out of ==, and the old program ran)
    for method in (diffrax.Heun(), diffrax.Midpoint()):  # (conftest unregisters test_mine)
        gf.sampling.register(gf.sampling.diffrax_solver("test_mine", method, description="mine"), overwrite=True)
        x, _ = gf.sample(gauss2.model(path, "velocity"), path, x1, prediction="velocity", solver="test_mine", steps=4)
        name = "heun" if isinstance(method, diffrax.Heun) else "midpoint"
        want, _ = gf.sample(gauss2.model(path, "velocity"), path, x1, prediction="velocity", solver=name, steps=4)
        np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="solver 'euler' is already registered by genflow; pick another name"):
        gf.sampling.register(gf.sampling.diffrax_solver("euler", diffrax.Ralston()), overwrite=True)
    with pytest.raises(ValueError, match="solver 'ddim' comes from genflow; only names added by register"):
        gf.sampling.unregister("ddim")
    with pytest.raises(ValueError, match="'test_ralston' is not registered"):
        gf.sampling.unregister("test_ralston")
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        gf.sampling.register(spec, overwrite=None)


def test_as_pytree_fn_turns_partials_into_traced_pytrees():
    """as_pytree_fn: a functools.partial (nested too) becomes a jax.tree_util.Partial whose bound
    arrays are pytree leaves, so a jitted sampler traces them: new parameters reuse the compiled
    program and give the new result; anything else is returned as is."""
    def f(x, t, w, b=0.0):
        return w * x + b + 0 * t[:, None]

    w1, w2 = jnp.array([1.0, 2.0]), jnp.array([-3.0, 0.5])
    p = gf.sampling.as_pytree_fn(functools.partial(f, w=w1, b=jnp.float32(0.25)))
    assert isinstance(p, jax.tree_util.Partial)
    leaves = jax.tree_util.tree_leaves(p)
    assert any(leaf is w1 for leaf in leaves) and len(leaves) == 2
    nested = gf.sampling.as_pytree_fn(functools.partial(functools.partial(f, w=w1), b=jnp.float32(1.0)))
    assert isinstance(nested, jax.tree_util.Partial) and len(jax.tree_util.tree_leaves(nested)) == 2
    x, t = jnp.ones((3, 2)), jnp.full((3,), 0.5)
    np.testing.assert_allclose(nested(x, t), f(x, t, w1, 1.0))

    traces = []

    @jax.jit
    def call(fn, x, t):
        traces.append(1)
        return fn(x, t)

    np.testing.assert_allclose(call(p, x, t), f(x, t, w1, 0.25))
    q = gf.sampling.as_pytree_fn(functools.partial(f, w=w2, b=jnp.float32(0.25)))
    np.testing.assert_allclose(call(q, x, t), f(x, t, w2, 0.25))
    assert len(traces) == 1  # new bound arrays, same compiled program

    plain = lambda x, t: x  # noqa: E731
    assert gf.sampling.as_pytree_fn(plain) is plain
    assert gf.sampling.as_pytree_fn(p) is p


_GLOBAL_W = jnp.eye(2)
_GLOBAL_SCALE = 1.0


def _global_model(x, t):
    return x @ _GLOBAL_W * _GLOBAL_SCALE


def _euler(x, w, steps=4):  # the exact euler samples of the velocity x @ w on the linear path
    for _ in range(steps):
        x = x - (x @ w) / steps
    return x


def test_closures_over_arrays_are_traced_not_compiled_in():
    """A plain function that uses JAX arrays through its closure, defaults or module globals
    (``lambda x, t: net.apply(params, x, t)``) was a static argument of gf.sample's long-lived
    compiled sampler: the lambda, its arrays and a constant copy of them stayed alive after the
    caller dropped them (5 of 5 parameter sets here), and a global array rebound after the first
    call was not seen by the next. Now its arrays are the program's arguments: freed with the
    lambda, and read at every call; the same function object still compiles once."""
    path = gf.paths.linear()
    x1 = jax.random.normal(jax.random.key(0), (8, 2))

    def make(w, hp):
        return lambda x, t: x @ w * hp["scale"]

    ws = [jnp.eye(2) * (0.1 * i) + jnp.float32(0.01) * i for i in range(5)]
    refs = [weakref.ref(w) for w in ws]
    hp = {"scale": 1.0}
    for i, w in enumerate(ws):
        hp["scale"] = 1.0 + i  # (a mutable cell mutated between calls: each new lambda sees it)
        y, _ = gf.sample(make(w, hp), path, x1, prediction="velocity", solver="euler", steps=4)
        np.testing.assert_allclose(y, _euler(x1, w * (1.0 + i)), rtol=1e-6, atol=1e-6)
    del w, ws, y
    gc.collect()
    assert sum(r() is not None for r in refs) == 0  # (all 5 were alive before)

    global _GLOBAL_W, _GLOBAL_SCALE
    y0, _ = gf.sample(_global_model, path, x1, prediction="velocity", solver="euler", steps=4)
    old = _GLOBAL_W, _GLOBAL_SCALE
    try:
        _GLOBAL_W = 0.5 * jnp.eye(2)
        out = {}
        assert count_compiles(lambda: out.update(y1=gf.sample(_global_model, path, x1, prediction="velocity",
                                                               solver="euler", steps=4)[0])) == 0
        _GLOBAL_SCALE = 2.0  # (a Python global: read when traced, as by jax.jit; a new function sees it)
        y2, _ = gf.sample(lambda x, t: _global_model(x, t), path, x1, prediction="velocity", solver="euler", steps=4)
    finally:
        _GLOBAL_W, _GLOBAL_SCALE = old
    np.testing.assert_allclose(y0, _euler(x1, jnp.eye(2)), rtol=1e-6)
    np.testing.assert_allclose(out["y1"], _euler(x1, 0.5 * jnp.eye(2)), rtol=1e-6)  # (was y0: a constant)
    np.testing.assert_allclose(y2, _euler(x1, jnp.eye(2)), rtol=1e-6)  # (its lambda holds no array itself)


def test_closures_over_numpy_float_arrays_are_traced_too():
    """Parameters that reach a lambda as NumPy arrays (``jax.device_get``, ``np.load``, a pickle)
    were left in the function: their values were constants of the cached program, and the sampler
    kept returning the old weights' samples after the closure was rebound (a 50x change unseen).
    NumPy floating arrays are lifted as JAX arrays are: read at every call, with no recompile.
    NumPy scalars, integer and bool values stay constants read at trace time, as Python values:
    a shape from np.prod, a train=np.bool_(False) flag (which fail traced); a string array too."""
    path = gf.paths.linear()
    x1 = jax.random.normal(jax.random.key(0), (8, 2))
    params = {"w": np.eye(2, dtype=np.float32), "scale": np.ones(1, np.float32)}
    fn = lambda x, t: x @ params["w"] * params["scale"]  # noqa: E731
    y0, _ = gf.sample(fn, path, x1, prediction="velocity", solver="euler", steps=4)
    np.testing.assert_allclose(y0, _euler(x1, jnp.eye(2)), rtol=1e-6)
    params = {"w": 0.5 * np.eye(2, dtype=np.float32), "scale": np.full(1, 3.0, np.float32)}
    out = {}
    assert count_compiles(lambda: out.update(y=gf.sample(fn, path, x1, prediction="velocity", solver="euler",
                                                         steps=4)[0])) == 0
    np.testing.assert_allclose(out["y"], _euler(x1, 1.5 * jnp.eye(2)), rtol=1e-6)  # (was y0)
    assert isinstance(gf.sampling.as_pytree_fn(fn), gf.param.ClosureFn)

    w = jnp.eye(2)
    d, flag, half = np.prod(x1.shape[1:]), np.bool_(True), np.float64(0.5)
    concrete = lambda x, t: (x.reshape(-1, d) @ w if flag else x) * float(half)  # noqa: E731
    y, _ = gf.sample(concrete, path, x1, prediction="velocity", solver="euler", steps=4)
    np.testing.assert_allclose(y, _euler(x1, 0.5 * jnp.eye(2)), rtol=1e-6)
    names = np.array(["a", "b"])
    labelled = lambda x, t: x * len(names)  # noqa: E731
    assert gf.sampling.as_pytree_fn(labelled) is labelled


def test_closure_fn_rebuilds_cells_defaults_and_nested_functions():
    """ClosureFn's rebuilt function is the original: cells (an empty one too), positional and
    keyword defaults, a nested closure lifted in turn, a pytree with an unhashable leaf left in
    place; a function that uses no JAX array is returned as is; one function object gives one
    tree structure (one compiled program), another function another."""
    w, b = jnp.array([1.0, 2.0]), jnp.array([0.5, -0.5])

    @dataclasses.dataclass
    class Config:  # (unhashable: eq without frozen)
        width: int = 3

    def outer(w, b, scale):
        inner = lambda x: x * w  # noqa: E731
        bundle = {"offset": b, "config": Config()}

        def f(x, t, c=b, *, k=scale):
            return inner(x) + c * k + later * 0.0 + t[:, None] + bundle["offset"] * bundle["config"].width
        later = 1.0
        return f

    f = outer(w, b, 3.0)
    g = gf.sampling.as_pytree_fn(f)
    assert isinstance(g, gf.param.ClosureFn)
    leaves = jax.tree_util.tree_leaves(g)
    assert any(leaf is b for leaf in leaves) and any(leaf is w for leaf in leaves)  # (w via the nested lambda)
    x, t = jnp.ones((3, 2)), jnp.full((3,), 0.25)
    np.testing.assert_array_equal(g(x, t), f(x, t))
    assert jax.tree_util.tree_structure(gf.sampling.as_pytree_fn(f)) == jax.tree_util.tree_structure(g)
    f2 = outer(2 * w, b, 3.0)
    assert jax.tree_util.tree_structure(gf.sampling.as_pytree_fn(f2)) != jax.tree_util.tree_structure(g)
    np.testing.assert_array_equal(jax.jit(lambda h: h(x, t))(gf.sampling.as_pytree_fn(f2)), f2(x, t))

    def uses_nothing(x, t, scale=2.0):
        return scale * x

    assert gf.sampling.as_pytree_fn(uses_nothing) is uses_nothing

    def fact(n):  # (recursive: its cell holds itself)
        return 1 if n <= 1 else n * fact(n - 1)

    assert gf.sampling.as_pytree_fn(fact) is fact


def test_registered_run_gets_the_grid_as_is(gauss2):
    """A solver registered with its own run (register's documented signature) is called with the
    steps + 1 times and no num_steps: it was handed a grid padded to 64 times (an AB2 step's
    h / h_prev = 0/0 gave NaN samples, 64 evaluations for 20 steps) and num_steps= (TypeError for
    a run without **options); a spec that declares a stepper with a run of its own crashed on
    spec.run.keywords."""
    def ab2_run(model, ts, x, key, **options):
        f0 = model.velocity(x, ts[0])
        x = x + (ts[1] - ts[0]) * f0

        def body(c, i):
            x, f_prev = c
            h, h_prev = ts[i + 1] - ts[i], ts[i] - ts[i - 1]
            f = model.velocity(x, ts[i])
            r = h / h_prev
            return (x + h * ((1 + 0.5 * r) * f - 0.5 * r * f_prev), f), None

        (x, _), _ = jax.lax.scan(body, (x, f0), jnp.arange(1, ts.shape[0] - 1))
        return x, ts.shape[0] - 1, None, {"num_steps": jnp.asarray(ts.shape[0] - 1)}

    def euler_run(model, ts, x, key, rtol, atol, max_steps, save_trajectory):  # no **options
        x, _ = jax.lax.scan(lambda x, tt: (x + (tt[1] - tt[0]) * model.velocity(x, tt[0]), None), x, (ts[:-1], ts[1:]))
        return x, ts.shape[0] - 1, None, {}

    ddim = gf.sampling.solvers()["ddim"].stepper
    for name, run, order, stepper in (("test_ab2", ab2_run, 2, None), ("test_euler_run", euler_run, 1, None),
                                      ("test_euler_stepper", euler_run, 1, ddim)):
        gf.sampling.register(gf.sampling.SolverSpec(name, order, False, 1, False, run, stepper=stepper))
        path = gf.paths.linear()
        x1 = gauss2.prior_sample(jax.random.key(0), 64, path, 1.0)
        ref = gauss2.flow_map(x1, 1.0, 0.0, path)
        errs = []
        for n in (10, 40):
            x, info = gf.sample(gauss2.model(path, "velocity"), path, x1, prediction="velocity", solver=name, steps=n)
            assert int(info.nfe) == n, (name, int(info.nfe))
            assert bool(jnp.all(jnp.isfinite(x))), name
            errs.append(float(jnp.sqrt(jnp.mean((x - ref) ** 2))))
        assert order - 0.3 < np.log2(errs[0] / errs[1]) / 2 < order + 0.5, (name, errs)
    with pytest.raises(ValueError, match="support the deterministic scan solvers"):  # (AttributeError: keywords)
        gf.sampling.optimize_schedule(gauss2.model(path, "velocity"), path, x1, prediction="velocity", steps=4,
                                      solver="test_euler_stepper")


def test_register_an_adaptive_diffrax_solver_without_fsal(gauss2):
    """diffrax_solver(adaptive=True) with a solver that is not first-same-as-last (diffrax.Heun,
    with its embedded Euler error estimate): it failed inside Diffrax with a pytree structure error
    (the FSAL state (first_step, f0) was handed to every adaptive solver)."""
    import diffrax

    gf.sampling.register(gf.sampling.diffrax_solver("test_heun_adaptive", diffrax.Heun(), order=2, nfe_per_step=2,
                                                    adaptive=True))
    path = gf.paths.linear()
    x1 = gauss2.prior_sample(jax.random.key(0), 64, path, 1.0)
    ref = gauss2.flow_map(x1, 1.0, 0.0, path)
    x, info = gf.sample(gauss2.model(path, "velocity"), path, x1, prediction="velocity", solver="test_heun_adaptive",
                        rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(x - ref))) < 1e-2
    assert int(info.nfe) == 2 * int(info.stats["num_steps"])


def test_diffrax_solver_reads_its_counts_from_the_tableau(gauss2):
    """diffrax_solver's nfe_per_step / nfe_init / order come from an explicit Runge-Kutta solver's
    tableau, and info.nfe equals the evaluations executed (a host callback) for fixed steps (the
    bucketed loop and the saved trajectory) and adaptive steps; a count that disagrees with the
    tableau is refused (Bosh3 registered with nfe_per_step=2 reported 2 of its 3 per step)."""
    import diffrax

    with pytest.raises(ValueError, match=r"nfe_per_step=2 does not match Bosh3's tableau, which gives 3"):
        gf.sampling.diffrax_solver("test_bosh3_wrong", diffrax.Bosh3(), nfe_per_step=2)
    with pytest.raises(ValueError, match=r"nfe_per_step is needed for ReversibleHeun"):  # (not Runge-Kutta)
        gf.sampling.diffrax_solver("test_reversible_heun", diffrax.ReversibleHeun())
    fixed = gf.sampling.register(gf.sampling.diffrax_solver("test_bosh3_counted", diffrax.Bosh3()))
    adaptive = gf.sampling.register(gf.sampling.diffrax_solver("test_bosh3_adaptive", diffrax.Bosh3(), adaptive=True))
    assert fixed.order == 3 and fixed.nfe_per_step == 3 and adaptive.nfe_per_step is None
    path = gf.paths.linear()
    model = gauss2.model(path, "velocity")
    calls = []

    def fn(x, t):
        jax.debug.callback(lambda tt: calls.append(1), t)
        return model(x, t)

    x1 = gauss2.prior_sample(jax.random.key(0), 8, path, 1.0)
    for solver, kw in (("test_bosh3_counted", dict(steps=7)), ("test_bosh3_counted", dict(steps=7, save_trajectory=True)),
                       ("test_bosh3_adaptive", dict(rtol=1e-4, atol=1e-4))):
        calls.clear()
        x, info = gf.sample(fn, path, x1, prediction="velocity", solver=solver, t_end=1e-3, **kw)
        jax.block_until_ready(x)
        jax.effects_barrier()
        assert len(calls) == int(info.nfe), (solver, kw, len(calls), int(info.nfe))
    assert int(info.nfe) == 1 + 3 * int(info.stats["num_steps"])


def test_registered_diffrax_solver_that_evaluates_at_the_end_is_refused_where_the_velocity_is_singular(gauss2):
    # a Diffrax solver from diffrax_solver with a stage at c = 1 (Heun) or an FSAL stage (Bosh3,
    # Tsit5) evaluates an x0 model's velocity at sigma(t_end) = 0 (0/0): it gave inf / NaN samples
    # silently, where the built-in heun / tsit5 are refused by name; Ralston (no end stage) still runs
    import diffrax

    for name, solver, kw in (("test_end_heun", diffrax.Heun(), {}),
                             ("test_end_bosh3", diffrax.Bosh3(), {}),
                             ("test_end_tsit5", diffrax.Tsit5(), dict(adaptive=True))):
        gf.sampling.register(gf.sampling.diffrax_solver(name, solver, **kw))
    gf.sampling.register(gf.sampling.diffrax_solver("test_end_ralston", diffrax.Ralston()))
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    for path, kind in ((gf.paths.linear(), "x0"), (gf.paths.vp_linear(), "eps")):
        for name in ("test_end_heun", "test_end_bosh3", "test_end_tsit5"):
            for save in (False, True):
                with pytest.raises(ValueError, match=f"t_end=0.0 has sigma.*{name}"):
                    gf.sample(gauss2.model(path, kind), path, x1, prediction=kind, solver=name, steps=8, t_end=0.0,
                              save_trajectory=save, denoise=False)
    path = gf.paths.linear()
    x, _ = gf.sample(gauss2.model(path, "x0"), path, x1, prediction="x0", solver="test_end_ralston", steps=8)
    assert bool(jnp.all(jnp.isfinite(x)))


def test_adaptive_tolerances_both_zero_or_traced_are_refused_by_name(gauss2):
    # rtol = atol = 0 ran max_steps rejected steps, then "maximum number of solver steps was reached.
    # Try increasing max_steps"; a traced rtol passed the check, then failed at float(rtol) as an
    # unnamed ConcretizationTypeError
    path = gf.paths.vp_linear()
    fn = gauss2.model(path, "eps")
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    with pytest.raises(ValueError, match="rtol and atol are both 0"):
        gf.sample(fn, path, x1, prediction="eps", solver="tsit5", rtol=0.0, atol=0.0)
    with pytest.raises(ValueError, match="rtol must be a concrete real"):
        jax.jit(lambda r: gf.sample(fn, path, x1, prediction="eps", solver="tsit5", rtol=r)[0])(1e-4)
    # one zero tolerance is fine, and fixed-step solvers ignore them
    _, info = gf.sample(fn, path, x1, prediction="eps", solver="tsit5", rtol=0.0, atol=1e-5)
    assert int(info.nfe) > 0
    _, info = gf.sample(fn, path, x1, prediction="eps", solver="heun", steps=4, rtol=0.0, atol=0.0)
    assert int(info.nfe) == 9


def test_a_bad_key_for_a_stochastic_solver_is_named(gauss2):
    # key=0, a float pair or a split of keys failed inside JAX / Diffrax ("invalid PRNG key data",
    # "fold_in accepts a single key") without naming key
    path = gf.paths.vp_linear()
    fn = gauss2.model(path, "eps")
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    for solver in ("euler_maruyama", "shark", "ddpm"):
        for bad in (0, jnp.array([0.5, 0.2]), jax.random.split(jax.random.key(0), 2)):
            with pytest.raises(TypeError, match="key must be one PRNG key"):
                gf.sample(fn, path, x1, prediction="eps", solver=solver, steps=4, key=bad)
        for good in (jax.random.key(0), jax.random.PRNGKey(0)):
            x, _ = gf.sample(fn, path, x1, prediction="eps", solver=solver, steps=4, key=good)
            assert bool(jnp.all(jnp.isfinite(x)))
    xs = jax.vmap(lambda k: gf.sample(fn, path, x1, prediction="eps", solver="euler_maruyama", steps=4, key=k)[0])(
        jax.random.split(jax.random.key(1), 3))
    assert xs.shape == (3, 4, 2)


@pytest.mark.parametrize("solver, option", [("ddim", dict(eta=0.5)), ("edm_heun", dict(churn=0.5))])
@pytest.mark.parametrize("bad_key", [0, "split"])
def test_sample_bad_key_named_for_option_stochastic_solvers(solver, option, bad_key):
    """ddim with eta > 0 and edm_heun with churn > 0 draw noise like the stochastic solvers, so a
    malformed key must be refused the same way, naming `key` (it failed inside JAX as "invalid PRNG
    key data" / a fold_in error)."""
    path = gf.paths.vp_cosine()
    g = gf.oracles.Gaussian.diagonal(jnp.array([1.0, -2.0]), jnp.array([0.5, 2.0]))
    x1 = path.prior_sample(jax.random.key(0), (4, 2))
    key = jax.random.split(jax.random.key(0), 2) if bad_key == "split" else bad_key
    with pytest.raises(TypeError, match=r"key must be one PRNG key"):
        gf.sample(g.model(path, "eps"), path, x1, prediction="eps", solver=solver, steps=3, key=key, **option)


def test_tolerances_of_a_fixed_step_solve_do_not_recompile(gauss2, caplog):
    """rtol / atol are unused by fixed-step solvers (gf.sample) and fixed-grid log_prob solves: a
    new value recompiled the whole program; the results do not depend on them."""
    import logging

    path = gf.paths.linear()
    fn = gauss2.model(path, "velocity")
    x1 = gauss2.prior_sample(jax.random.key(0), 8, path, 1.0)
    x = gauss2.sample(jax.random.key(1), 8)
    first = (gf.sample(fn, path, x1, prediction="velocity", solver="heun", steps=5, rtol=1e-3)[0],
             gf.log_prob(fn, path, x, prediction="velocity", solver="heun", steps=5, rtol=1e-3)[0])
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG, logger="jax"):
        caplog.clear()
        again = (gf.sample(fn, path, x1, prediction="velocity", solver="heun", steps=5, rtol=1e-6, atol=1e-7)[0],
                 gf.log_prob(fn, path, x, prediction="velocity", solver="heun", steps=5, rtol=1e-6, atol=1e-7)[0])
        compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert not compiled, compiled
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_tolerances_of_an_adaptive_solve_are_traced(gauss2):
    """A sweep over rtol / atol (error or NFE against tolerance) reuses one compiled program, in
    gf.sample's adaptive solvers and gf.log_prob's adaptive solve: they were compile-time
    constants, a new value compiled the solve again (~4 s each on a CPU; recompilation audit).
    Each tolerance still takes effect: a tighter one costs more NFE and gives a smaller error."""
    path = gf.paths.linear()
    fn = gauss2.model(path, "velocity")
    x1 = gauss2.prior_sample(jax.random.key(0), 8, path, 1.0)
    x = gauss2.sample(jax.random.key(1), 8)
    exact = gauss2.flow_map(x1, 1.0, 0.0, path)
    runs = {}
    for tol in (1e-2, 1e-4, 1e-6):
        call = lambda: runs.setdefault(tol, (gf.sample(fn, path, x1, prediction="velocity", solver="tsit5", rtol=tol,
                                                       atol=tol),
                                             gf.log_prob(fn, path, x, prediction="velocity", rtol=tol, atol=tol)))
        n = count_compiles(call)
        assert n == 0 or tol == 1e-2, (tol, n)
    (s2, i2), (s6, i6) = runs[1e-2][0], runs[1e-6][0]
    assert int(i6.nfe) > int(i2.nfe)
    assert float(jnp.max(jnp.abs(s6 - exact))) < 0.1 * float(jnp.max(jnp.abs(s2 - exact)))
    lp2, lp6, truth = runs[1e-2][1][0], runs[1e-6][1][0], gauss2.log_prob(x, 0.0, path)
    assert float(jnp.max(jnp.abs(lp6 - truth))) < float(jnp.max(jnp.abs(lp2 - truth)))


def test_an_adaptive_solve_compiles_once_for_every_step_count(gauss2):
    """Adaptive solvers ignore ``steps`` (without a saved trajectory they read only the grid's
    ends), yet compiled once per value: ~10 MB of programs per value in a sweep. The samples and
    NFE are the same for every count; info.ts is still the requested grid."""
    path = gf.paths.vp_cosine()
    fn = gauss2.model(path, "eps")
    x1 = gauss2.prior_sample(jax.random.key(2), 8, path, 1.0)
    runs = {}
    for steps in (7, 20, 33):
        n = count_compiles(lambda: runs.setdefault(steps, gf.sample(fn, path, x1, prediction="eps", solver="tsit5",
                                                                    steps=steps, schedule="karras")))
        assert n == 0 or steps == 7, (steps, n)
    for steps, (x, info) in runs.items():
        np.testing.assert_array_equal(x, runs[7][0])
        assert int(info.nfe) == int(runs[7][1].nfe) and info.ts.shape == (steps + 1,)
        np.testing.assert_array_equal(info.ts, gf.sampling.time_grid(path, steps, "karras"))
    exact = gauss2.flow_map(x1, 1.0, 0.0, path)
    assert float(jnp.max(jnp.abs(runs[7][0] - exact))) < 1e-3
    _, info = gf.sample(fn, path, x1, prediction="eps", solver="tsit5", steps=5, save_trajectory=True)
    assert info.trajectory.shape == (6,) + x1.shape  # (a saved trajectory still follows the grid)


def test_prepared_grids_are_reused_only_for_equal_arguments(gauss2):
    """``gf.sample`` memoises its grid and solver coefficients (a repeat call skips ~20 eager ops
    and host reads). A repeat call gives the same samples as a fresh preparation; a path with other
    parameters, another step count, start or schedule gets its own grid; an explicit grid is
    keyed by its values, a callable schedule not at all; under ``jit`` the grid of a concrete
    path is built as constants and kept."""
    from genflow.sampling import _core

    _core._PREPARED.clear()
    x1 = jax.random.normal(jax.random.key(0), (32, 2))
    kw = dict(prediction="x0", solver="dpm++2m", schedule="karras")

    def run(path, steps=12, **extra):
        return gf.sample(gauss2.model(path, "x0"), path, x1, steps=steps, **{**kw, **extra})

    slow, fast = gf.paths.vp_linear(beta_max=20.0), gf.paths.vp_linear(beta_max=10.0)
    first, info = run(slow)
    assert len(_core._PREPARED) == 1
    again, info_again = run(gf.paths.vp_linear(beta_max=20.0))  # an equal path built anew: a hit
    assert len(_core._PREPARED) == 1
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(info.ts, info_again.ts)
    # other parameters, steps, ends or options: their own entries, their own (correct) grids
    for path, extra in ((fast, {}), (slow, {"steps": 9}), (slow, {"t_start": 0.9}), (slow, {"schedule": "logsnr"})):
        x, inf = run(path, **extra)
        expect = gf.sampling.time_grid(path, extra.get("steps", 12), extra.get("schedule", "karras"),
                                       extra.get("t_start"))
        np.testing.assert_allclose(inf.ts, expect, rtol=1e-6)
        _core._PREPARED.clear()
        np.testing.assert_allclose(x, run(path, **extra)[0], rtol=1e-6, atol=1e-6)  # = a fresh preparation
    assert not np.allclose(run(fast)[0], first)  # (the parameters matter: not a stale hit)
    # explicit grids: keyed by their values (an optimized grid passed batch after batch)
    _core._PREPARED.clear()
    np.testing.assert_allclose(run(slow, schedule=info.ts)[0], first, rtol=1e-6, atol=1e-6)
    run(slow, schedule=np.asarray(info.ts))
    assert len(_core._PREPARED) == 1
    other = np.asarray(info.ts).copy()
    other[3] = 0.5 * (other[2] + other[3])
    x_other, info_other = run(slow, schedule=other)
    np.testing.assert_array_equal(info_other.ts, other)
    assert len(_core._PREPARED) == 2 and not np.allclose(x_other, first)
    run(slow, schedule=lambda p, n, t_start, t_end: gf.sampling.time_grid(p, n, "karras", t_start, t_end))
    assert len(_core._PREPARED) == 2  # (a callable may not be pure: prepared afresh)
    # under jit, from an empty memo: the grid is built from the concrete path (constants of the
    # trace) and kept; a kept one serves a later trace; a traced path's parameters are refused
    _core._PREPARED.clear()
    jitted = jax.jit(lambda x: gf.sample(gauss2.model(slow, "x0"), slow, x, steps=12, **kw)[0])
    np.testing.assert_allclose(jitted(x1), first, rtol=1e-5, atol=1e-6)
    assert len(_core._PREPARED) == 1
    assert not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(list(_core._PREPARED.values())))
    np.testing.assert_allclose(jax.jit(lambda x: gf.sample(gauss2.model(slow, "x0"), slow, x, steps=12, **kw)[0])(x1),
                               first, rtol=1e-5, atol=1e-6)
    with pytest.raises(jax.errors.ConcretizationTypeError):
        jax.jit(lambda p, x: gf.sample(gauss2.model(p, "x0"), p, x, steps=12, **kw)[0])(slow, x1)
    # a key never equates 12 with 12.0 or 1 with True (the checks refusing those run on a miss);
    # an entry whose arrays were deleted (a donated info.ts) is prepared again; a path function
    # holding data (a closure) is not kept alive by the memo; array options are keyed by value
    _core._PREPARED.clear()
    run(slow)
    with pytest.raises(ValueError, match="steps"):
        run(slow, steps=12.0)
    with pytest.raises(ValueError, match="t_start"):
        run(slow, t_start=True)
    _, info_d = run(slow)
    info_d.ts.delete()
    x_d, info_d = run(slow)
    assert not info_d.ts.is_deleted()
    np.testing.assert_array_equal(x_d, first)
    n = len(_core._PREPARED)
    scale = jnp.float32(1.0)
    closure = gf.paths.Path(alpha_fn=lambda t: scale * (1.0 - t), sigma_fn=lambda t: t, name="closure")
    gf.sample(gauss2.model(closure, "x0"), closure, x1, prediction="x0", solver="dpm++2m", steps=8, t_end=1e-3)
    assert len(_core._PREPARED) == n
    outs = [gf.sample(gauss2.model(slow, "x0"), slow, x1, prediction="x0", solver="dpm++3m", steps=6,
                      schedule="karras", d2_weight=w)[0] for w in (1.0, 2.0, 1.0)]
    assert len(_core._PREPARED) == n + 2 and not np.allclose(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    # bounded
    for n in range(2, 2 + _core._PREPARED_SIZE + 5):
        run(slow, steps=n)
    assert len(_core._PREPARED) == _core._PREPARED_SIZE


def test_gradient_through_the_sampler_matches_the_exact_flow_map(gauss2):
    """jax.grad through gf.sample against the Jacobian of the closed-form Gaussian flow map (with 48
    Heun steps the discretisation error is ~1e-4): with respect to x1, with and without a saved
    trajectory, under the user's jit (grad of jit and jit of grad), and with respect to a parameter
    the model closes over (the mean, against the flow map's own derivative)."""
    path = gf.paths.linear()
    x1 = gauss2.prior_sample(jax.random.key(0), 3, path, 1.0)
    w = jnp.array([0.3, -1.1])

    def through_sampler(x, save=False, solver="heun", steps=48):
        x0, _ = gf.sample(gauss2.model(path, "velocity"), path, x, prediction="velocity", solver=solver,
                          steps=steps, save_trajectory=save)
        return jnp.sum(x0 @ w)

    exact = jax.grad(lambda x: jnp.sum(gauss2.flow_map(x, 1.0, 0.0, path) @ w))(x1)
    for f in (lambda x: through_sampler(x, True), through_sampler):  # (a traced step count was a dynamic fori_loop)
        np.testing.assert_allclose(jax.grad(f)(x1), exact, atol=2e-3)
    np.testing.assert_allclose(jax.grad(jax.jit(through_sampler))(x1), exact, atol=2e-3)
    np.testing.assert_allclose(jax.jit(jax.grad(through_sampler))(x1), exact, atol=2e-3)
    # a scan solver (the grid's precomputed coefficients) and a Diffrax one, against each other's exact map
    for solver in ("dpm++2m", "midpoint"):
        np.testing.assert_allclose(jax.grad(lambda x: through_sampler(x, solver=solver, steps=64))(x1), exact,
                                   atol=3e-3, err_msg=solver)
    # forward mode too (Diffrax's default adjoint is a custom_vjp: jax.jvp failed for every Diffrax solver)
    e = jnp.ones_like(x1)
    exact_jvp = jax.jvp(lambda x: jnp.sum(gauss2.flow_map(x, 1.0, 0.0, path) @ w), (x1,), (e,))[1]
    for solver in ("heun", "midpoint", "dpm++2m"):
        tangent = jax.jvp(lambda x: through_sampler(x, solver=solver, steps=64), (x1,), (e,))[1]
        np.testing.assert_allclose(tangent, exact_jvp, atol=3e-3, err_msg=solver)

    def mean_model(mu):
        g = gf.oracles.Gaussian.full(mu, gauss2.cov)
        return g, (lambda x, t: g.model(path, "velocity")(x, t))  # a closure over the traced mean

    def sampled(mu):
        return jnp.sum(gf.sample(mean_model(mu)[1], path, x1, prediction="velocity", solver="heun", steps=48)[0] @ w)

    def mapped(mu):
        return jnp.sum(mean_model(mu)[0].flow_map(x1, 1.0, 0.0, path) @ w)

    np.testing.assert_allclose(jax.grad(sampled)(gauss2.mean), jax.grad(mapped)(gauss2.mean), atol=2e-3)
    # eagerly, the step count is still traced (one compiled sampler for every count of a bucket)
    from genflow.sampling import _core

    seen = []

    def probe(x):
        seen.append(_core._under_transformation())
        return x

    probe(x1), jax.jit(probe)(x1), jax.grad(lambda x: jnp.sum(probe(x)))(x1), jax.vmap(probe)(x1)
    assert seen == [False, True, True, True]


def test_adaptive_solves_under_jit_with_a_closed_over_batch(gauss2):
    """An adaptive gf.sample / gf.log_prob inside a user's jit, with x1 / x a concrete array closed over
    (the parameters traced): the finite-rows check converted a tracer to NumPy
    (TracerArrayConversionError)."""
    path = gf.paths.linear()
    x1 = gauss2.prior_sample(jax.random.key(0), 4, path, 1.0)

    def sampled(mean):
        g = gf.oracles.Gaussian.full(mean, gauss2.cov)
        return gf.sample(g.model(path, "velocity"), path, x1, prediction="velocity", solver="tsit5")[0]

    def logp(mean):
        g = gf.oracles.Gaussian.full(mean, gauss2.cov)
        return gf.log_prob(g.model(path, "velocity"), path, x1, prediction="velocity")[0]

    for f in (sampled, logp):
        np.testing.assert_allclose(jax.jit(f)(gauss2.mean), f(gauss2.mean), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logp(gauss2.mean), gauss2.log_prob(x1, 0.0, path), rtol=1e-3)  # (the oracle's density)


def test_debug_nans_turned_on_after_a_first_call_is_honoured():
    """JAX's C++ dispatch cache (keyed by the Python function and the static arguments) kept the
    entry made with jax_debug_nans off: a sampler, gf.log_prob or a posterior sampler that had run
    once returned NaN without the FloatingPointError the user turned on (a fresh process raised;
    config audit)."""
    path = gf.paths.linear()
    fn = lambda x, t: jnp.sqrt(x - 0.5) * 0 + x  # noqa: E731  (NaN where x < 0.5)
    x1 = jnp.asarray(np.random.RandomState(0).randn(4, 2), jnp.float32)
    op = gf.inverse.operators.Mask(jnp.array([1.0, 0.0]))
    calls = {solver: functools.partial(gf.sample, fn, path, x1, prediction="velocity", solver=solver, steps=4)
             for solver in ("euler", "heun", "dpm++2m")}
    calls["log_prob"] = functools.partial(gf.log_prob, fn, path, x1, prediction="velocity", solver="heun", steps=4)
    calls["dps"] = functools.partial(gf.inverse.posterior_sample, fn, path, x1, op.forward(x1), op,
                                     key=jax.random.key(0), prediction="velocity", method="dps", steps=4)
    for name, call in calls.items():
        assert bool(jnp.any(jnp.isnan(call()[0]))), name
        jax.config.update("jax_debug_nans", True)  # (set globally: a `with jax.debug_nans(True)` block was seen)
        try:
            with pytest.raises(FloatingPointError, match="nan"):
                call()
        finally:
            jax.config.update("jax_debug_nans", False)
        assert bool(jnp.any(jnp.isnan(call()[0]))), name  # (off again: unchecked, as before)


def test_adaptive_solver_names_non_finite_rows_of_x1(gauss2):
    path = gf.paths.linear()
    x1 = jnp.ones((4, 2)).at[2, 1].set(jnp.inf)
    with pytest.raises(ValueError, match=r"x1 has non-finite entries .* rows \[2\]"):
        gf.sample(gauss2.model(path, "velocity"), path, x1, prediction="velocity", solver="tsit5")


def test_which_grid_keeps_ten_steps_of_the_sde_solvers_stable():
    """What solvers()' descriptions advise for euler_maruyama / pc (the uniform grid) and shark
    (schedule='logsnr') at 10 steps, from t = 0.999 on the linear path, on the eight-Gaussian oracle
    (std 0.2 at radius 2): sliced W2 to the data, uniform / log-SNR, measured EM 0.12 / 9.4,
    ShARK 1.18 / 0.15, pc 0.08 / 9.3 (the notebook's trained model gives the same picture)."""
    path = gf.paths.linear()
    ang = jnp.arange(8) * 2 * jnp.pi / 8
    gm = gf.oracles.GaussianMixture(jnp.zeros(8), 2.0 * jnp.stack([jnp.cos(ang), jnp.sin(ang)], 1),
                                    jnp.full((8, 2), 0.04))
    noise = path.prior_sample(jax.random.key(5), (1024, 2))
    data = gm.sample(jax.random.key(6), 1024)

    def sw2(solver, schedule):
        x, _ = gf.sample(gm.model(path, "velocity"), path, noise, prediction="velocity", solver=solver,
                         key=jax.random.key(7), t_start=0.999, steps=10, schedule=schedule)
        return float(gf.metrics.sliced_w2(x, data, jax.random.key(8)))

    for solver, good, bad in (("euler_maruyama", "uniform", "logsnr"), ("shark", "logsnr", "uniform"),
                              ("pc", "uniform", "logsnr")):
        w_good, w_bad = sw2(solver, good), sw2(solver, bad)
        assert w_good < 0.3 and w_bad > 0.6, (solver, w_good, w_bad)
        advice = "give it schedule='logsnr'" if good == "logsnr" else "keep the uniform grid"
        assert advice in gf.sampling.solvers()[solver].description, solver


GRID_GRAD_CASES = (
    # (path, solver, grid, whether the last time has a checked derivative)
    [("vp_cosine", s, "fixed", False) for s in ("pc", "ddpm", "edm_heun_churn", "restart", "dpm++3s", "unipc")]
    + [("vp_linear", s, "karras", True) for s in ("dpm++2m", "dpm++3m", "deis", "unipc", "dpm++2s", "dpm++3s",
                                                   "dpm++2m_hb", "ddim", "edm_heun_churn")]
    + [("edm", "edm_heun_churn", "karras", False), ("vp_linear", "edm_heun", "karras", True)]
    # (solver options: "name:order=3" is gf.sample's solver="name", order=3)
    + [("vp_linear", "unipc:order=3", "karras", True), ("vp_cosine", "unipc:order=3", "fixed", False),
       ("vp_linear", "deis:order=2", "karras", True)]
    # ("+scan": the model as a network of many arrays, whose stages run in a scan over stage buffers)
    + [("vp_cosine", "restart+scan", "fixed", False), ("vp_cosine", "pc+scan", "fixed", False),
       ("vp_linear", "dpm++3s+scan", "karras", True)]
)


@pytest.mark.parametrize("pname, solver, grid, check_last", GRID_GRAD_CASES)
def test_gradient_with_respect_to_the_grid_times_is_finite_and_right(pname, solver, grid, check_last):
    """d samples / d ts (a schedule learnt by gradient, as optimize_schedule's global objective
    does, or a start time fitted through the sampler) against central differences, in float64.
    It was NaN or wrong:
    - sqrt(max(v, 0))'s infinite slope where a noise coefficient vanishes: ddpm's step into
      sigma = 0, restart everywhere, edm_heun_churn at t_start above s_tmax;
    - the padded steps of a grid shorter than its bucket (h = 0) read the real last times: NaN at
      ts[-1] for every multistep / single-step solver (and ts[-2] for dpm++3m / deis), pc's
      g^2 = inf at sigma = 0 times the padded dt = 0;
    - EDM churn capped at the start level: its stage time equals ts[0] up to rounding, so a clip
      to [t_end, t_start] split or dropped d/d ts[0] (19x off on edm), and sqrt0 of a rounding-level
      variance gave 4e8 for 0.18 (the std is now computed from the log-SNRs, exactly 0 there).
    - UniPC with order=3: the weights of the orders whose history does not exist yet solve a
      singular system (0/0), discarded forward but NaN backward; optimize_schedule then never
      moved a UniPC-3 grid (its initial grid came back, with no error).
    A singular end (t = 0 with sigma = 0) is only checked finite: the grid's coefficients there are
    taken as constants (a convention), pc's Euler step length is not."""
    solver, _, opt = solver.partition(":")
    options = {k: int(v) for k, v in (o.split("=") for o in opt.split(",") if o)}
    solver, scan = solver.removesuffix("+scan"), solver.endswith("+scan")
    with jax.enable_x64(True):
        g = gf.oracles.Gaussian.full(jnp.array([0.3, -0.5]), jnp.array([[1.0, 0.2], [0.2, 0.5]]))
        model = g.model(path := gf.paths.get(pname), "eps")
        if scan:
            model = many_arrays(model)
        x1 = jax.random.normal(jax.random.key(0), (3, 2), jnp.float64)
        w = jax.random.normal(jax.random.key(2), (3, 2), jnp.float64)
        if grid == "fixed":
            ts = jnp.array([0.99, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0])
        else:
            ts = gf.sampling.time_grid(path, 6, "karras", 0.8, None).astype(jnp.float64)

        def f(ts):
            x, _ = gf.sample(model, path, x1, prediction="eps", solver=solver, schedule=ts, steps=6,
                             key=jax.random.key(1), **options)
            return jnp.sum(x * w)

        # (one compiled program gives both the gradient and the values the differences take: a
        # separate jax.jit(f) compiled the sampler a second time)
        f_and_grad = jax.jit(jax.value_and_grad(f))
        grad = np.asarray(f_and_grad(ts)[1])
        assert np.all(np.isfinite(grad)), grad
        h = 1e-6
        for j in range(len(ts) - (0 if check_last else 1)):
            e = jnp.zeros_like(ts).at[j].set(h)
            fd = (float(f_and_grad(ts + e)[0]) - float(f_and_grad(ts - e)[0])) / (2 * h)
            np.testing.assert_allclose(grad[j], fd, rtol=1e-4, atol=1e-6, err_msg=f"{pname} {solver}, t index {j}")


@pytest.mark.parametrize("solver", ["tsit5", "dopri5"])
def test_adaptive_tolerance_holds_per_sample_in_a_large_batch(solver):
    """The step-size controller's error norm was Diffrax's RMS over the whole batch, which dilutes
    one sample's error by ~1/sqrt(B): at rtol = atol = 1e-6 the worst of 1,024 mixture samples was
    1.8e-4 (tsit5) / 5.3e-4 (dopri5) off the exact flow map, against 1.8e-5 / 2.0e-4 for the same
    sample solved alone. The norm is now the worst per-sample RMS."""
    with jax.enable_x64(True):
        path = gf.paths.linear()
        g = gf.oracles.GaussianMixture.random(jax.random.key(3), k=4, dim=2)
        x = jax.random.normal(jax.random.key(0), (1024, 2)) * path.sigma(0.999)
        ref = np.asarray(g.flow_map(x, 0.999, 0.0, path))
        xb, _ = gf.sample(g.model(path, "velocity"), path, x, prediction="velocity", solver=solver, t_start=0.999,
                          rtol=1e-6, atol=1e-6, denoise=False)
    worst = float(np.abs(np.asarray(xb) - ref).max())
    assert worst < 3e-5, worst  # (measured: 4.2e-6 tsit5, 2.1e-5 dopri5)


def test_adaptive_max_steps_and_edm_churn_bounds_are_what_they_say(gauss2):
    path = gf.paths.vp_linear()
    x1, _ = _setup(path, gauss2)
    fn = gauss2.model(path, "eps")
    kw = dict(prediction="eps", solver="tsit5", rtol=1e-7, atol=1e-7, t_end=1e-3, max_steps=10)
    # max_steps was raised to steps + 1 for adaptive solvers: with the default steps=50 this ran 18 steps
    for steps in (5, 50):
        with pytest.raises(Exception, match="maximum number of solver steps"):
            gf.sample(fn, path, x1[:8], steps=steps, **kw)
    # s_tmin > s_tmax churned nothing, silently (the samples were the deterministic sampler's)
    with pytest.raises(ValueError, match="s_tmin=5.0 > s_tmax=1.0 churns none"):
        gf.sample(fn, path, x1[:8], prediction="eps", solver="edm_heun", steps=8, churn=10.0, s_tmin=5.0, s_tmax=1.0,
                  key=jax.random.key(0))
    # sigma_max = inf was blamed on float32 resolution ("enable jax.enable_x64")
    with pytest.raises(ValueError, match="expected 0 < sigma_min < sigma_max < inf"):
        gf.sampling.time_grid(gf.paths.linear(), 4, "karras", sigma_max=float("inf"))


def test_edm_and_ve_grids_are_memoised_but_data_closures_are_not(gauss2):
    """edm / ve's log_snr is a closure over their sigma function, which the memo took for data: their
    grids were prepared afresh on every gf.sample call (~1.5 ms of Python per call). A closure over a
    function that itself closes over data is still not kept."""
    from genflow.sampling import _core

    x1 = jax.random.normal(jax.random.key(0), (8, 2))
    for make in (gf.paths.edm, lambda: gf.paths.ve(0.01, 50.0)):
        _core._PREPARED.clear()
        for _ in range(2):
            path = make()  # (an equal path built anew: a hit)
            gf.sample(gauss2.model(path, "x0"), path, x1, prediction="x0", solver="dpm++2m", steps=8)
        assert len(_core._PREPARED) == 1, path.name
    scale = jnp.float32(1.0)
    inner = lambda t: scale * t  # noqa: E731  (holds data)
    outer = lambda t: inner(t)  # noqa: E731  (a closure over a function that holds data)
    held = gf.paths.Path(alpha_fn=lambda t: 1.0 - t, sigma_fn=outer, name="held")
    _core._PREPARED.clear()
    gf.sample(gauss2.model(held, "x0"), held, x1, prediction="x0", solver="dpm++2m", steps=8, t_end=1e-3)
    assert len(_core._PREPARED) == 0


def test_a_closure_fn_keeps_its_function_while_it_lives():
    """A guidance wrapper built around inline lambdas holds their ClosureFns, which must keep the
    lambdas (the cache key holds them weakly): the samplers notebook failed with 'the function
    of this ClosureFn no longer exists' once the lambdas passed to cfg were collected."""
    w = jnp.array([0.5, 2.0])
    guided = gf.guidance.cfg(lambda x, t: x * w, lambda x, t: 0.0 * x * w, 2.0)
    gc.collect()
    x, t = jnp.ones((3, 2)), jnp.full((3,), 0.5)
    np.testing.assert_allclose(guided(x, t), 2.0 * x * w, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda g: g(x, t))(guided), 2.0 * x * w, rtol=1e-6)


def _pickled_cond(x, t):
    return x * _GLOBAL_W[0]


def _pickled_uncond(x, t):
    return 0.0 * x


def _comprehension_model(x, t):
    return sum(x @ _GLOBAL_W for _ in range(1))  # (a generator expression: its own code object)


def test_globals_loaded_by_nested_code_are_lifted():
    """A global used only inside a generator expression (its own code object) is lifted too: it
    stayed a constant of the program."""
    lifted = gf.sampling.as_pytree_fn(_comprehension_model)
    assert isinstance(lifted, gf.param.ClosureFn) and jax.tree_util.tree_leaves(lifted)[0] is _GLOBAL_W


def test_closure_fns_pickle_and_free_their_arrays_after_schedule_selection():
    """A guidance wrapper over module-level functions that use a global array pickled before
    (its functions were static); a ClosureFn's spec holds a weak reference, so it pickles as its
    function. A lambda model passed to select_schedule stayed alive through the reference solve's
    cached closure over the traced model (review)."""
    import pickle

    guided = gf.guidance.cfg(_pickled_cond, _pickled_uncond, 2.0)
    again = pickle.loads(pickle.dumps(guided))
    x, t = jnp.ones((3, 2)), jnp.full((3,), 0.5)
    np.testing.assert_allclose(again(x, t), guided(x, t))

    path = gf.paths.vp_linear()
    x1 = jax.random.normal(jax.random.key(0), (4, 2))

    def go():
        p = {"w": jnp.eye(2) * 0.3}
        grids = [gf.sampling.time_grid(path, 3, "uniform"), gf.sampling.time_grid(path, 3, "logsnr")]
        gf.sampling.select_schedule(lambda x, t: x @ p["w"], path, x1, grids, prediction="eps", solver="ddim")
        return weakref.ref(p["w"])

    ref = go()
    gc.collect()
    assert ref() is None


def test_closure_fn_copies_made_inside_a_trace_stay_callable_and_keep_their_leaves():
    """A ClosureFn copied inside a trace (stop_gradient, a dtype cast) from a temporary model, then
    called, raised ReferenceError (third review); copy / deepcopy / pickle re-lifted the function and
    dropped leaves changed since (a fine-tuned copy came back with the original parameters)."""
    import copy
    import pickle

    path = gf.paths.vp_linear()

    @jax.jit
    def distill(p, x1):
        teacher = jax.lax.stop_gradient(gf.guidance.cfg(lambda x, t: x @ p, lambda x, t: 0.0 * (x @ p), 2.0))
        return gf.sample(teacher, path, x1, prediction="eps", solver="ddim", steps=3)[0]

    x1 = jnp.ones((4, 2))
    want, _ = gf.sample(gf.guidance.cfg(lambda x, t: x @ (0.3 * jnp.eye(2)), lambda x, t: 0.0 * x, 2.0), path, x1,
                        prediction="eps", solver="ddim", steps=3)
    np.testing.assert_allclose(distill(jnp.eye(2) * 0.3, x1), want, rtol=1e-5)

    tuned = jax.tree_util.tree_map(lambda a: a * 5, gf.param.as_pytree_fn(_global_model))
    x, t = jnp.ones((3, 2)), jnp.full((3,), 0.5)
    expected = x @ (5 * _GLOBAL_W) * _GLOBAL_SCALE
    for copied in (copy.copy(tuned), copy.deepcopy(tuned), pickle.loads(pickle.dumps(tuned))):
        np.testing.assert_allclose(copied(x, t), expected)


def test_a_lifted_function_stored_on_its_own_object_is_freed_and_new_defaults_are_seen():
    """Skeletons were kept in a global weak-keyed table whose values led back to their function
    (a lambda stored on the object it closes over): lifting it once kept it and its arrays alive
    for good. Defaults reassigned to a function were not seen by a fresh lift (fourth review)."""
    class Holder:
        def __init__(self):
            w = jnp.ones((4, 4))
            self.scale = 2.0
            self.fn = lambda x, t: self.scale * x * w[0, 0]
            self.ref = weakref.ref(w)

    h = Holder()
    ref = h.ref
    gf.param.as_pytree_fn(h.fn)
    del h
    gc.collect()
    assert ref() is None

    def f(x, t, k=1.0, w=jnp.eye(2)):
        return k * (x @ w)

    x = jnp.ones((1, 2))
    lifted = gf.param.as_pytree_fn(f)
    np.testing.assert_allclose(lifted(x, 0.5), [[1.0, 1.0]])
    f.__defaults__ = (5.0, jnp.eye(2))
    np.testing.assert_allclose(gf.param.as_pytree_fn(f)(x, 0.5), [[5.0, 5.0]])
    assert jax.tree_util.tree_structure(gf.param.as_pytree_fn(f)) == \
        jax.tree_util.tree_structure(gf.param.as_pytree_fn(f))  # (one program per function while it stands)
