"""gf.sample's own machinery (its prepared-grid memo, the eager padded path, the solver table,
the start checks), each test written against a bug that the rest of the suite let through
(mutation audit, round 4).

Oracle: N(0, I) data on the linear path x_t = (1 - t) x0 + t eps; its marginal is N(0, s(t)^2 I),
s(t)^2 = (1 - t)^2 + t^2, the probability-flow velocity is v(x, t) = (2t - 1) / s(t)^2 x and the
exact flow map from t = 1 (s = 1) is x(t) = s(t) x1."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf
from conftest import count_compiles, many_arrays
from genflow.sampling import _core


def _s(t):
    return float(np.sqrt((1 - t) ** 2 + t ** 2))


def _velocity(x, t):
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return (2 * t - 1) / ((1 - t) ** 2 + t ** 2) * x


X1 = jax.random.normal(jax.random.key(0), (8, 2))


def test_prepared_grid_memo_tells_t_end_apart():
    """Two calls that differ only in t_end: each ends at its own t_end (a memo key without t_end
    returned the first call's grid: samples at the wrong time)."""
    _core._PREPARED.clear()
    path = gf.paths.linear()
    for t_end in (0.25, 0.5):
        x, info = gf.sample(_velocity, path, X1, prediction="velocity", solver="heun", steps=16, t_end=t_end)
        assert float(info.ts[-1]) == t_end
        np.testing.assert_allclose(x, _s(t_end) * X1, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("solver", ["heun", "dpm++2m"])
def test_save_trajectory_after_a_plain_call_with_equal_arguments(solver):
    """The memoised grid of a call without a trajectory (padded to its bucket, traced step
    count) is not reused by an equal call that saves one: the trajectory has steps + 1 states
    on info.ts, from x1 to the samples."""
    _core._PREPARED.clear()
    path = gf.paths.linear()
    kw = dict(prediction="velocity", solver=solver, steps=10, t_end=0.2)
    x_plain, _ = gf.sample(_velocity, path, X1, **kw)
    x, info = gf.sample(_velocity, path, X1, save_trajectory=True, **kw)
    assert info.trajectory.shape == (11,) + X1.shape
    np.testing.assert_allclose(info.trajectory[0], X1)
    np.testing.assert_allclose(info.trajectory[-1], x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x, x_plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(info.trajectory[5], _s(float(info.ts[5])) * X1, rtol=2e-2, atol=2e-2)


def test_prepared_grid_memo_tells_x64_mode_apart():
    """A grid prepared in float32 is not reused once jax_enable_x64 is on (the memo's key holds the
    default float dtype): the float64 call gets a float64 grid, the same as a fresh preparation."""
    _core._PREPARED.clear()
    kw = dict(prediction="velocity", solver="dpm++2m", steps=8, schedule="logsnr", t_end=0.2)
    gf.sample(_velocity, gf.paths.linear(), X1, **kw)
    with jax.enable_x64(True):
        x64 = X1.astype(jnp.float64)
        _, info = gf.sample(_velocity, gf.paths.linear(), x64, **kw)
        assert info.ts.dtype == jnp.float64
        x_hit, _ = gf.sample(_velocity, gf.paths.linear(), x64, **kw)
        _core._PREPARED.clear()
        x_fresh, _ = gf.sample(_velocity, gf.paths.linear(), x64, **kw)
        np.testing.assert_array_equal(x_hit, x_fresh)


def test_a_path_function_with_data_in_its_defaults_is_not_memoised():
    """A path function with default arguments (state the memo cannot see change) is prepared afresh
    on every call, as one holding state in its closure (genflow._memo.holds_state: kept, the memo
    would keep that state alive and go stale when it changed)."""
    def sigma(t, power=1.0):
        return t ** power

    path = gf.paths.Path(alpha_fn=lambda t: 1.0 - t, sigma_fn=sigma, name="defaults")
    _core._PREPARED.clear()
    for _ in range(2):
        gf.sample(_velocity, path, X1, prediction="velocity", solver="dpm++2m", steps=8, t_end=0.2)
    assert len(_core._PREPARED) == 0


def test_kept_scalars_tell_signed_zeros_apart():
    """genflow._memo.kept_scalar keys by the exact bits: -0.0 after 0.0 keeps its sign."""
    from genflow import _memo

    _memo._LEAVES.clear()
    assert not np.signbit(np.asarray(_memo.kept_scalar(0.0)))
    assert np.signbit(np.asarray(_memo.kept_scalar(-0.0)))


@pytest.mark.parametrize("solver", [s for s, spec in gf.sampling.solvers().items()
                                    if not spec.adaptive and s != "restart"])
def test_info_nfe_is_steps_times_the_tables_nfe_per_step(solver):
    """solvers()[s].nfe_per_step is what a step costs: on a grid that ends above sigma = 0 (no
    shortened last step), without denoising, info.nfe == steps * nfe_per_step for every
    fixed-step solver (restart adds its restarts; documented separately)."""
    spec = gf.sampling.solvers()[solver]
    path = gf.paths.linear()
    t_start = 0.999 if spec.target == "sde" or solver == "pc" else 1.0
    _, info = gf.sample(_velocity, path, X1, prediction="velocity", solver=solver, steps=6, t_start=t_start,
                        t_end=0.2, denoise=False, key=jax.random.key(1))
    assert int(info.nfe) == 6 * spec.nfe_per_step, (solver, int(info.nfe), spec.nfe_per_step)


def test_register_refuses_order_zero():
    """register documents order > 0 (solvers() reports it; 0 is no convergence order)."""
    spec = dataclasses.replace(gf.sampling.solvers()["heun"], name="test_order_zero_4a", order=0)
    with pytest.raises(ValueError, match="spec.order must be a number > 0"):
        gf.sampling.register(spec)
    assert "test_order_zero_4a" not in gf.sampling.solvers()


def test_a_posterior_model_is_refused_where_the_model_it_wraps_is_singular():
    """gf.sample checks the start for the kind it samples AND the kind of the model a
    posterior_model wraps: an eps model wrapped as x0 from t_start = 1 on the linear path
    (alpha = 0: eps -> x0 is 0/0) is refused as the eps model itself is."""
    inv = gf.inverse
    path = gf.paths.linear()
    eps_fn = lambda x, t: x  # noqa: E731  (any eps model: the conversion is singular at alpha = 0)
    pm = inv.posterior_model(eps_fn, path, X1, inv.denoising(), prediction="eps", noise=inv.GaussianNoise(0.1))
    with pytest.raises(ValueError, match="alpha=0"):
        gf.sample(pm, path, X1, prediction="x0", solver="dpm++2m", steps=4, t_start=1.0)


@pytest.mark.parametrize("solver, tol", [("dpm++2s", 0.05), ("dpm++3s", 2e-3)])
def test_single_step_solvers_on_the_eager_padded_path_follow_the_exact_flow(solver, tol):
    """gf.sample's default eager path (grid padded to its bucket, stage points from grid_scalars,
    clipped to [t_end, t_start]) for the solvers with intermediate stages: the samples follow the
    exact flow map (measured 2.2e-2 / 2.6e-4 at 8 steps; stage times clipped to the wrong ends
    gave 0.25 / 0.38). test_sampling_orders checks the orders through step_scalars, not this path."""
    x, _ = gf.sample(_velocity, gf.paths.linear(), X1, prediction="velocity", solver=solver, steps=8, t_end=0.2,
                     denoise=False)
    assert float(jnp.max(jnp.abs(x - _s(0.2) * X1))) < tol


def test_integer_noise_is_refused():
    """x1 must be floating point (gf.sample would otherwise return its samples cast to x1's
    integer dtype: truncated, silently)."""
    with pytest.raises(TypeError, match="x1 must be a floating-point array"):
        gf.sample(_velocity, gf.paths.linear(), (3 * X1).astype(jnp.int32), prediction="velocity", solver="heun",
                  steps=4, t_end=0.2)


def _sample_10b(path, x1, steps, **kw):
    g = gf.oracles.Gaussian.diagonal(jnp.array([0.3, -0.2]), jnp.array([0.5, 0.8]))
    return gf.sample(g.model(path, "x0"), path, x1, steps=steps, prediction="x0", solver="dpm++2m", **kw)


def test_prepared_grid_memo_keys_an_array_parameter_by_its_shape():
    """A path parameter of shape [1] is refused (not a scalar); a call with the same bytes as a
    0-d array before it must not make it a memo hit that skips the check."""
    _core._PREPARED.clear()
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    bad = gf.paths.vp_linear(beta_max=jnp.asarray([20.0]))
    with pytest.raises(TypeError):
        _sample_10b(bad, x1, 4)
    _sample_10b(gf.paths.vp_linear(beta_max=jnp.asarray(20.0)), x1, 4)
    with pytest.raises(TypeError):
        _sample_10b(bad, x1, 4)


def test_prepared_grid_memo_keys_a_numpy_scalar_by_its_dtype():
    """steps=np.True_ is refused; np.int8(1) before it (the same single byte) must not make it a hit."""
    _core._PREPARED.clear()
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    path = gf.paths.vp_linear()
    with pytest.raises(ValueError, match="steps"):
        _sample_10b(path, x1, np.True_)
    _sample_10b(path, x1, np.int8(1))
    with pytest.raises(ValueError, match="steps"):
        _sample_10b(path, x1, np.True_)


def test_kept_path_scalars_are_float64_under_x64_after_a_float32_call():
    """A path's float hyper-parameters kept from a float32 call must not be reused (as float32
    values) once x64 is on: the float64 samples equal a fresh float64 run."""
    from genflow import _memo
    path = gf.paths.vp_linear(beta_min=0.1, beta_max=20.3)
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    fn = lambda x, t: 0.3 * x  # noqa: E731
    kw = dict(prediction="eps", solver="euler", steps=8)
    _memo._LEAVES.clear()
    gf.sample(fn, path, x1, **kw)
    with jax.enable_x64(True):
        assert _memo.kept_scalar(0.1).dtype == jnp.float64
        hit, _ = gf.sample(fn, path, x1.astype(jnp.float64), **kw)
        _memo._LEAVES.clear()
        _core._PREPARED.clear()
        fresh, _ = gf.sample(fn, path, x1.astype(jnp.float64), **kw)
        np.testing.assert_array_equal(hit, fresh)


def test_lru_table_keeps_the_recently_used_entry():
    """lru_get marks an entry most recently used: past the size, the least recently *used*
    entry goes, not the oldest inserted."""
    from genflow import _memo

    table = collections.OrderedDict()
    for k in range(3):
        _memo.lru_put(table, k, str(k), 3)
    assert _memo.lru_get(table, 0) == "0"
    _memo.lru_put(table, 3, "3", 3)
    assert list(table) == [2, 0, 3]


def test_a_path_closing_over_a_plain_function_is_memoised():
    """holds_state: a path function that closes over a plain function holding nothing is data-free,
    so its grid is kept (the built-in edm / ve no longer have such closures: test_sampling's
    edm / ve test no longer exercises this)."""
    def base(t):
        return t

    path = gf.paths.Path(alpha_fn=lambda t: 1.0 - base(t), sigma_fn=lambda t: base(t), name="closure")
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    _core._PREPARED.clear()
    for _ in range(2):
        gf.sample(lambda x, t: -x, path, x1, prediction="velocity", solver="dpm++2m", steps=4, t_end=0.2)
    assert len(_core._PREPARED) == 1


def test_debug_infs_switched_on_after_a_first_call_is_honoured():
    """checked_twin: jax_debug_infs (not only jax_debug_nans) turned on after a compiled sampler
    ran once makes the next call raise on an inf."""
    path = gf.paths.linear()
    fn = lambda x, t: jnp.exp(1000.0 * x)  # noqa: E731  (inf)
    kw = dict(prediction="velocity", solver="euler", steps=4)
    gf.sample(fn, path, jnp.ones((4, 2)), **kw)
    jax.config.update("jax_debug_infs", True)  # (the global setting: the context manager did not show the bug)
    try:
        with pytest.raises(FloatingPointError):
            gf.sample(fn, path, jnp.ones((4, 2)), **kw)
    finally:
        jax.config.update("jax_debug_infs", False)


def test_adaptive_solvers_report_no_nfe_per_step():
    """SolverSpec.nfe_per_step is None for adaptive step counts (documented)."""
    for name, spec in gf.sampling.solvers().items():
        assert (spec.nfe_per_step is None) == spec.adaptive, name


def test_model_passes_a_float32_time_for_a_bfloat16_state():
    """Model docstring: t is broadcast to [B] in float32 (float64 for float64 states), also for a
    bfloat16 state (in bfloat16, t = 0.999 would reach the network as 1.0)."""
    seen = []

    def fn(x, t):
        seen.append(t)
        return jnp.zeros_like(x)

    m = gf.sampling.Model(fn, gf.paths.vp_linear(), "eps")
    for call in (lambda x: m.raw(x, 0.999), lambda x: m.predict(x, 0.999, "x0"), lambda x: m.x0_eps(x, 0.999)):
        out = call(jnp.ones((2, 2), jnp.bfloat16))
        assert jax.tree_util.tree_leaves(out)[0].dtype == jnp.bfloat16
        assert seen[-1].dtype == jnp.float32 and seen[-1].shape == (2,)
        np.testing.assert_array_equal(seen[-1], np.float32(0.999))


def test_reverse_drift_of_a_float64_state_is_float64_accurate():
    """Model.reverse_drift = f x - g^2 score in the state's float64 precision (closed form from
    the Gaussian oracle's score and the path's alpha, sigma)."""
    with jax.enable_x64(True):
        path = gf.paths.vp_linear()
        g = gf.oracles.Gaussian.diagonal(jnp.array([0.3, -0.2], jnp.float64), jnp.array([0.5, 0.8], jnp.float64))
        model = gf.sampling.Model(g.model(path, "eps"), path, "eps")
        x, t = jnp.array([[0.7, -1.1]], jnp.float64), 0.3
        tt = jnp.float64(t)
        f = jax.grad(path.alpha)(tt) / path.alpha(tt)
        g2 = jax.grad(lambda u: path.sigma(u) ** 2)(tt) - 2 * f * path.sigma(tt) ** 2
        ref = f * x - g2 * g.score(x, jnp.full((1,), t, jnp.float64), path)
        d = model.reverse_drift(x, t)
        assert d.dtype == jnp.float64
        np.testing.assert_allclose(d, ref, rtol=1e-12)


@pytest.mark.parametrize("solver", ["dpm++2s", "deis"])
def test_a_traced_grid_samples_as_the_same_concrete_grid(solver):
    """gf.sample with ``schedule=`` a grid traced under jit (e.g. inside a schedule search) gives the
    eager result on the same concrete grid, also for the solvers with intermediate stage points
    (their stage times are clipped to [ts[-1], ts[0]]; with the ends swapped on the traced path,
    dpm++2s was 3.8 off and deis 460x the value)."""
    path = gf.paths.vp_cosine()
    m = gf.oracles.Gaussian.diagonal(np.array([1.0, -1.0]), np.array([0.5, 0.2])).model(path, "eps")
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    ts = jnp.asarray(gf.sampling.time_grid(path, 8, "uniform"))
    run = lambda ts: gf.sample(m, path, x1, prediction="eps", solver=solver, steps=8, schedule=ts)[0]  # noqa: E731
    np.testing.assert_allclose(jax.jit(run)(ts), run(ts), rtol=1e-5, atol=1e-5)


def test_brownian_tol_is_checked_against_the_smallest_step_of_a_nonuniform_grid():
    """gf.sample refuses brownian_tol larger than the grid's SMALLEST step (a coarser Brownian tree
    interpolates inside its leaves: the wrong law) -- on a non-uniform grid too, where the largest
    step is bigger than the tolerance."""
    path = gf.paths.vp_cosine()
    ts = jnp.asarray([1.0, 0.6, 0.5, 0.49, 0.0]) * (1 - 1e-3) + 1e-3  # steps 0.4, 0.1, 0.01, 0.49
    g = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.ones(2))
    with pytest.raises(ValueError, match="smallest step"):
        gf.sample(g.model(path, "eps"), path, jnp.ones((2, 2)), prediction="eps", solver="euler_maruyama",
                  schedule=ts, key=jax.random.key(0), brownian_tol=0.05)


def test_euler_maruyama_may_end_where_the_diffusion_is_not_finite():
    """The end-of-step g^2 check is for the SDE solvers that evaluate there (shark); euler_maruyama
    evaluates only at step starts and may end at t = 0 where an autodiff vp_linear's g^2 is NaN."""
    vp = dataclasses.replace(gf.paths.vp_linear(), diffusion_sq_fn=None)
    assert not np.isfinite(float(vp.diffusion_sq(jnp.asarray(0.0))))
    g = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.ones(2))
    x1 = g.prior_sample(jax.random.key(0), 4, vp)
    x, _ = gf.sample(g.model(vp, "eps"), vp, x1, prediction="eps", solver="euler_maruyama", steps=10, t_end=0.0,
                     key=jax.random.key(1))
    assert np.all(np.isfinite(np.asarray(x)))
    with pytest.raises(ValueError, match="g\\^2 = diffusion_sq"):
        gf.sample(g.model(vp, "eps"), vp, x1, prediction="eps", solver="shark", steps=10, t_end=0.0,
                  key=jax.random.key(1))


def test_a_one_dimensional_batch_is_sampled():
    """x1 needs only a batch dimension: shape [B] (scalar samples) is accepted."""
    lin = gf.paths.linear()
    x, _ = gf.sample(lambda x, t: -x, lin, jnp.ones((5,)), prediction="velocity", solver="euler", steps=4)
    assert x.shape == (5,)


def test_a_fixed_step_sde_solve_is_not_capped_by_max_steps():
    """max_steps caps adaptive solves only: a fixed-step Diffrax solve takes its `steps` steps."""
    g = gf.oracles.Gaussian.diagonal(jnp.zeros(2), jnp.ones(2))
    lin = gf.paths.linear()
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    x, info = gf.sample(g.model(lin, "velocity"), lin, x1, prediction="velocity", solver="euler_maruyama", steps=20,
                        max_steps=8, key=jax.random.key(0), t_start=0.99, t_end=1e-3)
    assert np.all(np.isfinite(np.asarray(x))) and int(info.nfe) == 20


def test_a_start_where_alpha_rounds_below_zero_is_refused():
    """A path written as alpha = cos(pi t / 2) has alpha(1) = -4.4e-8 in float32: the eps -> x0
    conversion there divides by a rounding error (samples of ~4e7); gf.sample refuses any alpha < 0."""
    path = gf.paths.Path(alpha_fn=lambda t: jnp.cos(jnp.pi * t / 2), sigma_fn=lambda t: jnp.sin(jnp.pi * t / 2),
                         name="naive_cos")
    assert float(path.alpha(jnp.asarray(1.0))) < 0
    x1 = jax.random.normal(jax.random.key(0), (4, 2))
    with pytest.raises(ValueError, match="< 0"):
        gf.sample(lambda x, t: jnp.zeros_like(x), path, x1, prediction="eps", solver="ddim", steps=4, t_end=1e-3)


def test_a_first_call_of_a_solver_compiles_its_pieces_not_each_operation():
    """gf.sample's grid preparation folded every constant operation of its compiled pieces into a
    program of its own (its build ran under jax.ensure_compile_time_eval, which JAX carries into the
    functions traced inside): a first dpm++3m call compiled 34 programs, unipc 15, deis 12
    (measured), now 2-4. The same holds under a caller's jit, where that setting is needed."""
    path = gf.paths.vp_linear()
    g = gf.oracles.GaussianMixture.random(jax.random.key(0), 3, 5)
    x1 = jax.random.normal(jax.random.key(1), (11, 5))
    m = g.model(path, "eps")
    gf.sample(m, path, x1, prediction="eps", solver="ddim", steps=9)  # (the pieces all solvers share)
    for solver in ("dpm++3m", "unipc", "deis"):
        assert count_compiles(lambda: gf.sample(m, path, x1, prediction="eps", solver=solver, steps=9)) <= 4, solver
    under_jit = jax.jit(lambda x: gf.sample(m, path, x, prediction="eps", solver="dpm++2s", steps=9)[0])
    assert count_compiles(lambda: under_jit(x1)) <= 4


def test_a_compiled_sampler_holds_one_copy_of_a_large_network():
    """Every solver traces a network of many arrays once, whatever its evaluations per step: the
    single-step solvers called it once per stage (DPM-Solver++(3S)'s program held 3 copies of it,
    2S's and EDM's Heun's 2, Restart's 4 and pc's 2: each copy compiled again, which with a U-Net is
    most of the compile time). Counted as the copies of a marker operation in the lowered program.
    Two solvers keep a second site: the adaptive Diffrax solvers evaluate once before their loop
    (the first stage of their FSAL tableau), and Restart's restart loop is a Heun step of its own (in
    one scan with the regular step, its skipped iterations made a 20-step CPU solve ~30% slower). A
    network of few arrays is called stage after stage (a scan's stage buffers cost more than such a
    network).

    The final denoising step (vp_linear's default) is the last iteration of the loop of the
    solvers with a denoise row (the multistep ones, EDM's Heun and Restart), and the adaptive
    solvers convert their last (first-same-as-last) evaluation: no copy of its own (it was one more for
    every solver); the others call the network once more after their loop."""
    path = gf.paths.vp_linear()
    base = gf.oracles.Gaussian.diagonal([1.0, -1.0], [0.5, 0.2]).model(path, "eps")
    marked = lambda x, t: base(x, t) + 0.0 * jax.lax.bessel_i1e(x)  # noqa: E731
    x1, key = jnp.zeros((3, 2)), jax.random.key(0)

    def copies(fn, solver, denoise=False):
        sample = jax.jit(lambda x1, k: gf.sample(fn, path, x1, prediction="eps", solver=solver, steps=4,
                                                 key=k, denoise=denoise)[0])
        return sample.lower(x1, key).as_text().count("bessel_i1e")

    large = many_arrays(marked)
    table = gf.sampling.solvers()
    loop = {s: 2 if spec.adaptive or s == "restart" else 1 for s, spec in table.items()}
    assert {s: copies(large, s) for s in table} == loop
    folded = {s for s, spec in table.items() if spec.stepper is not None and spec.stepper.denoise_row is not None}
    assert folded == {"ddim", "ddpm", "dpm++2m", "dpm++3m", "dpm++3m_ref", "deis", "unipc", "dpm++2m_hb", "edm_heun",
                      "edm_heun_churn", "restart"}
    reused = {"tsit5", "dopri5", "dopri8"}  # (first-same-as-last tableaus)
    assert {s: copies(large, s, True) for s in table} == {s: n + (s not in folded | reused) for s, n in loop.items()}
    assert copies(marked, "dpm++3s") == 3 and copies(marked, "edm_heun") == 2  # (few arrays: stage by stage)
    assert copies(marked, "dpm++2m", True) == 1 and copies(marked, "edm_heun", True) == 2


DENOISE_ROWS = [("ddim", {}), ("ddim", {"eta": 0.5}), ("ddpm", {}), ("dpm++2m", {}), ("dpm++3m", {}),
                ("dpm++3m_ref", {}), ("deis", {}), ("deis", {"form": "x0"}), ("unipc", {}), ("unipc", {"order": 3}),
                ("dpm++2m_hb", {}), ("edm_heun", {}), ("edm_heun_churn", {}), ("restart", {})]


@pytest.mark.parametrize("solver, options", DENOISE_ROWS)
def test_the_denoising_iteration_is_one_tweedie_step_after_the_solve(solver, options):
    """Where the final denoising step runs as the last iteration of the solver's loop (its denoise
    row), the sample is exactly the Tweedie step x0_hat(x, t_end) of the un-denoised solve's state,
    one evaluation more, on the padded program (a traced step count) and (vp_linear) on the saved
    trajectory's;
    the trajectory and the step count are the solve's. Float64, a mixture oracle on the two kinds
    of paths that denoise (vp, edm), three prediction kinds; a row that took another slot of the
    history, or kept the state's weight, fails."""
    with jax.enable_x64(True):
        g = gf.oracles.GaussianMixture.random(jax.random.key(0), 3, 4)
        for path, kind in ((gf.paths.vp_linear(), "eps"), (gf.paths.edm(), "x0"), (gf.paths.vp_cosine(10.0), "v")):
            x1 = path.prior_sample(jax.random.key(1), (6, 4)).astype(jnp.float64)
            kw = dict(prediction=kind, solver=solver, steps=5, key=jax.random.key(2), **options)
            for save in (False, True) if kind == "eps" else (False,):
                x, info = gf.sample(g.model(path, kind), path, x1, denoise=True, save_trajectory=save, **kw)
                y, ref = gf.sample(g.model(path, kind), path, x1, denoise=False, save_trajectory=save, **kw)
                t_end = jnp.full((6,), info.ts[-1])
                np.testing.assert_allclose(np.asarray(x), np.asarray(g.x0(y, t_end, path)), rtol=1e-13, atol=1e-13)
                assert int(info.nfe) == int(ref.nfe) + 1
                assert int(info.stats["num_steps"]) == int(ref.stats["num_steps"]) == 5
                if save:
                    np.testing.assert_array_equal(np.asarray(info.trajectory), np.asarray(ref.trajectory))
                    np.testing.assert_array_equal(np.asarray(info.trajectory[-1]), np.asarray(y))


def test_an_x0_model_denoised_at_sigma_zero_is_finite():
    """A grid that ends at sigma = 0 and denoises (vp_linear's default for t_end = 0): the denoising
    iteration weights the noise prediction by 0, and an x0 model's is infinite there (0 * inf: NaN
    samples from ddim, ddpm, deis, edm_heun, churn and restart in the first version of the fold).
    It is not folded there: the samples are the x0 model's output on the un-denoised state."""
    path = gf.paths.vp_linear()
    g = gf.oracles.GaussianMixture.random(jax.random.key(0), 3, 4)
    x1 = path.prior_sample(jax.random.key(1), (6, 4))
    fn = g.model(path, "x0")
    for solver in ("ddim", "ddpm", "deis", "edm_heun", "edm_heun_churn", "restart", "dpm++2m"):
        kw = dict(prediction="x0", solver=solver, steps=5, t_end=0.0, key=jax.random.key(3))
        x, info = gf.sample(fn, path, x1, **kw)
        y, ref = gf.sample(fn, path, x1, denoise=False, **kw)
        assert int(info.nfe) == int(ref.nfe) + 1, solver
        np.testing.assert_allclose(np.asarray(x), np.asarray(fn(y, jnp.zeros((6,)))), rtol=1e-6, atol=1e-6,
                                   err_msg=solver)


def test_gradients_flow_through_the_denoising_iteration():
    """d/d x1 of a denoised DPM-Solver++(2M) / UniPC / EDM Heun sample (its denoising step inside the
    loop) equals that of the un-denoised solve composed with the oracle's Tweedie step (float64)."""
    with jax.enable_x64(True):
        path = gf.paths.vp_linear()
        g = gf.oracles.GaussianMixture.random(jax.random.key(0), 3, 4)
        x1 = path.prior_sample(jax.random.key(1), (3, 4)).astype(jnp.float64)
        fn = g.model(path, "eps")
        for solver in ("dpm++2m", "unipc", "edm_heun"):
            kw = dict(prediction="eps", solver=solver, steps=4)
            t_end = jnp.full((3,), gf.sample(fn, path, x1, **kw)[1].ts[-1])
            a = jax.grad(lambda x: jnp.sum(jnp.sin(gf.sample(fn, path, x, **kw)[0])))(x1)
            b = jax.grad(lambda x: jnp.sum(jnp.sin(g.x0(gf.sample(fn, path, x, denoise=False, **kw)[0], t_end,
                                                         path))))(x1)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12, err_msg=solver)


def test_an_adaptive_solve_denoises_from_its_last_evaluation():
    """tsit5, dopri5 and dopri8 (first-same-as-last: a step's last stage is evaluated at its end) denoise
    with the velocity their last step evaluated at (x, t_end), converted to x0_hat: the sample is
    the Tweedie step of the un-denoised solve's state up to rounding, with no evaluation added, the
    same trajectory and (here, float64) step counts, and gradients through it equal the composition's (float64,
    mixture oracle, three paths and kinds). Where sigma(t_end) = 0 (vp_cosine's t = 0), or where
    sigma / alpha is flat at t_end, the velocity cannot give x0_hat, and the model is called once
    more, as before."""
    with jax.enable_x64(True):
        g = gf.oracles.GaussianMixture.random(jax.random.key(0), 3, 4)
        for path, kind, end, solvers in ((gf.paths.vp_linear(), "eps", None, ("tsit5", "dopri5")),
                                         (gf.paths.edm(), "x0", None, ("dopri8",)),
                                         (gf.paths.vp_cosine(), "v", 0.05, ("tsit5",))):
            x1 = path.prior_sample(jax.random.key(1), (6, 4)).astype(jnp.float64)
            fn = g.model(path, kind)
            for solver in solvers:
                kw = dict(prediction=kind, solver=solver, t_end=end, denoise=True, rtol=1e-6, atol=1e-6)
                for save in (False, True) if solver == "tsit5" else (False,):
                    x, info = gf.sample(fn, path, x1, save_trajectory=save, steps=5, **kw)
                    y, ref = gf.sample(fn, path, x1, save_trajectory=save, steps=5, **{**kw, "denoise": False})
                    t_end = jnp.full((6,), info.ts[-1])
                    np.testing.assert_allclose(np.asarray(x), np.asarray(g.x0(y, t_end, path)), rtol=1e-13,
                                               atol=1e-13, err_msg=f"{solver} {kind}")
                    assert int(info.nfe) == int(ref.nfe), (solver, kind)
                    assert {k: int(v) for k, v in info.stats.items()} == {k: int(v) for k, v in ref.stats.items()}
                    if save:
                        np.testing.assert_array_equal(np.asarray(info.trajectory), np.asarray(ref.trajectory))
            if kind == "eps":
                kw = dict(prediction=kind, solver="tsit5", rtol=1e-8, atol=1e-8)
                t_end = jnp.full((6,), gf.sample(fn, path, x1, **kw)[1].ts[-1])
                a = jax.grad(lambda x: jnp.sum(jnp.sin(gf.sample(fn, path, x, **kw)[0])))(x1)
                b = jax.grad(lambda x: jnp.sum(jnp.sin(g.x0(gf.sample(fn, path, x, denoise=False, **kw)[0], t_end,
                                                             path))))(x1)
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
        # (sigma / alpha flat at t = 0 on the second path: alpha' and sigma' cancel, the velocity holds
        # no x0 there, and the conversion gave inf / NaN samples in the first version: review)
        flat = gf.paths.Path(alpha_fn=jnp.ones_like, sigma_fn=lambda t: 0.02 + 10.0 * t**2, name="flat_end",
                             t_min=0.0, denoise_at_end=True)
        for path, solver in ((gf.paths.vp_cosine(), "tsit5"), (gf.paths.vp_cosine(), "dopri8"), (flat, "tsit5")):
            x1 = path.prior_sample(jax.random.key(1), (6, 4)).astype(jnp.float64)
            fn = g.model(path, "eps")
            kw = dict(prediction="eps", solver=solver, t_end=0.0, rtol=1e-6, atol=1e-6)
            x, info = gf.sample(fn, path, x1, denoise=True, **kw)
            y, ref = gf.sample(fn, path, x1, denoise=False, **kw)
            assert int(info.nfe) == int(ref.nfe) + 1, solver
            np.testing.assert_allclose(np.asarray(x), np.asarray(g.x0(y, jnp.full((6,), info.ts[-1]), path)),
                                       rtol=1e-13, atol=1e-13, err_msg=solver)


@pytest.mark.parametrize("solver, options", [("dpm++2s", {}), ("dpm++3s", {}), ("edm_heun", {}),
                                             ("edm_heun_churn", {}), ("restart", {}), ("pc", {"corrector_steps": 2})])
def test_stage_scan_and_stage_by_stage_calls_sample_alike(solver, options):
    """The two ways of evaluating a step's stages (a scan over them for a network of many arrays,
    stage-by-stage calls for a small one) give the same float64 samples, up to rounding, on a
    mixture oracle with a grid that ends at sigma = 0 (the last step's own rule) and one that does
    not; in the same number of evaluations."""
    with jax.enable_x64(True):
        path = gf.paths.vp_cosine()
        g = gf.oracles.GaussianMixture.random(jax.random.key(0), 3, 4)
        small = g.model(path, "velocity")
        x1 = jax.random.normal(jax.random.key(1), (16, 4), jnp.float64)
        for t_end in (None, 0.05):
            kw = dict(prediction="velocity", solver=solver, steps=7, schedule="karras", key=jax.random.key(2),
                      t_end=t_end, **options)
            a, info_a = gf.sample(small, path, x1, **kw)
            b, info_b = gf.sample(many_arrays(small), path, x1, **kw)
            assert a.dtype == jnp.float64 and int(info_a.nfe) == int(info_b.nfe)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
