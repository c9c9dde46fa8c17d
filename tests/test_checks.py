"""Integer arguments: one notion across the package (Python or NumPy integers, never a bool), one
wording of the error (the argument's name and the expected range)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import genflow as gf
from genflow._checks import check_int, int_range, is_int


def test_is_int_accepts_numpy_integers_and_refuses_bools_floats_and_out_of_range():
    assert is_int(3) and is_int(np.int64(3)) and is_int(np.uint8(1)) and is_int(0, 0) and is_int(3, 1, 3)
    for bad in (True, False, 2.0, np.float32(2), "2", None, 0, -1):
        assert not is_int(bad), bad
    assert not is_int(4, 1, 3) and not is_int(-1, 0)
    assert check_int("n", np.int32(5)) == 5 and type(check_int("n", np.int32(5))) is int
    assert int_range(1) == "a positive int" and int_range(0) == "an int >= 0" and int_range(1, 3) == "an int in 1..3"
    with pytest.raises(ValueError, match=r"steps must be a positive int; got True"):
        check_int("steps", True)
    # a concrete 0-d JAX integer counts as its value (gf.data.moons(key, jnp.int32(8)) was refused);
    # a JAX bool, float, 1-d or traced one does not
    assert check_int("n", jnp.int32(8)) == 8 and type(check_int("n", jnp.int32(8))) is int
    assert gf.data.moons(jax.random.key(0), jnp.int32(8)).shape == (8, 2)
    for bad in (jnp.array(True), jnp.float32(8), jnp.array([8]), jnp.int32(0)):
        with pytest.raises(ValueError, match="n must be a positive int"):
            check_int("n", bad)
    with pytest.raises(ValueError, match="n must be a positive int; got .*Tracer"):
        jax.jit(lambda n: check_int("n", n))(8)


def test_public_functions_share_the_integer_check():
    path = gf.paths.linear()
    assert gf.sampling.time_grid(path, np.int64(4)).shape == (5,)
    with pytest.raises(ValueError, match="steps must be a positive int; got True"):
        gf.sampling.time_grid(path, True)  # a bool was taken as 1 step
    gf.train.make_train_step(lambda p, b, k: (0.0, {}), optax.sgd(0.1), grad_accum=np.int64(2))  # was refused
    with pytest.raises(ValueError, match="grad_accum must be a positive int; got True"):
        gf.train.make_train_step(lambda p, b, k: (0.0, {}), optax.sgd(0.1), grad_accum=True)
    with pytest.raises(ValueError, match="num_t must be a positive int; got True"):
        gf.likelihood.vdm_elbo(None, gf.paths.vp_linear(), np.zeros((2, 2), np.float32), None, num_t=True)
    with pytest.raises(ValueError, match="factor must be a positive int; got 2.0"):
        gf.inverse.super_resolution(2.0)
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    fn = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.ones(2)).model(path, "x0")
    for solver, opts in (("unipc", dict(order=np.int64(2))), ("deis", dict(order=np.int32(2)))):
        x, _ = gf.sample(fn, path, x1, prediction="x0", solver=solver, steps=4, t_start=0.999, **opts)
        assert bool(jnp.all(jnp.isfinite(x)))  # a NumPy option was traced inside the solver and failed
    lp, _ = gf.log_prob(fn, path, x1, prediction="x0", solver="midpoint", steps=np.int64(4), t_min=0.01)
    ref, _ = gf.log_prob(fn, path, x1, prediction="x0", solver="midpoint", steps=4, t_min=0.01)
    np.testing.assert_array_equal(lp, ref)  # steps=np.int64 was traced (ConcretizationTypeError)


def test_an_empty_batch_gives_empty_results():
    """Per-example reductions flatten ``[B, ...]`` to ``[B, D]``: ``reshape(B, -1)`` failed for B = 0
    with a ZeroDivisionError ('integer modulo by zero') in gf.log_prob, the oracles' models, flows'
    log_prob, metrics and operators; an empty batch (e.g. a filtered selection) gives empty results."""
    from genflow._checks import flat_batch

    assert flat_batch(np.zeros((0, 3, 2))).shape == (0, 6) and flat_batch(jnp.ones((2, 3, 2))).shape == (2, 6)
    path = gf.paths.linear()
    empty = jnp.zeros((0, 2))
    logp, _ = gf.log_prob(lambda x, t: -x, path, empty, prediction="velocity")
    assert logp.shape == (0,)
    mix = gf.oracles.GaussianMixture.random(jax.random.key(0), 3, 2)
    gauss = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.ones(2))
    for oracle in (mix, gauss):
        x, _ = gf.sample(oracle.model(path, "eps"), path, empty, prediction="eps", steps=4, t_start=0.99)
        assert x.shape == (0, 2)
    flow = gf.flows.realnvp(2, num_steps=1, hidden=4)
    params = flow.init(jax.random.key(1), jnp.ones((4, 2)))
    assert flow.log_prob(params, empty).shape == (0,)
    assert gf.metrics.psnr(jnp.zeros((0, 4, 4, 1)), jnp.zeros((0, 4, 4, 1))).shape == (0,)


def test_dir_lists_the_lazily_imported_public_names():
    """dir(gf) (tab completion, help(gf)) lists every name of __all__, the lazily imported ones too:
    a fresh interpreter listed neither gf.log_prob nor gf.train (run in a subprocess: in this one
    other tests have imported them already)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import genflow as gf; print(sorted(set(gf.__all__) - set(dir(gf))))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_a_raw_key_must_have_the_default_implementations_length():
    """A raw uint32 key of another length than the default PRNG's (2 for threefry) passed the check
    and failed later as JAX's "invalid PRNG key data"; with rbg as the default, its 4 words pass."""
    from genflow._checks import check_key

    check_key(jax.random.PRNGKey(0))
    check_key(jax.random.key(0))
    for bad in (jnp.zeros(3, jnp.uint32), jnp.zeros(4, jnp.uint32), jnp.zeros((1, 2), jnp.uint32)):
        with pytest.raises(TypeError, match=r"key must be one PRNG key .*got ArrayImpl of shape \(\d"):
            check_key(bad)
    old = jax.config.jax_default_prng_impl
    try:
        jax.config.update("jax_default_prng_impl", "rbg")
        check_key(jax.random.PRNGKey(0))  # (4 words)
        with pytest.raises(TypeError, match="key must be one PRNG key"):
            check_key(jnp.zeros(2, jnp.uint32))
    finally:
        jax.config.update("jax_default_prng_impl", old)


def test_top_level_names_route_to_their_modules():
    """gf.<module> for every lazily imported module and gf.log_prob: genflow's module __getattr__
    itself is asked (gf.sample is imported eagerly: a plain attribute; once a submodule is imported it is an attribute anyway, so a name
    left out of the lazy list -- "ot" in a mutation audit -- passed every test and failed only as the
    first lookup in a fresh interpreter)."""
    import importlib

    for name in ("train", "data", "metrics", "viz", "likelihood", "flows", "optim", "guidance", "inverse", "ot"):
        assert gf.__getattr__(name) is importlib.import_module(f"genflow.{name}"), name
    assert gf.__getattr__("log_prob") is importlib.import_module("genflow.likelihood").log_prob
    assert gf.sample is importlib.import_module("genflow.sampling").sample
    with pytest.raises(AttributeError, match="module 'genflow' has no attribute 'nope'"):
        gf.__getattr__("nope")


_G = lambda x, t: x  # noqa: E731
_BOOL_FOR_A_REAL = {
    # each ran before: std=False gave NaN log-densities, the others ran the bool as 0 or 1
    "gaussian_log_prob(std)": lambda b: gf.likelihood._ode.gaussian_log_prob(jnp.ones((2, 3)), b),
    "paths.ve(sigma_min)": lambda b: gf.paths.ve(sigma_min=b),
    "paths.edm(rho)": lambda b: gf.paths.edm(rho=b),
    "paths.vp_linear(beta_min)": lambda b: gf.paths.vp_linear(beta_min=b),
    "guidance.interval(t_lo)": lambda b: gf.guidance.interval(gf.guidance.cfg(_G, _G, 2.0), b, 0.5),
    "guidance.adaptive(threshold)": lambda b: gf.guidance.adaptive(gf.guidance.cfg(_G, _G, 2.0), b),
    "sample(t_start)": lambda b: gf.sample(_G, gf.paths.linear(), jnp.ones((2, 2)), prediction="velocity",
                                           solver="euler", steps=2, t_start=b),
    "vdm_elbo(t_min)": lambda b: gf.likelihood.vdm_elbo(_G, gf.paths.vp_cosine(), jnp.ones((2, 2)),
                                                         key=jax.random.key(0), prediction="eps", t_min=b),
}


@pytest.mark.parametrize("bad", [True, False, np.True_, jnp.asarray(False)], ids=repr)
@pytest.mark.parametrize("call", list(_BOOL_FOR_A_REAL), ids=str)
def test_a_bool_where_a_real_is_expected_is_refused_by_name(call, bad):
    """The range checks that let a traced value through (no check can see it) let bools through
    too, as neither is a concrete real; a bool is now refused, naming its argument."""
    arg = call.split("(")[1].rstrip(")")
    with pytest.raises(ValueError, match=rf"^{arg} must be "):
        _BOOL_FOR_A_REAL[call](bad)


def test_a_traced_or_concrete_real_still_passes_those_checks():
    """The same checks, with the values they are meant for: concrete reals (Python, NumPy, 0-d
    arrays) and traced ones under jit."""
    x = jnp.ones((2, 3))
    for std in (2.0, np.float32(2.0), jnp.asarray(2.0)):
        np.testing.assert_allclose(gf.likelihood._ode.gaussian_log_prob(x, std),
                                   -1.5 / 4 - 3 * (np.log(2.0) + 0.5 * np.log(2 * np.pi)), rtol=1e-6)
    traced = jax.jit(gf.likelihood._ode.gaussian_log_prob)(x, 2.0)
    np.testing.assert_allclose(traced, gf.likelihood._ode.gaussian_log_prob(x, 2.0), rtol=1e-6)
    path = jax.jit(lambda s: gf.paths.ve(sigma_min=s, sigma_max=10.0).sigma(jnp.asarray(0.0)))(0.5)
    np.testing.assert_allclose(path, 0.5, rtol=1e-6)


_X4 = jnp.zeros((1, 4, 4, 1))
_BOOL_READ_AS_ONE = {
    # float(np.True_) and float(jnp.asarray(True)) are 1.0: each of these ran the bool as 1
    "cads(psi)": lambda b: gf.guidance.cads(_G, jnp.ones((2, 3)), jax.random.key(0), psi=b),
    "cads(noise_scale)": lambda b: gf.guidance.cads(_G, jnp.ones((2, 3)), jax.random.key(0), noise_scale=b),
    "prior_sample(eta)": lambda b: gf.inverse.prior_sample(_G, gf.paths.vp_cosine(), jnp.ones((2, 2)),
                                                           prediction="x0", steps=2, key=jax.random.key(0), eta=b),
    "w2_sinkhorn(epsilon)": lambda b: gf.metrics.w2_sinkhorn(jnp.ones((3, 2)), jnp.ones((3, 2)), epsilon=b),
    "psnr(data_range)": lambda b: gf.metrics.psnr(_X4, _X4, data_range=b),
    "ssim(sigma)": lambda b: gf.metrics.ssim(_X4, _X4, window=3, sigma=b),
    "flow_objective(sigma)": lambda b: gf.flows.flow_objective(gf.flows.realnvp(2, num_steps=1, hidden=4), "dsm",
                                                               sigma=b),
    "load_digits(test_fraction)": lambda b: gf.data.load_digits(test_fraction=b),
    "prior_term(t1)": lambda b: gf.likelihood.prior_term(gf.paths.vp_cosine(), jnp.ones((2, 2)), t1=b),
    "bits_per_dim(bin_width)": lambda b: gf.likelihood.bits_per_dim(jnp.zeros(2), 4, bin_width=b),
    "truncated_normal_time(tau)": lambda b: gf.likelihood.truncated_normal_time(gf.paths.vp_cosine(), 0.1, tau=b),
    # the checks that ask concrete_real directly (a bool is not a real: None, refused)
    "sample(eta)": lambda b: gf.sample(_G, gf.paths.linear(), jnp.ones((2, 2)), prediction="velocity", solver="ddim",
                                       steps=2, eta=b, key=jax.random.key(0)),
    "sample(churn)": lambda b: gf.sample(_G, gf.paths.linear(), jnp.ones((2, 2)), prediction="velocity",
                                         solver="edm_heun", steps=2, churn=b, key=jax.random.key(0)),
    "sample(rtol)": lambda b: gf.sample(_G, gf.paths.linear(), jnp.ones((2, 2)), prediction="velocity",
                                        solver="tsit5", rtol=b),
    "time_grid(rho)": lambda b: gf.sampling.time_grid(gf.paths.edm(), 4, schedule="karras", rho=b),
    "log_prob(t_max)": lambda b: gf.log_prob(_G, gf.paths.linear(), jnp.ones((2, 2)), prediction="velocity",
                                             t_max=b),
    "ode_log_prob(t1)": lambda b: gf.likelihood.ode_log_prob(_G, jnp.ones((2, 2)), t1=b, log_prior=jnp.sum),
    "solve_assignment(eps)": lambda b: gf.ot.solve_assignment(np.ones((3, 3)), eps=b),
    "lr_schedule(learning_rate)": lambda b: gf.train.lr_schedule(b),
    "langevin_correct(snr)": lambda b: gf.sampling.langevin_correct(
        gf.sampling.Model(_G, gf.paths.linear(), "velocity"), jnp.ones((2, 2)), 0.5, jax.random.key(0), snr=b),
}


@pytest.mark.parametrize("bad", [np.True_, np.asarray(True), jnp.asarray(True)], ids=repr)
@pytest.mark.parametrize("call", list(_BOOL_READ_AS_ONE), ids=str)
def test_a_numpy_or_jax_bool_is_not_read_as_one_by_the_range_checks(call, bad):
    """concrete_real (and so check_real_in, check_positive_real and every check that refuses what it
    cannot read as a real) took float(value) of a NumPy or JAX bool, which is 1.0: eta=np.True_,
    psi=np.True_ or test_fraction=jnp.asarray(True) ran as 1. A bool is now refused, naming its
    argument (a Python bool was refused already)."""
    arg = call.split("(")[1].rstrip(")")
    with pytest.raises(ValueError, match=rf"^(cads: |solver '\w+': option )?{arg} must be "):
        _BOOL_READ_AS_ONE[call](bad)


def test_the_range_checks_still_pass_reals_and_traced_values():
    from genflow._checks import check_positive_real, check_real_in

    for v in (0.5, np.float32(0.5), np.asarray(0.5), jnp.asarray(0.5), 1):
        check_real_in("a", v, 0.0, 1.0)
        check_positive_real("a", v)
    jax.jit(lambda v: check_real_in("a", v, 0.0, 1.0) or check_positive_real("a", v) or v)(0.5)
    with pytest.raises(ValueError, match=r"^a must be a float in \[0, 1\]; got .*bool"):
        jax.jit(lambda v: check_real_in("a", v, 0.0, 1.0))(True)  # (a traced bool is still a bool)
