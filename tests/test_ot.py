"""Exact minibatch OT (genflow.ot and the OT coupling of genflow.losses): optimal costs equal
SciPy's on raw costs and brute force on small problems; the dual preconditioner never changes
the optimum."""

import gc
import itertools
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import genflow as gf
from conftest import count_compiles
from genflow import ot


def _moons_np(rng, n):
    up = rng.permutation(np.arange(n) < n // 2)
    th = rng.uniform(0, np.pi, n)
    x = np.where(up, np.cos(th), 1 - np.cos(th))
    y = np.where(up, np.sin(th), 0.5 - np.sin(th))
    return 2.0 * (np.stack([x, y], -1) + 0.05 * rng.standard_normal((n, 2)) - [0.5, 0.25])


def _problems(seed=0):
    """Many random problems of varied structure: [(name, cost [n, n] float64)]."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(6):  # the training problem: moons data vs Gaussian noise
        a, b = _moons_np(rng, 256), rng.standard_normal((256, 2))
        out.append(("moons-gauss-256", ot.sq_distances(a, b)))
    for k in range(30):
        out.append(("uniform-64", rng.random((64, 64))))
    for k in range(20):  # integer costs: many ties
        out.append(("int-ties-48", rng.integers(0, 5, (48, 48)).astype(np.float64)))
    for k in range(10):  # high-dimensional Gaussians, large spread of magnitudes
        a, b = rng.standard_normal((96, 16)) * 10, rng.standard_normal((96, 16)) + 3
        out.append(("gauss16-96", ot.sq_distances(a, b)))
    for k in range(10):  # negative and mixed-sign costs
        out.append(("signed-40", rng.standard_normal((40, 40)) * 100))
    return out


def _scipy_cost(c):
    r, col = linear_sum_assignment(c)
    return c[r, col].sum()


def _is_perm(p):
    return np.array_equal(np.sort(p, axis=-1), np.broadcast_to(np.arange(p.shape[-1]), p.shape))


def _exact_sq_distances(a, b):
    return ((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("shape,offset", [((64, 16), 0.0), ((3, 20, 8), 1e3), ((32, 784), -50.0), ((40, 4), 1e4)])
def test_sq_distances_gram_form_is_accurate_and_keeps_exact_optima(shape, offset):
    # From 4 features NumPy computes the Gram form of centred points: accurate to ~1e-16 of the
    # squared spread even far from the origin (the offset), and the exact-OT optimum on it is the
    # optimum of the exact costs.
    rng = np.random.default_rng(shape[-1])
    a, b = rng.standard_normal(shape) + offset, rng.standard_normal(shape) * 2 + offset
    got, ref = ot.sq_distances(a, b), _exact_sq_distances(a, b)
    assert got.dtype == np.float64 and got.shape == ref.shape and np.all(got >= 0)
    spread = np.max(_exact_sq_distances(np.concatenate([a, b], -2), np.concatenate([a, b], -2)))
    assert np.max(np.abs(got - ref)) <= 1e-14 * spread, np.max(np.abs(got - ref)) / spread
    perm = ot.solve_ot_points(a, b)
    best = np.array([_scipy_cost(c) for c in ref.reshape((-1,) + ref.shape[-2:])])
    mine = ot.assignment_cost(ref, perm).reshape(-1)
    np.testing.assert_allclose(mine, best, rtol=1e-12)


def test_sq_distances_of_empty_batches_and_featureless_points():
    for shape in ((0, 8), (2, 0, 5), (4, 0)):
        z = np.zeros(shape)
        for fn in (ot.sq_distances, ot.exact_sq_distances):
            got = fn(z, z)
            assert got.shape == shape[:-1] + (shape[-2],) and not np.any(got), (fn.__name__, shape)


@pytest.mark.parametrize("shape", [(7, 1), (256, 2), (3, 33, 5)])
def test_sq_distances_match_brute_force(shape):
    # NumPy and JAX paths against the definition, with leading batch dims.
    rng = np.random.default_rng(len(shape))
    a, b = rng.standard_normal(shape) * 3, rng.standard_normal(shape) + 1
    lead, n = shape[:-2], shape[-2]
    ref = np.zeros(lead + (n, n))
    for idx in np.ndindex(*lead):
        for i in range(n):
            for j in range(n):
                ref[idx + (i, j)] = sum((a[idx + (i, f)] - b[idx + (j, f)]) ** 2 for f in range(shape[-1]))
    got = ot.sq_distances(a, b)  # feature-at-a-time below 4 features, the centred Gram form at 5
    assert got.dtype == np.float64 and got.shape == lead + (n, n)
    np.testing.assert_allclose(got, ref, rtol=1e-14, atol=1e-12)
    exact = ot.exact_sq_distances(a, b)  # the difference form at any F
    assert exact.dtype == np.float64 and exact.shape == lead + (n, n)
    np.testing.assert_allclose(exact, ref, rtol=1e-15, atol=1e-13)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(ot.sq_distances(jnp.asarray(a), jnp.asarray(b))), ref, rtol=1e-12)


@pytest.mark.parametrize("precondition", [True, False])
def test_same_optimal_cost_as_scipy(precondition):
    for name, c in _problems():
        p = ot.solve_assignment(c, precondition=precondition)
        assert _is_perm(p), name
        ref = _scipy_cost(c)
        got = ot.assignment_cost(c, p)
        assert abs(got - ref) <= 1e-9 * max(1.0, abs(ref)), (name, got, ref)


def test_brute_force_small_problems():
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 4, 5, 6):
        perms = np.array(list(itertools.permutations(range(n))))
        for k in range(40):
            kind = k % 3
            if kind == 0:
                c = rng.random((n, n))
            elif kind == 1:
                c = rng.integers(0, 3, (n, n)).astype(np.float64)  # ties
            else:
                c = ot.sq_distances(rng.standard_normal((n, 2)), rng.standard_normal((n, 2)) * 2)
            best = c[np.arange(n), perms].sum(1).min()
            for pre in (True, False):
                p = ot.solve_assignment(c, precondition=pre)
                assert _is_perm(p)
                assert abs(ot.assignment_cost(c, p) - best) <= 1e-12 * max(1.0, best), (n, k, pre)


def test_preconditioner_cannot_change_the_optimum():
    rng = np.random.default_rng(2)
    c = ot.sq_distances(_moons_np(rng, 128), rng.standard_normal((128, 2)))
    ref = _scipy_cost(c)
    # the Sinkhorn potential, one so sharp that the scaling form overflows (fallback), and an
    # arbitrary shift: all give the same optimal cost
    for eps, iters, omega in ((0.1, 40, 1.0), (0.1, 20, 1.8), (0.1, 20, 1.99), (1e-4, 40, 1.8), (5.0, 3, 1.0), (0.1, 0, 1.8),
                              ((0.1, 0.02), (10, 10), 1.8), ((5.0, 0.1, 1e-5), (3, 5, 5), 1.8), ((0.1, 0.02), 0, 1.0)):
        g = ot.column_potential(c, eps, iters, omega)
        assert np.all(np.isfinite(g))
        p = linear_sum_assignment(c - g[None])[1]
        assert abs(ot.assignment_cost(c, p) - ref) <= 1e-9 * ref
    g = rng.standard_normal(128) * 50
    p = linear_sum_assignment(c - g[None])[1]
    assert abs(ot.assignment_cost(c, p) - ref) <= 1e-9 * ref


def test_potential_is_near_dual_optimal():
    # The column potential preconditions well when it is close to an optimal dual: then the
    # optimal assignment has small reduced costs c_ij - u_i - g_j (u_i the row minima).
    rng = np.random.default_rng(3)
    c = ot.sq_distances(_moons_np(rng, 256), rng.standard_normal((256, 2)))
    r, col = linear_sum_assignment(c)

    def mean_reduced(g):
        red = c - g[None]
        return np.mean(red[r, col] - red.min(1))

    plain = mean_reduced(ot.column_potential(c, 0.1, 40, omega=1.0))
    one_stage = mean_reduced(ot.column_potential(c, 0.1, 20))  # over-relaxed, 20 iterations at eps 0.1
    default = mean_reduced(ot.column_potential(c))  # the same 20 iterations, 10 at eps 0.1 then 10 at 0.02
    assert plain < 0.2 * mean_reduced(c.min(0))
    assert one_stage < plain  # better than plain Sinkhorn with twice the iterations
    assert default < 0.5 * one_stage  # epsilon scaling: measured 0.0012 vs 0.0089


@pytest.mark.parametrize("scale", [1e-6, 1e-8, 1e-10])
def test_costs_far_below_eps_keep_their_exact_optimum(scale):
    # Costs ~1e-14 against eps = 0.1: the potential is ~eps * log(n); column_potential shifts it
    # to the costs' scale, or cost - g would round the costs away (non-optimal assignments, up to
    # 6x the optimal cost at scale 1e-8 before the shift).
    rng = np.random.default_rng(11)
    for _ in range(3):
        a, b = rng.standard_normal((128, 2)) * scale, rng.standard_normal((128, 2)) * scale
        c = ot.exact_sq_distances(a, b)
        best = _scipy_cost(c)
        assert abs(ot.assignment_cost(c, ot.solve_ot_points(a, b)) - best) <= 1e-12 * best


def test_potential_stays_finite_when_a_column_exceeds_float32():
    # A column above float32's range with a sharp eps: the fallback must be float64 column minima
    # (a float32 one is inf, and cost - g then holds -inf: SciPy refuses it).
    rng = np.random.default_rng(12)
    c = ot.sq_distances(_moons_np(rng, 64), rng.standard_normal((64, 2)))
    c[:, 0] = 1e39
    g = ot.column_potential(c, 1e-4, 40)
    assert np.all(np.isfinite(g))
    assert abs(ot.assignment_cost(c, ot.solve_assignment(c, eps=1e-4, iters=40)) - _scipy_cost(c)) <= 1e-12 * _scipy_cost(c)


def test_a_stage_that_overflows_is_dropped():
    # eps = 1e-6 puts the second stage's float32 scalings out of range: its result is dropped
    # and the first stage's potential is kept, exactly.
    rng = np.random.default_rng(3)
    c = ot.sq_distances(_moons_np(rng, 256), rng.standard_normal((256, 2)))
    np.testing.assert_allclose(ot.column_potential(c, (0.1, 1e-6), (10, 10)), ot.column_potential(c, 0.1, 10),
                               rtol=0, atol=1e-12)  # equal up to the rounding of the final constant shift
    # a float eps is one stage of all the iterations
    np.testing.assert_array_equal(ot.column_potential(c, 0.1), ot.column_potential(c, 0.1, 20))


def test_potential_retries_in_float64_when_float32_overflows():
    # 16-D costs are large relative to eps: the over-relaxed float32 scalings leave float32's
    # range. The float64 retry must still give a near-optimal potential (not the fallback v).
    rng = np.random.default_rng(5)
    c = ot.sq_distances(rng.standard_normal((256, 16)) * 0.5 + 1, rng.standard_normal((256, 16)))
    r32 = c.astype(np.float32) - c.astype(np.float32).min(0)[None]
    k = np.exp((r32.min(1)[:, None] - r32) * np.float32(10.0))  # column_potential's kernel, eps = 0.1
    with np.errstate(all="ignore"):
        assert not np.all(np.isfinite(ot._scalings(k, 20, np.float32(1.8))))
    g = ot.column_potential(c)
    r, col = linear_sum_assignment(c)
    red = c - g[None]
    red_v = c - c.min(0)[None]
    assert np.mean(red[r, col] - red.min(1)) < 0.01 * np.mean(red_v[r, col] - red_v.min(1))
    p = ot.solve_assignment(c)
    assert abs(ot.assignment_cost(c, p) - _scipy_cost(c)) <= 1e-9 * _scipy_cost(c)


def test_column_potential_rejects_bad_parameters():
    c = np.ones((4, 4))
    for kwargs, name in ((dict(omega=2.0), "omega"), (dict(omega=0.0), "omega"), (dict(eps=0.0), "eps"),
                         (dict(iters=-1), "iters"), (dict(eps=(0.1, -0.02)), "eps"), (dict(eps=()), "eps"),
                         (dict(eps=(0.1, 0.02), iters=(10,)), "iters"), (dict(iters=2.5), "iters"),
                         (dict(eps=float("nan")), "eps"), (dict(eps=0.1, iters=(30, -10)), "iters"),
                         (dict(iters=True), "iters"), (dict(eps=True), "eps"), (dict(iters=float("inf")), "iters")):
        with pytest.raises(ValueError, match=name):
            ot.column_potential(c, **kwargs)
    with pytest.raises(ValueError, match="cost"):
        ot.column_potential(np.ones((3, 4)))


def test_points_solver_and_jax_wrappers():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((3, 64, 2)).astype(np.float32)
    b = (rng.standard_normal((3, 64, 2)) * 2).astype(np.float32)
    c64 = ot.sq_distances(a.astype(np.float64), b.astype(np.float64))
    refs = np.array([_scipy_cost(c) for c in c64])
    p = ot.solve_ot_points(a, b)
    np.testing.assert_allclose(ot.assignment_cost(c64, p), refs, rtol=1e-12)
    # jit / vmap of the device wrappers: one host call for the batch
    pj = jax.jit(jax.vmap(ot.ot_permutation))(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(ot.assignment_cost(c64, np.asarray(pj)), refs, rtol=1e-12)
    pc = jax.jit(ot.assignment)(jnp.asarray(c64, jnp.float32))
    assert pc.shape == (3, 64) and pc.dtype == jnp.int32
    np.testing.assert_allclose(ot.assignment_cost(c64, np.asarray(pc)), refs, rtol=1e-6)
    # inside lax.scan, through the loss-module entry points
    def body(carry, ab):
        x0, x1 = ab
        return carry, (gf.losses.exact_assignment(ot.sq_distances(x0, x1)), gf.losses.ot_coupling(None, x0, x1))

    _, (ps, coupled) = jax.jit(lambda a, b: jax.lax.scan(body, 0, (a, b)))(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(ot.assignment_cost(c64, np.asarray(ps)), refs, rtol=1e-6)
    for k in range(3):
        got = np.sum((a[k].astype(np.float64) - np.asarray(coupled[k], np.float64)) ** 2)
        np.testing.assert_allclose(got, refs[k], rtol=1e-6)


def test_threads_do_not_change_results():
    rng = np.random.default_rng(5)
    c = rng.random((8, 50, 50))
    np.testing.assert_array_equal(ot.solve_assignment(c, threads=1), ot.solve_assignment(c, threads=3))


def test_a_sweep_over_threads_does_not_accumulate_idle_threads():
    # Each distinct threads= value made a thread pool of its own that was never shut down: a
    # sweep over 2..9 left 44 idle worker threads behind.
    rng = np.random.default_rng(6)
    c = rng.random((12, 20, 20))
    ref = ot.solve_assignment(c, threads=1)
    before = threading.active_count()
    for t in range(2, 10):
        np.testing.assert_array_equal(ot.solve_assignment(c, threads=t), ref)
    deadline = time.time() + 10
    while threading.active_count() > before + 9 and time.time() < deadline:
        time.sleep(0.05)  # (a replaced pool's workers exit once idle)
    assert threading.active_count() <= before + 9, threading.active_count() - before


def test_set_state_does_not_pile_up_finalizers():
    # Each set_state registered a finalizer of its own, kept until the stream died (the old
    # threads' stop flags were already set).
    with ot.CoupledBatches(gf.data.moons, 8, jax.random.key(0), chunk=2, coupling="independent") as stream:
        next(stream)
        before = len(weakref.finalize._registry)
        for i in range(20):
            stream.set_state({"served": i})
        assert len(weakref.finalize._registry) == before
        np.testing.assert_array_equal(next(stream)["x"], stream.prepare(9)[0][1])  # (served 19: chunk 9, row 1)


def test_a_failing_problem_raises_from_the_threaded_solve():
    def fn(k):
        if k == 4:
            raise ArithmeticError("problem 4")
        return k * k

    assert ot._run_threaded(lambda k: k * k, 7, 3) == [k * k for k in range(7)]
    with pytest.raises(ArithmeticError, match="problem 4"):
        ot._run_threaded(fn, 7, 3)


def test_coupled_batches_are_exact_ot_of_the_independent_stream():
    key = jax.random.key(7)
    kw = dict(chunk=4, prefetch=1)
    it_ot = ot.CoupledBatches(gf.data.moons, 64, key, num_batches=6, **kw)
    it_ind = ot.CoupledBatches(gf.data.moons, 64, key, coupling="independent", num_batches=6, **kw)
    batches_ot, batches_ind = list(it_ot), list(it_ind)
    assert len(batches_ot) == len(batches_ind) == 6
    for bo, bi in zip(batches_ot, batches_ind):
        np.testing.assert_array_equal(bo["x"], bi["x"])  # same data draw
        # the OT noise is a permutation of the same noise draw ...
        np.testing.assert_array_equal(np.sort(bo["x1"], 0), np.sort(bi["x1"], 0))
        # ... and its pairing cost is the exact optimum
        c = ot.sq_distances(bo["x"].astype(np.float64), bi["x1"].astype(np.float64))
        got = np.sum((bo["x"].astype(np.float64) - bo["x1"].astype(np.float64)) ** 2)
        np.testing.assert_allclose(got, _scipy_cost(c), rtol=1e-12)
    # chunks differ from each other and the stream is reproducible from the key
    assert not np.array_equal(batches_ot[0]["x"], batches_ot[4]["x"])
    stream = ot.CoupledBatches(gf.data.moons, 64, key, **kw)
    again = next(stream)
    stream.close()
    np.testing.assert_array_equal(again["x1"], batches_ot[0]["x1"])


def test_a_background_thread_that_ends_without_a_chunk_is_an_error_not_a_hang(monkeypatch):
    """next() waited forever on the queue when the thread ended without queueing the chunk it
    needed (a bug in the thread's chunk count hung the consumer: audit round 7's mutant O2)."""
    monkeypatch.setattr(ot, "_work_loop", lambda *a: None)  # a thread that prepares nothing
    stream = ot.CoupledBatches(gf.data.moons, 8, jax.random.key(0), chunk=2, prefetch=1, num_batches=4)
    with pytest.raises(RuntimeError, match="ended without preparing the chunk of batch 0"):
        next(stream)
    stream.close()
    monkeypatch.undo()  # a working thread: the last chunk, queued just before the thread ends, is served
    stream = ot.CoupledBatches(gf.data.moons, 8, jax.random.key(0), chunk=3, prefetch=2, num_batches=4)
    stream._thread.join()  # (ended: its two chunks wait in the queue)
    assert len(list(stream)) == 4


def test_coupled_batches_resume_exactly_from_their_state(tmp_path):
    # the stream had no get_state/set_state: fit saved data_state = {} and a resumed run replayed
    # the stream from its start (parameters 0.027 off an uninterrupted run)
    key, kw = jax.random.key(7), dict(chunk=3, prefetch=1)
    full = list(ot.CoupledBatches(gf.data.moons, 16, key, num_batches=10, **kw))
    first = ot.CoupledBatches(gf.data.moons, 16, key, num_batches=10, **kw)
    for _ in range(7):
        next(first)
    state = first.get_state()
    first.close()
    assert state == {"served": 7}
    rest = ot.CoupledBatches(gf.data.moons, 16, key, num_batches=10, **kw)
    next(rest)  # a position already consumed (and a chunk prefetched) is discarded by set_state
    rest.set_state(state)
    tail = list(rest)
    assert len(tail) == 3
    for a, b in zip(tail, full[7:]):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["x1"], b["x1"])
    with pytest.raises(ValueError, match="served"):
        rest.set_state({"served": -1})
    # through fit and a Checkpointer: interrupted after 2 steps and resumed = 4 steps in one go
    model = gf.nets.MLP(hidden=(8,))
    params = model.init(jax.random.key(0), jnp.zeros((4, 2)), jnp.zeros((4,)))
    opt = gf.train.make_optimizer(1e-2)
    step = gf.train.make_train_step(gf.train.diffusion_objective(model.apply, gf.paths.linear(),
                                                                 prediction="velocity"), opt)
    stream = lambda: ot.CoupledBatches(gf.data.moons, 16, jax.random.key(3), chunk=2)  # noqa: E731
    fresh = lambda: gf.train.init_state(params, opt, jax.random.key(1))  # noqa: E731
    whole, _ = gf.train.fit(fresh(), step, stream(), 4, chunk_size=2, progress=False)
    ck = gf.train.Checkpointer(str(tmp_path / "ck"), save_every=2, async_save=False)
    gf.train.fit(fresh(), step, stream(), 2, chunk_size=2, progress=False, checkpointer=ck)
    s, data_state = gf.train.Checkpointer(str(tmp_path / "ck"), save_every=2, async_save=False).restore_or(fresh())
    loader = stream()
    loader.set_state(data_state)
    s, _ = gf.train.fit(s, step, loader, 2, chunk_size=2, progress=False)
    for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(whole.params)):
        np.testing.assert_array_equal(a, b)


def test_paired_coupling_in_flow_matching_loss():
    path = gf.paths.linear()
    x0 = jax.random.normal(jax.random.key(0), (16, 2))
    x1 = jax.random.normal(jax.random.key(1), (16, 2)) * 3
    fn = lambda x, t: jnp.zeros_like(x)  # noqa: E731
    loss, _ = gf.losses.flow_matching_loss(fn, path, x0, jax.random.key(2), coupling=gf.losses.paired_coupling(x1))
    # linear path: target velocity x1 - x0, zero model -> mean squared norm / D
    np.testing.assert_allclose(loss, np.mean(np.mean((np.asarray(x1) - np.asarray(x0)) ** 2, -1)), rtol=1e-5)
    with pytest.raises(ValueError, match="paired noise has shape"):
        gf.losses.flow_matching_loss(fn, path, x0, jax.random.key(2), coupling=gf.losses.paired_coupling(x1[:8]))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"cost must have shape \[..., n, n\]"):
        ot.solve_assignment(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="same shape"):
        ot.solve_ot_points(np.zeros((4, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ot.solve_assignment(np.zeros((2, 3, 3)), threads=0)
    with pytest.raises(ValueError, match="same shape"):
        ot.ot_permutation(jnp.zeros((4, 2)), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="coupling must be 'ot' or 'independent'"):
        ot.CoupledBatches(gf.data.moons, 8, jax.random.key(0), coupling="sinkhorn")
    with pytest.raises(ValueError, match="eps must be a real > 0"):  # at construction, not in the background thread
        ot.CoupledBatches(gf.data.moons, 8, jax.random.key(0), eps=(0.1, 0.0))
    # checked up front, even without preconditioning (which would never reach the potential),
    # and by the jittable forms before their host callback
    with pytest.raises(ValueError, match="eps must be a real > 0"):
        ot.solve_ot_points(np.zeros((2, 4, 2)), np.zeros((2, 4, 2)), eps=-1.0, precondition=False)
    with pytest.raises(ValueError, match="eps must be a real > 0"):
        ot.solve_assignment(np.zeros((2, 4, 4)), eps=-1.0, precondition=False)
    with pytest.raises(ValueError, match="iters must be ints"):
        ot.assignment(jnp.zeros((4, 4)), iters=-1)
    with pytest.raises(ValueError, match="same non-zero length"):
        ot.ot_permutation(jnp.zeros((4, 2)), jnp.zeros((4, 2)), iters=(1, 2, 3))
    # (num_batches=-3 was an empty stream, 2.5 gave 3 batches, chunk=2.7 became 2, batch_size=True 1)
    for kw, name in ((dict(num_batches=-3), "num_batches"), (dict(num_batches=2.5), "num_batches"),
                     (dict(chunk=2.7), "chunk"), (dict(batch_size=True), "batch_size"), (dict(prefetch=0), "prefetch")):
        kw = {"batch_size": 8, **kw}
        with pytest.raises(ValueError, match=f"{name} must be"):
            ot.CoupledBatches(gf.data.moons, key=jax.random.key(0), **kw)


def test_ot_permutation_under_vmap_of_one_argument():
    rng = np.random.default_rng(5)
    x0s = jnp.asarray(rng.standard_normal((3, 16, 2)), jnp.float32)
    x1 = jnp.asarray(rng.standard_normal((16, 2)), jnp.float32)
    perms = np.asarray(jax.vmap(ot.ot_permutation, in_axes=(0, None))(x0s, x1))
    for k in range(3):
        np.testing.assert_array_equal(perms[k], np.asarray(ot.ot_permutation(x0s[k], x1)))
    perms = np.asarray(jax.vmap(ot.ot_permutation, in_axes=(None, 0))(x1, x0s))
    for k in range(3):
        np.testing.assert_array_equal(perms[k], np.asarray(ot.ot_permutation(x1, x0s[k])))


def test_coupled_batches_failures_and_cleanup():
    import gc
    import threading
    import time

    def bad_sampler(key, n):
        raise RuntimeError("sampler failed")

    stream = ot.CoupledBatches(bad_sampler, 8, jax.random.key(0), chunk=2)
    for _ in range(2):  # every call after the failure raises it too (it used to hang)
        with pytest.raises(RuntimeError, match="sampler failed"):
            next(stream)

    def alive():
        return sum(t.name == "genflow-ot-batches" and t.is_alive() for t in threading.enumerate())

    before = alive()
    stream = ot.CoupledBatches(gf.data.moons, 8, jax.random.key(1), chunk=2, prefetch=1)
    next(stream)
    assert alive() == before + 1
    del stream  # never closed: collecting it stops its thread
    gc.collect()
    deadline = time.time() + 10
    while alive() > before and time.time() < deadline:
        time.sleep(0.05)
    assert alive() == before


def _stream_threads():
    return sum(t.name == "genflow-ot-batches" and t.is_alive() for t in threading.enumerate())


def test_next_after_close_ends_instead_of_hanging():
    # close() only stopped the worker; a later next() waited on the empty queue forever
    stream = ot.CoupledBatches(gf.data.moons, 8, jax.random.key(0), chunk=2, prefetch=1)
    next(stream)
    stream.close()
    out = {}

    def consume():
        try:
            for _ in range(10):
                next(stream)
            out["r"] = "no end"
        except StopIteration:
            out["r"] = "stop"

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "next() after close() blocked forever on the empty queue"
    assert out["r"] == "stop"


def test_stream_whose_worker_failed_on_a_full_queue_is_collected():
    # the queued exception's traceback held prepare's frame (its self): the stream was never
    # collected and its thread retried the full queue forever
    class Failing(ot.CoupledBatches):
        def prepare(self, index):
            if index >= 1:
                raise RuntimeError("bad chunk")
            return super().prepare(index)

    before = _stream_threads()
    stream = Failing(gf.data.moons, 8, jax.random.key(0), chunk=1, prefetch=1)
    deadline = time.time() + 30
    while not stream._queue.full() and time.time() < deadline:  # chunk 0 queued ...
        time.sleep(0.05)
    time.sleep(0.5)  # ... and chunk 1's exception waits in _put
    del stream
    gc.collect()
    deadline = time.time() + 20
    while _stream_threads() > before and time.time() < deadline:
        time.sleep(0.05)
    assert _stream_threads() == before, "the failed stream's thread spins forever"


def test_process_exits_cleanly_with_a_stream_still_preparing():
    # a daemon stream thread inside JAX / SciPy at interpreter exit crashed the process
    # (SIGSEGV in 10 of 10 runs after close(), SIGABRT in 1 of 10 without it); close() and an
    # atexit hook now join it
    code = textwrap.dedent("""
        import sys, time, jax, genflow as gf
        from genflow import ot
        s = ot.CoupledBatches(gf.data.moons, 256, jax.random.key(0), chunk=20, prefetch=2)
        t = ot.CoupledBatches(gf.data.moons, 256, jax.random.key(1), chunk=20, prefetch=2)
        time.sleep(0.5)
        s.close()  # t is left open
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16])
def test_sq_distances_of_integer_points(dtype):
    # differences were taken in the integer dtype and wrapped around (uint8: 132 for 900)
    for features in (1, 2, 4):
        a = np.zeros((2, features), dtype)
        a[1] = 100
        b = a[::-1].copy()
        want = np.array([[1e4, 0.0], [0.0, 1e4]]) * features
        np.testing.assert_array_equal(ot.sq_distances(a, b), want)
        np.testing.assert_array_equal(ot.exact_sq_distances(a, b), want)
        np.testing.assert_array_equal(np.asarray(ot.sq_distances(jnp.asarray(a), jnp.asarray(b))), want)


def test_threads_is_checked_up_front():
    # threads=0 passed CoupledBatches' constructor and failed in its background thread (at the
    # first next()), and failed inside the host callback of assignment / ot_permutation under jit
    # (a JaxRuntimeError "INTERNAL: CpuCallback error"); 2.5, "2" and True were accepted
    bad = (0, -1, 2.5, "2", True)
    for t in bad:
        with pytest.raises(ValueError, match="threads must be >= 1"):
            ot.CoupledBatches(gf.data.moons, 8, jax.random.key(0), chunk=2, threads=t)
        with pytest.raises(ValueError, match="threads must be >= 1"):
            jax.jit(lambda c: ot.assignment(c, threads=t))(jnp.ones((2, 3, 3)))
        with pytest.raises(ValueError, match="threads must be >= 1"):
            jax.jit(lambda a: ot.ot_permutation(a, a, threads=t))(jnp.ones((3, 2)))
        with pytest.raises(ValueError, match="threads must be >= 1"):
            ot.solve_assignment(np.ones((2, 3, 3)), threads=t)
        with pytest.raises(ValueError, match="threads must be >= 1"):
            ot.solve_ot_points(np.ones((2, 3, 2)), np.ones((2, 3, 2)), threads=t)
    assert ot.solve_assignment(np.ones((2, 3, 3)), threads=np.int64(2)).shape == (2, 3)


def test_costs_spanning_many_decades_keep_their_exact_optimum():
    # cost - g rounds each entry at the scale of the potentials: with entries spanning ~60
    # decades the preconditioned solve returned totals up to 6e6 times the optimum (SciPy's on
    # the raw costs); it now also solves the raw costs when that rounding is not negligible
    rng = np.random.default_rng(0)
    for _ in range(5):
        c = rng.random((32, 32)) * 10.0 ** rng.integers(-30, 31, (32, 32))
        best = _scipy_cost(c)
        assert ot.assignment_cost(c, ot.solve_assignment(c)) <= best * (1 + 1e-12)


def test_solvers_accept_empty_batches():
    # sq_distances handles B = 0; the solvers raised "cannot reshape array of size 0 into shape
    # (0,0)" (solve_assignment, solve_ot_points) and ZeroDivisionError (ot_permutation)
    for lead in ((), (3,), (0,)):
        p = ot.solve_assignment(np.zeros(lead + (0, 0)))
        assert p.shape == lead + (0,) and p.dtype == np.int32
        p = ot.solve_ot_points(np.zeros(lead + (0, 2)), np.zeros(lead + (0, 2)))
        assert p.shape == lead + (0,) and p.dtype == np.int32
    p = ot.ot_permutation(jnp.zeros((0, 2)), jnp.zeros((0, 2)))
    assert p.shape == (0,) and p.dtype == jnp.int32
    assert gf.losses.ot_coupling(None, jnp.zeros((0, 4, 4)), jnp.zeros((0, 4, 4))).shape == (0, 4, 4)


def test_non_finite_and_complex_inputs_are_named():
    # NaN / -inf costs and NaN points failed in SciPy with "matrix contains invalid numeric
    # entries" (naming no argument; under jit inside the host callback); a complex cost lost its
    # imaginary part with only a ComplexWarning
    c = np.random.default_rng(0).random((4, 4))
    for bad in (np.nan, -np.inf):
        cb = c.copy()
        cb[1, 2] = bad
        for pre in (True, False):
            with pytest.raises(ValueError, match="cost must not contain NaN"):
                ot.solve_assignment(cb, precondition=pre)
    ci = c.copy()
    ci[1, 2] = np.inf  # a forbidden pair is still fine
    assert _is_perm(ot.solve_assignment(ci))
    with pytest.raises(TypeError, match="cost must be real"):
        ot.solve_assignment(c + 1j)
    a = np.random.default_rng(1).standard_normal((4, 2))
    an = a.copy()
    an[0, 0] = np.nan
    with pytest.raises(ValueError, match="x0 and x1 must be finite"):
        ot.solve_ot_points(an, a)
    with pytest.raises(Exception, match="x0 and x1 must be finite"):
        jax.jit(ot.ot_permutation)(jnp.asarray(a), jnp.asarray(an)).block_until_ready()


def test_coupled_batches_take_an_unhashable_sampler_and_huge_costs_solve():
    import dataclasses

    @dataclasses.dataclass
    class Sampler:  # (eq=True makes it unhashable: the cached draw function refused it)
        scale: float = 2.0

        def __call__(self, key, n):
            return self.scale * gf.data.moons(key, n)

    stream = ot.CoupledBatches(Sampler(), 8, jax.random.key(0), chunk=2, num_batches=2)
    batches = list(stream)
    assert len(batches) == 2 and batches[0]["x"].shape == (8, 2)
    ref = ot.CoupledBatches(lambda k, n: 2.0 * gf.data.moons(k, n), 8, jax.random.key(0), chunk=2, num_batches=2)
    np.testing.assert_array_equal(batches[1]["x1"], list(ref)[1]["x1"])
    # costs near the float64 limit: the rounding guard's exact sum overflowed (OverflowError)
    c = np.random.default_rng(0).standard_normal((50, 50)) * 1e307
    perm = ot.solve_assignment(c)
    best = linear_sum_assignment(c)[1]
    assert sorted(perm.tolist()) == list(range(50))
    assert np.sum(c[np.arange(50), perm] / 1e307) <= np.sum(c[np.arange(50), best] / 1e307) + 1e-9


def test_coupled_batches_and_column_potential_name_bad_input():
    """Found by a behavioural audit: CoupledBatches took key=0 and failed at the first next(),
    from the background thread, without naming key; a sampler returning the wrong number of rows
    was coupled as drawn; column_potential failed in a broadcast on [k, n, n], in a reduction on
    [0, 0], and returned NaN potentials for a NaN cost."""
    with pytest.raises(TypeError, match="key must be one PRNG key"):
        ot.CoupledBatches(gf.data.moons, 4, 0, chunk=2)
    stream = ot.CoupledBatches(lambda k, n: jax.random.normal(k, (n + 1, 2)), 4, jax.random.key(0), chunk=2)
    with pytest.raises(ValueError, match=r"sampler\(key, 4\) must return \[4, \.\.\.\]"):
        next(stream)
    stream.close()
    with pytest.raises(ValueError, match=r"column_potential takes one \[n, n\] cost; got shape \(2, 3, 3\)"):
        ot.column_potential(np.ones((2, 3, 3)))
    assert ot.column_potential(np.zeros((0, 0))).shape == (0,)
    c = np.ones((3, 3))
    c[0, 0] = np.nan
    with pytest.raises(ValueError, match="cost must not contain NaN or -inf"):
        ot.column_potential(c)


def test_a_wholly_forbidden_row_or_column_is_named_infeasible():
    """A column of +inf costs (a target no source may take) made the preconditioned costs
    inf - inf = NaN: SciPy reported "invalid numeric entries" for an input without NaN. Feasible
    problems with forbidden pairs keep solving, with and without preconditioning."""
    c = np.array([[1.0, np.inf, 2.0], [3.0, np.inf, 1.0], [2.0, np.inf, 5.0]])
    for cost, what in ((c, "column 1"), (c.T, "row 1")):
        for precondition in (True, False):
            with pytest.raises(ValueError, match=f"infeasible: {what} has no allowed pair"):
                ot.solve_assignment(cost, precondition=precondition)
        with pytest.raises(ValueError, match=f"infeasible: {what}"):
            ot.column_potential(cost, 0.1, 10)
    allowed = np.array([[np.inf, 1.0, 4.0], [2.0, np.inf, 3.0], [5.0, 1.0, np.inf]])
    for precondition in (True, False):
        np.testing.assert_array_equal(ot.solve_assignment(allowed, precondition=precondition),
                                      linear_sum_assignment(allowed)[1])


def test_wrappers_called_outside_jit_compile_once():
    """assignment / ot_permutation / an in-loss OT coupling called eagerly, again with new points:
    each call built a new host callback, and pure_callback (keyed on the callback's identity)
    compiled again every time (~50 ms against a ~1 ms solve; recompilation audit)."""
    pts = [jax.random.normal(jax.random.key(i), (16, 3)) for i in range(4)]
    ref = [gf.ot.solve_ot_points(np.asarray(pts[i]), np.asarray(pts[i + 1])) for i in (0, 2)]
    fn = gf.oracles.Gaussian.diagonal(jnp.zeros(3), jnp.ones(3)).model(gf.paths.linear(), "velocity")
    calls = {
        "ot_permutation": lambda a, b: gf.ot.ot_permutation(a, b),
        "assignment": lambda a, b: gf.ot.assignment(gf.ot.sq_distances(a, b), eps=[0.1, 0.02], iters=10),
        "loss": lambda a, b: gf.losses.diffusion_loss(fn, gf.paths.linear(), a, jax.random.key(0),
                                                      prediction="velocity", coupling="ot"),
    }
    for name, call in calls.items():
        call(pts[0], pts[1])  # compiles
        again = []
        assert count_compiles(lambda: again.append(call(pts[2], pts[3]))) == 0, name
        if name != "loss":
            np.testing.assert_array_equal(again[0], ref[1])
    with pytest.raises(TypeError, match="precondition must be True or False"):
        gf.ot.ot_permutation(pts[0], pts[1], precondition="False")


def test_closed_streams_do_not_keep_their_samplers_data_alive():
    """CoupledBatches cached its compiled draw in a global LRU of 32 keyed by the sampler: the
    samplers of closed streams, and the datasets they close over (twice: the closure's and the
    executable's constant), stayed alive. The draw now lives as long as its sampler; streams on
    one sampler still share it."""
    import gc
    import weakref

    from genflow import ot as gf_ot

    refs = []
    for i in range(3):
        data = jax.random.normal(jax.random.key(i), (256, 2))
        refs.append(weakref.ref(data))

        def sampler(key, n, data=data):
            return data[jax.random.randint(key, (n,), 0, 256)]

        stream = gf.ot.CoupledBatches(sampler, 8, jax.random.key(0), chunk=2, num_batches=2)
        batches = list(stream)
        np.testing.assert_array_equal(np.isin(np.asarray(batches[0]["x"]), np.asarray(data)), True)
        stream.close()
        del stream, sampler, data, batches
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
    assert gf_ot._draw_fn(gf.data.moons, 8, 2, gf_ot._standard_normal) is \
        gf_ot._draw_fn(gf.data.moons, 8, 2, gf_ot._standard_normal)


def test_streams_on_a_bound_method_sampler_outlive_each_other():
    """Two streams on ``ds.sample`` (equal bound methods, distinct objects) share one compiled draw;
    it reached the first stream's method through a weak reference, so once that stream was
    collected, a retrace of the second one's draw called None."""
    import gc

    class Source:
        def __init__(self):
            self.data = jax.random.normal(jax.random.key(0), (64, 2))

        def sample(self, key, n):
            return self.data[jax.random.randint(key, (n,), 0, 64)]

    ds = Source()
    a = gf.ot.CoupledBatches(ds.sample, 4, jax.random.key(0), chunk=2, coupling="independent")
    next(a)
    b = gf.ot.CoupledBatches(ds.sample, 4, jax.random.key(1), chunk=2, coupling="independent")
    next(b)
    a.close()
    del a
    gc.collect()
    jax.clear_caches()
    b.set_state({"served": 0})
    batch = next(b)
    assert batch["x"].shape == (4, 2) and np.isin(np.asarray(batch["x"]), np.asarray(ds.data)).all()
    b.close()


def test_equal_samplers_with_different_data_get_their_own_draws():
    """The compiled draws are keyed by the sampler's identity (equal frozen dataclasses holding
    different data drew from the first one's), at most a few per sampler."""
    import dataclasses

    from genflow import ot as gf_ot

    @dataclasses.dataclass(frozen=True)
    class Data:
        name: str
        x: jax.Array = dataclasses.field(compare=False, hash=False)

        def sample(self, key, n):
            return self.x[jax.random.randint(key, (n,), 0, self.x.shape[0])]

    a, b = Data("fold", jnp.zeros((16, 2))), Data("fold", jnp.ones((16, 2)))
    for d, want in ((a, 0.0), (b, 1.0)):
        s = gf.ot.CoupledBatches(d.sample, 4, jax.random.key(0), chunk=2, coupling="independent")
        np.testing.assert_array_equal(np.asarray(next(s)["x"]), want)
        s.close()
    for i in range(12):  # (new noise functions: the sampler's table stays bounded)
        gf_ot._draw_fn(gf.data.moons, 4, 2, lambda k, shape, dtype, i=i: jax.random.normal(k, shape, dtype) * i)
    assert len(gf_ot._DRAWS.table(gf.data.moons)) == gf_ot._DRAWS_PER_SAMPLER


def test_coupled_batches_is_a_context_manager_that_closes_on_errors():
    """``with CoupledBatches(...)``: the stream's thread is stopped on leaving the block, also when
    the consumer raised (the stream had no context manager: a kept exception kept it running)."""
    before = _stream_threads()
    with ot.CoupledBatches(gf.data.moons, 8, jax.random.key(0), chunk=2) as stream:
        assert next(stream)["x"].shape == (8, 2) and _stream_threads() == before + 1
    assert _stream_threads() == before
    with pytest.raises(RuntimeError, match="consumer failed"):
        with ot.CoupledBatches(gf.data.moons, 8, jax.random.key(0), chunk=2) as stream:
            next(stream)
            raise RuntimeError("consumer failed")
    assert _stream_threads() == before
    with pytest.raises(StopIteration):
        next(stream)
