"""gf.sample's own machinery (its prepared-grid memo, the eager padded path, the solver table,
the start checks), each test written against a bug that the rest of the suite let through
(mutation audit, round 4).

Oracle: N(0, I) data on the linear path x_t = (1 - t) x0 + t eps; its marginal is N(0, s(t)^2 I),
s(t)^2 = (1 - t)^2 + t^2, the probability-flow velocity is v(x, t) = (2t - 1) / s(t)^2 x and the
exact flow map from t = 1 (s = 1) is x(t) = s(t) x1."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf
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
