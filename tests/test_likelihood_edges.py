"""Likelihood and flow edge cases: per-example ELBO strata, honest NFE of fixed-step FSAL
solvers, jit of the truncated-normal bound, infinite log-SNR ends, low precision, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf
from genflow import likelihood as L

G = gf.oracles.Gaussian.diagonal(jnp.array([0.5, -1.0, 0.2]), jnp.array([0.3, 2.0, 0.7]))


def test_vdm_elbo_rows_are_exchangeable_per_example_estimates():
    # the same point in every row: every row's mean ELBO estimates the same number, below log p
    path = gf.paths.vp_cosine()
    fn = G.model(path, "eps")
    x = jnp.tile(G.sample(jax.random.key(0), 1), (8, 1))
    keys = jax.random.split(jax.random.key(1), 400)
    elbos = jax.vmap(lambda k: L.vdm_elbo(fn, path, x, k, prediction="eps", t_min=1e-3)[0])(keys)  # [400, 8]
    means, se = np.asarray(elbos.mean(0)), float(np.asarray(elbos).std() / np.sqrt(400))
    assert np.ptp(means) < 8 * se, (means, se)  # rows agree (stratified across the batch, row 0 was +17 nats)
    exact = float(G.log_prob(x[:1], 0.0, path)[0])
    assert float(means.mean()) < exact + 4 * se / np.sqrt(8)
    # num_t draws per example are stratified within the example: lower variance than unstratified
    strat = jax.vmap(lambda k: L.vdm_elbo(fn, path, x, k, prediction="eps", t_min=1e-3, num_t=8)[0])(keys[:100])
    plain = jax.vmap(lambda k: L.vdm_elbo(fn, path, x, k, prediction="eps", t_min=1e-3, num_t=8,
                                          stratified=False)[0])(keys[:100])
    assert float(strat.std()) < float(plain.std())


def test_fixed_step_nfe_counts_every_model_call():
    path = gf.paths.linear()
    model = G.model(path, "velocity")
    calls = [0]

    def counted(x, t):
        jax.debug.callback(lambda _: calls.__setitem__(0, calls[0] + 1), t[0])
        return model(x, t)

    x = G.sample(jax.random.key(0), 3)
    for solver, steps in (("euler", 5), ("heun", 5), ("tsit5", 5), ("dopri5", 4), ("tsit5", None)):
        calls[0] = 0
        lp, info = L.ode_log_prob(counted, x, log_prior=L.GaussianPrior(jnp.float32(1.0)), solver=solver, steps=steps)
        jax.block_until_ready(lp)
        assert int(info.nfe) == calls[0], (solver, steps, int(info.nfe), calls[0])


def test_truncated_normal_bound_under_jit_and_low_precision():
    path = gf.paths.vp_cosine()
    fn = lambda z, t: jnp.zeros_like(z)  # noqa: E731
    x = jnp.round(jax.random.normal(jax.random.key(0), (2, 3)) * 8) / 8
    kw = dict(prediction="eps", bin_width=0.125, solver="euler", steps=4, dequantization="truncated_normal")
    eager = L.dequantized_log_prob(fn, path, x, jax.random.key(1), **kw)[0]
    jitted = jax.jit(lambda k: L.dequantized_log_prob(fn, path, x, k, **kw)[0])(jax.random.key(1))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)
    # bfloat16 data: the dequantization and its log q in float32 (a bf16 y left its bin)
    xb = jnp.round(jax.random.uniform(jax.random.key(2), (4, 32)) * 16) / 16
    for deq in (L.uniform_dequantize, lambda k, v, w: L.truncated_normal_dequantize(k, v, path, w)[:2]):
        y16, lq16 = deq(jax.random.key(3), xb.astype(jnp.bfloat16), 1 / 16)
        y32, lq32 = deq(jax.random.key(3), xb, 1 / 16)
        assert y16.dtype == jnp.float32 and lq16.dtype == jnp.float32
        np.testing.assert_allclose(lq16, lq32, rtol=1e-6)


def test_infinite_log_snr_ends_are_refused_and_shapes_checked():
    lin = gf.paths.linear()
    fn = G.model(lin, "eps")
    x = G.sample(jax.random.key(0), 4)
    with pytest.raises(ValueError, match="t_min=0.0 has sigma=0 on path 'linear'"):
        L.likelihood_loss(fn, lin, x, jax.random.key(1), t_min=0.0)
    with pytest.raises(ValueError, match="t_max=1.0 has alpha=0 on path 'linear'"):
        L.vdm_elbo(fn, lin, x, jax.random.key(1), t_min=1e-3)
    with pytest.raises(ValueError, match=r"returned shape \(4, 1\) for x of shape \(4, 3\)"):
        gf.log_prob(lambda z, t: fn(z, t)[:, :1], lin, x, prediction="eps", t_max=0.999)
    np.testing.assert_allclose(L.bits_per_dim(jnp.array(-10.0), np.int64(4)), L.bits_per_dim(jnp.array(-10.0), 4))


def test_flow_log_normalizer_precision_and_actnorm_batch_of_one():
    x = jax.random.normal(jax.random.key(0), (64, 4))
    with jax.enable_x64(True):
        flow = gf.flows.realnvp(4, num_steps=2, hidden=16, lu=False)
        x64 = x.astype(jnp.float64)
        params = jax.tree.map(lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v,
                              flow.init(jax.random.key(1), x64))
        assert flow.log_normalizer(params).dtype == jnp.float64
        np.testing.assert_allclose(-flow.energy(params, x64[:8]) - flow.log_normalizer(params),
                                   flow.log_prob(params, x64[:8]), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="ActNorm's data-dependent init needs at least 2 values per channel"):
        gf.flows.ActNorm().init(jax.random.key(0), jnp.ones((1, 3)))


def test_log_prob_nfe_counts_a_rejected_first_step():
    # FSAL solvers re-evaluated the first stage after a rejected first step without counting it:
    # info.nfe was one below the model calls made (229 for 230 here)
    with jax.enable_x64(True):
        g = gf.oracles.Gaussian.full(jnp.array([0.7, -1.2]), jnp.array([[0.8, 0.3], [0.3, 0.5]]))
        x = g.sample(jax.random.key(1), 3)
        path = gf.paths.vp_linear()
        model, calls = g.model(path, "velocity"), [0]

        def fn(x, t):
            jax.debug.callback(lambda _: calls.__setitem__(0, calls[0] + 1), t[0])
            return model(x, t)

        lp, info = gf.log_prob(jax.tree_util.Partial(fn), path, x, prediction="velocity", solver="tsit5",
                               rtol=1e-9, atol=1e-9)
        jax.block_until_ready(lp)
        jax.effects_barrier()
        assert int(info.nfe) == calls[0], (int(info.nfe), calls[0])


def test_likelihood_options_are_named():
    # bin_width / tau <= 0 raised a bare "math domain error"; negative rtol was accepted; x off the
    # decoder's levels was snapped to the nearest one silently
    g = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.ones(2))
    path = gf.paths.vp_cosine()
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="bin_width must be a real > 0"):
        L.dequantized_log_prob(g.model(path, "eps"), path, x, jax.random.key(0), prediction="eps", bin_width=0.0)
    with pytest.raises(ValueError, match="tau must be a real > 0"):
        L.truncated_normal_time(path, 0.125, tau=-3.0)
    with pytest.raises(ValueError, match="rtol must be a finite real > 0"):
        gf.log_prob(g.model(path, "eps"), path, x, prediction="eps", rtol=-1.0)
    with pytest.raises(ValueError, match="atol must be a finite real >= 0; got inf"):  # (accepted: every step passed)
        gf.log_prob(g.model(path, "eps"), path, x, prediction="eps", atol=float("inf"))
    levels = jnp.linspace(-1, 1, 17)
    with pytest.raises(ValueError, match="x must lie on levels"):
        L.reconstruction_term(path, levels[:4].reshape(2, 2) + 0.03, jax.random.key(0), 0.01, levels)
    assert np.all(np.isfinite(np.asarray(L.reconstruction_term(path, levels[:4].reshape(2, 2), jax.random.key(0),
                                                                  0.01, levels))))


def test_log_prob_refuses_max_steps_below_one():
    g = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.ones(2))
    path = gf.paths.vp_cosine()
    with pytest.raises(ValueError, match="max_steps"):  # was Diffrax's "Must have at least one checkpoint"
        gf.log_prob(g.model(path, "eps"), path, jnp.ones((2, 2)), prediction="eps", max_steps=0)


# ---- proposed for tests/test_flows.py ----------------------------------------------------------


def test_likelihood_functions_name_their_bad_arguments():
    """Found by a behavioural audit: each of these returned a wrong value or failed deep inside."""
    path = gf.paths.linear()
    x = jax.random.normal(jax.random.key(0), (4, 3))
    v = L.PathVelocity(G.model(path, "velocity"), path, "velocity")
    prior = lambda z: G.log_prob(z, 1.0, path)  # noqa: E731
    # a NaN end integrated nothing and returned log_prior(x) (-4.49 where log p_0 is -5.18)
    for ends in (dict(t0=float("nan")), dict(t1=float("nan")), dict(t0=-float("inf"))):
        with pytest.raises(ValueError, match=r"t[01] must be a finite real"):
            L.ode_log_prob(v, x, log_prior=prior, **ends)
    with pytest.raises(ValueError, match="t0 and t1 must differ"):
        L.ode_log_prob(v, x, log_prior=prior, t0=0.5, t1=0.5)
    # a [B, 1] prior broadcast logp to [B, B]
    with pytest.raises(ValueError, match=r"log_prior\(z\) must return shape \[B\] = \(4,\); got \(4, 1\)"):
        gf.log_prob(G.model(path, "velocity"), path, x, prediction="velocity", prior=lambda z: prior(z)[:, None])
    # chunk_size 1.5 became 1; "a" failed in int()
    for bad in (1.5, "a", 0):
        with pytest.raises(ValueError, match="chunk_size must be"):
            gf.log_prob(G.model(path, "velocity"), path, x, prediction="velocity", chunk_size=bad)
    pv = gf.paths.vp_linear()
    fn = G.model(pv, "eps")
    key = jax.random.key(1)
    # prior_std -1 gave the +1 result, 0 and NaN a NaN prior term
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="prior_std must be a real > 0"):
            L.vdm_elbo(fn, pv, x, key, prior_std=bad)
        with pytest.raises(ValueError, match="prior_std must be a real > 0"):
            L.prior_term(pv, x, prior_std=bad)
    # an integer key: JAX's "invalid PRNG key data"
    for call in (lambda k: L.vdm_elbo(fn, pv, x, k), lambda k: L.diffusion_term(fn, pv, x, k, prediction="eps",
                                                                                   t_min=1e-3),
                 lambda k: L.reconstruction_term(pv, x, k, 1e-3),
                 lambda k: L.dequantized_log_prob(fn, pv, jnp.zeros((2, 3)), k, prediction="eps", bin_width=2 / 255)):
        with pytest.raises(TypeError, match="key must be one PRNG key"):
            call(0)
    # levels of rank 2: a broadcasting error deep inside
    with pytest.raises(ValueError, match=r"levels must be a 1-D array \[K\]"):
        L.vdm_elbo(fn, pv, jnp.zeros((2, 3)), key, levels=jnp.zeros((2, 2)))
    # the valid calls still run, also under jit
    assert L.vdm_elbo(fn, pv, x, key, prior_std=2.0)[0].shape == (4,)
    assert jax.jit(lambda k: L.vdm_elbo(fn, pv, x, k)[0])(key).shape == (4,)
    lp, _ = jax.jit(lambda a, b: L.ode_log_prob(v, x, log_prior=prior, t0=a, t1=b))(0.0, 1.0)
    assert np.allclose(lp, G.log_prob(x, 0.0, path), atol=1e-3)


def test_likelihood_helpers_name_their_bad_arguments():
    """Likelihood audit: these failed deep inside JAX without naming the argument, or returned
    values silently (an empty sample, an extrapolated path, NaN rows)."""
    k = jax.random.key(0)
    path = gf.paths.vp_cosine()
    x = jnp.ones((2, 3))
    fn = lambda z, t: jnp.zeros_like(z)  # noqa: E731
    with pytest.raises(TypeError, match="key"):
        L.uniform_dequantize(3, x, 0.1)  # (JAX's "invalid PRNG key data")
    for n in (2.5, 0):  # (a shape TypeError; empty arrays)
        with pytest.raises(ValueError, match="n must be a positive int"):
            L.sample_time(k, n, path, 1e-3)
    # t_min=None is path.t_min, as in vdm_elbo (jnp.array(None) failed)
    vpl = gf.paths.vp_linear()  # (t_min = 1e-3, where sigma > 0)
    d = L.diffusion_term(fn, vpl, x, k, prediction="eps", t_min=None)
    np.testing.assert_allclose(d, L.diffusion_term(fn, vpl, x, k, prediction="eps", t_min=vpl.t_min))
    with pytest.raises(ValueError, match=r"t0 must be a float in \[0, 1\]"):
        L.reconstruction_term(path, x, k, 1.5)
    with pytest.raises(ValueError, match=r"t1 must be a float in \[0, 1\]"):
        L.prior_term(gf.paths.vp_linear(), x, 2.0)
    with pytest.raises(ValueError, match="std must be > 0"):
        L.gaussian_log_prob(x, 0.0)  # (NaN)


# -- from the deep likelihood audit (stop 39; each test fails on the code before it) --
def test_backsolve_gradient_of_a_fixed_step_solve_in_reverse_time():
    """ode_log_prob integrates either order; with t0 > t1, a fixed-step solver and
    BacksolveAdjoint, jax.grad failed at run time ("StepTo(ts=...) must be strictly increasing"):
    Diffrax solves in negated time there. The gradient now agrees with the checkpointed one."""
    import diffrax

    def loss(a, adj, t0, t1):  # (a velocity that depends on t: a time-grid error would show)
        v = jax.tree_util.Partial(lambda a, x, t: -a * (t[:, None] ** 2 + 0.3) * x + a * jnp.sin(3 * t[:, None]), a)
        return L.ode_log_prob(v, jnp.ones((2, 3)), log_prior=L.GaussianPrior(jnp.float32(1.0)), t0=t0, t1=t1,
                              solver="heun", steps=32, adjoint=adj)[0].sum()

    for t0, t1 in ((1.0, 0.0), (0.0, 1.0), (0.9, 0.2)):
        ref = float(jax.grad(loss)(0.5, None, t0, t1))
        got = float(jax.grad(loss)(0.5, diffrax.BacksolveAdjoint(), t0, t1))
        assert abs(got - ref) < 1e-3 * abs(ref), (t0, t1, got, ref)


def test_elbo_functions_name_a_path_given_by_name_and_bad_batches():
    """A path name failed as "'str' object has no attribute 't_min'" (gf.log_prob named it);
    likelihood_loss on a list as "'list' object has no attribute 'shape'"; strata=2.5 was read as 2."""
    fn = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    x, key = jnp.ones((2, 2)), jax.random.key(0)
    calls = [lambda p: L.vdm_elbo(fn, p, x, key), lambda p: L.likelihood_loss(fn, p, x, key),
             lambda p: L.diffusion_term(fn, p, x, key, prediction="eps", t_min=None),
             lambda p: L.prior_term(p, x), lambda p: L.reconstruction_term(p, x, key, 0.01),
             lambda p: L.dequantized_log_prob(fn, p, x, key, prediction="eps", bin_width=0.1)]
    for call in calls:
        with pytest.raises(TypeError, match="path must be a genflow.paths.Path; got str"):
            call("vp_linear")
    with pytest.raises((TypeError, ValueError), match="x0 must be"):  # (its argument's name)
        L.likelihood_loss(fn, gf.paths.vp_linear(), [[0.1, 0.2]], key)
    with pytest.raises(ValueError, match="strata must be a positive int; got 2.5"):
        L.sample_time(key, 4, gf.paths.vp_linear(), 1e-3, stratified=True, strata=2.5)
    # an empty batch failed as "n must be a positive int; got 0", the time sampler's argument (shapes audit)
    path, empty = gf.paths.vp_linear(), jnp.zeros((0, 2))
    with pytest.raises(ValueError, match=r"x must have shape \[B, ...\] with at least one feature axis and B >= 1"):
        L.vdm_elbo(fn, path, empty, key)
    with pytest.raises(ValueError, match=r"x0 must have shape \[B, ...\] .* and B >= 1"):
        L.likelihood_loss(fn, path, empty, key)


def test_gaussian_log_prob_of_low_precision_z_is_computed_in_float32():
    """In bfloat16 the sum over 3,072 features came out ~50 nats off the float32 value of the same
    (rounded) z."""
    z = jax.random.normal(jax.random.key(0), (2, 3072)).astype(jnp.bfloat16) * 1.2
    got = L.gaussian_log_prob(z, 1.0)
    want = L.gaussian_log_prob(z.astype(jnp.float32), 1.0)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_likelihood_objective_passes_labels_and_refuses_unknown_batch_keys():
    """likelihood_objective dropped a batch's labels (a conditional net trained on its null label
    only: the same loss for labels y, y + 1 and none), and any dict key other than 'x' / 'y' / 'x1'
    was ignored by every objective ({'x', 'labels'} trained on the null label)."""
    net = gf.nets.MLP(hidden=(16,), num_classes=3)
    x = jax.random.normal(jax.random.key(0), (8, 2))
    y = jnp.arange(8) % 3
    p = net.init(jax.random.key(1), x[:1], jnp.zeros((1,)), y[:1])
    lo = gf.likelihood.likelihood_objective(net.apply, gf.paths.vp_linear(), prediction="eps")
    k = jax.random.key(2)
    a, b = float(lo(p, {"x": x, "y": y}, k)[0]), float(lo(p, {"x": x, "y": (y + 1) % 3}, k)[0])
    assert a != b and a != float(lo(p, {"x": x}, k)[0])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['labels'\]"):
        lo(p, {"x": x, "labels": y}, k)
    do = gf.train.diffusion_objective(net.apply, gf.paths.linear(), prediction="velocity")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['labels'\]"):
        do(p, {"x": x, "labels": y}, k)
    flow = gf.flows.realnvp(2, num_steps=1, hidden=8)  # flows read only "x": other keys are not refused
    fp = flow.init(jax.random.key(3), x)
    lf = gf.flows.flow_objective(flow, "ml")
    assert float(lf(fp, {"x": x, "label": y}, k)[0]) == float(lf(fp, x, k)[0])
    with pytest.raises(ValueError, match="draws its own noise"):
        lo(p, {"x": x, "x1": x}, k)
    with pytest.raises(TypeError, match="likelihood_objective: .*label_dropout"):
        gf.likelihood.likelihood_objective(net.apply, gf.paths.vp_linear(), label_dropout=0.1)


_ALPHA_CALLS: list = []


def _counted_alpha(t):
    _ALPHA_CALLS.append(1)
    return 1.0 - t


def test_log_prob_checks_its_path_once_per_path_ends_and_kind():
    """gf.log_prob evaluated the path eagerly on every call to check its ends and orientation (~0.3
    ms a call, a host read each); they are memoised under the path's value, ends and kind. A path
    with noise at t=0 is still refused on every call."""
    calls = _ALPHA_CALLS  # (a module global: a closure over the list would make the path unkeyed, never memoised)
    path = gf.paths.Path(alpha_fn=_counted_alpha, sigma_fn=lambda t: t, name="counted")
    g = gf.oracles.Gaussian.diagonal(jnp.array([1.0, -1.0]), jnp.array([0.5, 0.2]))
    fn, x = g.model(gf.paths.linear(), "eps"), jnp.ones((4, 2))
    first, _ = gf.log_prob(fn, path, x, prediction="eps", solver="heun", steps=64, t_max=0.999)
    calls.clear()
    again, _ = gf.log_prob(fn, path, x, prediction="eps", solver="heun", steps=64, t_max=0.999)
    assert calls == [] and np.array_equal(first, again)
    np.testing.assert_allclose(first, g.log_prob(x, 0.0, gf.paths.linear()), atol=2e-2)  # (from t_max=0.999)
    gf.log_prob(fn, path, x, prediction="eps", solver="heun", steps=64, t_max=0.999, t_min=1e-3)
    assert calls  # (new ends: checked again)
    rev = gf.paths.Path(alpha_fn=lambda t: t, sigma_fn=lambda t: 1.0 - t, name="reversed")
    for _ in range(2):
        with pytest.raises(ValueError, match="does not run from data to noise"):
            gf.log_prob(fn, rev, x, prediction="velocity")


def test_a_solve_cut_off_at_max_steps_raises_under_jit_even_with_its_info_discarded():
    """Diffrax's failure check was moved onto the step count (it replicated sharded batches); tied
    to it by an optimization barrier only, XLA dropped the check under the caller's jax.jit when
    info was discarded: tsit5 and gf.log_prob cut off at max_steps returned unfinished results
    without an error. A BacksolveAdjoint's backward solve lost its check too (throw=False is handed
    on to it): a wrong gradient (review)."""
    import diffrax

    g = gf.oracles.Gaussian.diagonal(jnp.array([1.0, -0.5]), jnp.array([0.5, 2.0]))
    vp = gf.paths.vp_linear()
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    kw = dict(solver="tsit5", max_steps=2, rtol=1e-6, atol=1e-6)
    calls = [lambda x: gf.sample(g.model(vp, "eps"), vp, x, prediction="eps", **kw)[0],
             lambda x: gf.sample(g.model(vp, "eps"), vp, x, prediction="eps", **kw)[1].stats["num_accepted_steps"],
             lambda x: gf.log_prob(g.model(vp, "velocity"), vp, x, prediction="velocity", max_steps=2)[0],
             lambda x: gf.log_prob(g.model(vp, "velocity"), vp, x, prediction="velocity", max_steps=2)[1].prior_logp]
    for call in calls:
        with pytest.raises(Exception, match="maximum number of solver steps"):
            jax.block_until_ready(jax.jit(call)(x1))
    model = gf.nets.MLP(hidden=(16,), time_embedding="identity")
    params = model.init(jax.random.key(1), jnp.zeros((1, 2)), jnp.zeros((1,)))
    adj = diffrax.BacksolveAdjoint(stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10))
    loss = lambda p, m: gf.flows.cnf_log_prob(model.apply, p, x1, adjoint=adj, max_steps=m)[0].mean()  # noqa: E731
    assert int(gf.flows.cnf_log_prob(model.apply, params, x1, max_steps=5)[1].num_steps) <= 5  # (forward fits)
    with pytest.raises(Exception, match="maximum number of solver steps"):
        jax.block_until_ready(jax.grad(loss)(params, 5))


def _two_dim_gaussian():
    return gf.oracles.Gaussian.diagonal(jnp.array([1.0, -1.0]), jnp.array([0.5, 0.2]))


def test_log_prob_memo_of_its_checks_is_keyed_by_t_max():
    """The eager checks are memoised under (path, t_min, t_max, kind): a call at t_max=0.999 must not
    let a later eps call at t_max=1 on the linear path (alpha = 0 there) skip its refusal."""
    path = gf.paths.linear()
    fn, x = _two_dim_gaussian().model(path, "eps"), jnp.ones((4, 2))
    gf.log_prob(fn, path, x, prediction="eps", solver="heun", steps=4, t_max=0.999)
    with pytest.raises(ValueError, match="cannot be converted to a velocity"):
        gf.log_prob(fn, path, x, prediction="eps", solver="heun", steps=4, t_max=1.0)


def test_log_prob_refuses_a_score_model_where_alpha_is_zero():
    """'Eps / score models on a path with alpha(t_max) = 0 need t_max < 1' (a score model too, not only eps)."""
    path = gf.paths.linear()
    with pytest.raises(ValueError, match="cannot be converted to a velocity"):
        gf.log_prob(_two_dim_gaussian().model(path, "score"), path, jnp.ones((4, 2)), prediction="score", solver="heun", steps=4)


def test_log_prob_of_bfloat16_data_uses_the_float32_prior_std():
    """The solve runs in float32 for bfloat16 x; the default prior N(0, sigma(t_max)^2) must take
    t_max in float32 too (bfloat16 rounds t_max=0.99 to 0.988): the same points given as bfloat16
    or as float32 have the same log-density."""
    path = gf.paths.linear()
    g = _two_dim_gaussian()
    fn = g.model(path, "velocity")
    x = g.sample(jax.random.key(0), 4).astype(jnp.bfloat16)
    kw = dict(prediction="velocity", solver="heun", steps=16, t_max=0.99)
    a, _ = gf.log_prob(fn, path, x, **kw)
    b, _ = gf.log_prob(fn, path, x.astype(jnp.float32), **kw)
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-4)


def test_log_prob_reads_rtol_and_atol_as_named():
    """The adaptive tolerance is atol + rtol |y| (per sample). On data of scale ~100 a tight rtol with
    atol=1e-2 must be the more accurate (and longer) solve than rtol=1e-2 with a tight atol."""
    path = gf.paths.linear()
    g = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.array([100.0, 50.0]))
    x = g.sample(jax.random.key(0), 8)
    exact = g.log_prob(x, 0.0, path)
    runs = {}
    for rtol, atol in ((1e-9, 1e-2), (1e-2, 1e-9)):
        lp, info = gf.log_prob(g.model(path, "velocity"), path, x, prediction="velocity", t_min=0.0, rtol=rtol,
                               atol=atol)
        runs[rtol] = (int(info.num_steps), float(jnp.max(jnp.abs(lp - exact))))
    assert runs[1e-9][0] > runs[1e-2][0], runs
    assert runs[1e-9][1] < runs[1e-2][1], runs


def test_uniform_time_sampling_weight_covers_the_interval_from_t_min():
    """sample_time's contract E[w] = 1/2 (lambda(t_min) - lambda(t_max)) for "uniform" on an interval
    away from 0 (at t_min=1e-3 a weight scaled by t_max instead of t_max - t_min passed)."""
    path = gf.paths.vp_linear()
    exact = 0.5 * float(path.log_snr(jnp.asarray(0.4)) - path.log_snr(jnp.asarray(0.9)))
    t, w = gf.likelihood.sample_time(jax.random.key(0), 4096, path, 0.4, 0.9, "uniform", stratified=True)
    assert float(t.min()) >= 0.4 and float(t.max()) <= 0.9
    np.testing.assert_allclose(float(jnp.mean(w)), exact, rtol=2e-3)


def test_vdm_elbo_with_num_t_draws_keeps_each_example_in_its_own_row():
    """Row k B + i of the tiled batch is example i: with the same key, changing example 1 must not
    change example 0's reconstruction, prior or diffusion estimate (a [B, num_t] reshape mixed them)."""
    path = gf.paths.vp_cosine()
    fn = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.full(2, 0.6)).model(path, "eps")
    levels = jnp.linspace(-1.0, 1.0, 17)
    parts = []
    for other in ([1.0, -1.0], [-0.5, 0.5]):
        x = jnp.array([[0.0, 0.5], other])
        _, p = gf.likelihood.vdm_elbo(fn, path, x, jax.random.key(3), prediction="eps", levels=levels, num_t=2,
                                      t_min=0.3)
        parts.append({k: float(v[0]) for k, v in p.items()})
    for k in parts[0]:
        np.testing.assert_allclose(parts[0][k], parts[1][k], rtol=1e-6, err_msg=k)


def test_diffusion_term_calls_the_model_with_float64_times_under_x64():
    """float64 data keeps float64 times (the times were drawn in float32, then widened)."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        path = gf.paths.vp_cosine()
        model = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.full(2, 0.6)).model(path, "eps")
        seen = []

        def fn(z, t):
            seen.append(t.dtype)
            return model(z, t)

        d = gf.likelihood.diffusion_term(fn, path, jnp.ones((4, 2), jnp.float64), jax.random.key(0),
                                         prediction="eps", t_min=1e-3)
        assert seen == [jnp.float64] and d.dtype == jnp.float64, (seen, d.dtype)
    finally:
        jax.config.update("jax_enable_x64", prev)


def test_likelihood_loss_divides_by_every_feature_of_an_image():
    """'In nats per dimension': D is the product of all feature axes of [B, H, W, C] data, not C."""
    path = gf.paths.vp_cosine()
    g = gf.oracles.Gaussian.diagonal(jnp.zeros(12), jnp.full(12, 0.6))
    flat = g.model(path, "eps")

    def fn(z, t):
        return flat(z.reshape(z.shape[0], -1), t).reshape(z.shape)

    x = g.sample(jax.random.key(0), 4).reshape(4, 2, 2, 3)
    _, info = gf.likelihood.likelihood_loss(fn, path, x, jax.random.key(1), t_min=1e-3)
    ref = gf.likelihood.diffusion_term(fn, path, x, jax.random.key(1), prediction="eps", t_min=1e-3,
                                       stratified=True) / 12
    np.testing.assert_allclose(info["per_example"], ref, rtol=1e-6)


def test_importance_time_sampling_refuses_an_infinite_log_snr_end():
    """sample_time's default "importance" draws uniformly in log-SNR: at t_min = 0 (sigma = 0) on
    linear it gave NaN times and inf weights, on vp_linear t = 0 and inf weights (diffusion_term /
    vdm_elbo refused those ends). "uniform" draws t itself and still runs; traced ends pass."""
    k = jax.random.key(0)
    for path in (gf.paths.linear(), gf.paths.vp_linear()):
        with pytest.raises(ValueError, match=rf"t_min=0.0 has sigma=0 on path '{path.name}'.*pass t_min > 0"):
            L.sample_time(k, 4, path, 0.0)
    with pytest.raises(ValueError, match="t_max=1.0 has alpha=0 on path 'linear'.*pass t_max < 1"):
        L.sample_time(k, 4, gf.paths.linear(), 1e-3)
    t, w = L.sample_time(k, 4, gf.paths.linear(), 1e-3, 0.999)
    assert np.all(np.isfinite(t)) and np.all(np.isfinite(w))
    t, w = L.sample_time(k, 4, gf.paths.vp_linear(), 0.0, sampling="uniform")
    assert np.all(np.isfinite(w)) and float(t.min()) >= 0.0
    for bad in (0, jax.random.split(k, 2)):  # (JAX's "invalid PRNG key data", unnamed)
        with pytest.raises(TypeError, match=r"key must be one PRNG key"):
            L.sample_time(bad, 4, gf.paths.vp_linear(), 1e-3)
    w = jax.jit(lambda a: L.sample_time(k, 4, gf.paths.vp_linear(), a)[1])(1e-3)
    np.testing.assert_allclose(w, L.sample_time(k, 4, gf.paths.vp_linear(), 1e-3)[1], rtol=1e-5)


def test_gaussian_log_prob_refuses_a_per_feature_std():
    """std is a scalar or one per example: a [D] std with B != D failed as a broadcasting error that
    named nothing, a [B, D] one too; GaussianPrior (gf.log_prob's prior) calls it. A traced scalar
    std still runs, and [1] / [B] stds broadcast over the batch."""
    z = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    for std in (jnp.array([1.0, 2.0, 3.0]), np.ones((2, 2))):
        with pytest.raises(ValueError, match=r"std must be a scalar or one per example, \[B\] = \(2,\); got shape \("):
            L.gaussian_log_prob(z, std)
    with pytest.raises(ValueError, match="std must be a scalar or one per example"):
        L.gaussian_log_prob(jnp.ones((3, 2)), jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="std must be > 0"):
        L.gaussian_log_prob(z, jnp.array([1.0, -2.0]))
    with pytest.raises(ValueError, match="std must be a scalar or one per example"):
        gf.log_prob(lambda x, t: jnp.zeros_like(x), gf.paths.linear(), jnp.ones((3, 2)), prediction="velocity",
                    prior=L.GaussianPrior(jnp.array([1.0, 2.0])), solver="euler", steps=1)
    per_example = L.gaussian_log_prob(z, jnp.array([1.0, 2.0]))
    for i, s in enumerate((1.0, 2.0)):
        np.testing.assert_allclose(per_example[i], L.gaussian_log_prob(z, s)[i], rtol=1e-6)
    np.testing.assert_allclose(L.gaussian_log_prob(z, jnp.array([2.0])), L.gaussian_log_prob(z, 2.0), rtol=1e-6)
    ref = -0.5 * np.sum(np.asarray(z) ** 2, axis=1) / 4.0 - 2 * (np.log(2.0) + 0.5 * np.log(2 * np.pi))
    for std in (2.0, jnp.asarray(2.0)):
        np.testing.assert_allclose(jax.jit(L.gaussian_log_prob)(z, std), ref, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda s: L.GaussianPrior(s)(z))(jnp.float32(2.0)), ref, rtol=1e-6)


def test_batch_helpers_refuse_a_single_example_without_a_batch_axis():
    """x: [D] was read as D one-dimensional examples (log-densities, KLs and dequantizations of shape
    [D]), where log_prob, vdm_elbo and diffusion_term refuse it; a [B, D] batch still works."""
    k, x1 = jax.random.key(0), jnp.array([0.25, -0.5, 0.75])
    path = gf.paths.vp_linear()
    msg = r"x must have shape \[B, \.\.\.\] with at least one feature axis; got shape \(3,\)"
    calls = {"uniform_dequantize": lambda x: L.uniform_dequantize(k, x, 0.25),
             "truncated_normal_dequantize": lambda x: L.truncated_normal_dequantize(k, x, path, 0.25),
             "prior_term": lambda x: L.prior_term(path, x),
             "reconstruction_term": lambda x: L.reconstruction_term(path, x, k, 1e-3),
             "dequantized_log_prob": lambda x: L.dequantized_log_prob(
                 lambda z, t: jnp.zeros_like(z), path, x, k, prediction="velocity", bin_width=0.25, solver="euler",
                 steps=1)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=msg):
            call(x1)
        out = call(x1[None])
        assert (out[1] if name.endswith("dequantize") else out[0] if name == "dequantized_log_prob"
                else out).shape == (1,), name
    with pytest.raises(ValueError, match=msg.replace("x must", "z must")):
        L.gaussian_log_prob(x1, 1.0)
    assert L.gaussian_log_prob(x1[None], 1.0).shape == (1,)
