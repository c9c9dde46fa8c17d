import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import genflow as gf

# A least-squares problem with a closed-form optimum: y = X w* + noise.
X = jax.random.normal(jax.random.key(0), (512, 4))
W_STAR = jnp.array([1.0, -2.0, 0.5, 3.0])
Y = X @ W_STAR + 0.1 * jax.random.normal(jax.random.key(1), (512,))
W_LS = jnp.linalg.lstsq(X, Y)[0]


def lsq_loss(params, batch, key):
    del key
    x, y = batch
    return jnp.mean((x @ params["w"] - y) ** 2), {"aux_metric": jnp.float32(1.0)}


def full_batch(key):
    del key
    return (X, Y)


def test_fit_converges_to_closed_form_optimum():
    opt = optax.adam(0.05)
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(2))
    state, hist = gf.train.fit(state, gf.train.make_train_step(lsq_loss, opt), full_batch, 600, chunk_size=200,
                               progress=False)
    np.testing.assert_allclose(state.params["w"], W_LS, atol=2e-3)
    assert int(state.step) == 600 and hist["loss"].shape == (600,)
    assert hist["aux_metric"].shape == (600,) and hist["compile_time"] > 0


def test_chunking_does_not_change_the_result():
    opt = optax.adam(1e-2)

    def noisy_loss(params, batch, key):
        idx = jax.random.randint(key, (32,), 0, 512)
        return jnp.mean((X[idx] @ params["w"] - Y[idx]) ** 2), {}

    step = gf.train.make_train_step(noisy_loss, opt)
    runs = []
    for chunk in (7, 50, 50):
        state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(3))
        state, _ = gf.train.fit(state, step, full_batch, 50, chunk_size=chunk, progress=False)
        runs.append(np.asarray(state.params["w"]))
    np.testing.assert_array_equal(runs[0], runs[1])  # bit-identical across chunk sizes
    np.testing.assert_array_equal(runs[1], runs[2])  # and across repeated runs


def test_fit_in_segments_continues_exactly_and_compiles_once():
    """Two fit calls of 25 steps == one of 50 (the data keys follow state.rng), and the second
    call reuses the first call's compiled chunk."""
    opt = optax.adam(1e-2)

    def noisy_loss(params, batch, key):
        idx = jax.random.randint(key, (32,), 0, 512)
        return jnp.mean((X[idx] @ params["w"] - Y[idx]) ** 2), {}

    def batches(key):
        return (X + 0.01 * jax.random.normal(key, X.shape), Y)

    step = gf.train.make_train_step(noisy_loss, opt)
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(3))
    whole, _ = gf.train.fit(state, step, batches, 50, chunk_size=25, progress=False)
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(3))
    state, h1 = gf.train.fit(state, step, batches, 25, chunk_size=25, progress=False)
    state, h2 = gf.train.fit(state, step, batches, 25, chunk_size=25, progress=False)
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(whole.params["w"]))
    assert int(state.step) == 50 and h2["compile_time"] == 0.0
    # a different data function is a different program: compiled anew
    _, h3 = gf.train.fit(state, step, lambda k: batches(k), 25, chunk_size=25, progress=False)
    assert h3["compile_time"] > 0


def test_fit_compiles_anew_under_other_jax_settings():
    """fit keeps its compiled chunks (lower().compile()) across calls; keyed without JAX's settings,
    a chunk compiled before x64 was switched on trained in float32 after it (flax parameters stay
    float32, so the signature matched), and one compiled at default matmul precision ran inside a
    ``jax.default_matmul_precision("highest")`` block (TF32 on an NVIDIA GPU). jax.jit keys by them."""
    opt = optax.sgd(0.1)
    loss = lambda p, b, k: (jnp.mean((b - p["w"]) ** 2) + 0 * (jnp.asarray(1.0) + 1e-10 - 1.0), {})  # noqa: E731
    step = gf.train.make_train_step(loss, opt)
    data = lambda k: jax.random.normal(k, (8, 4))  # noqa: E731

    def go(step_fn):
        state = gf.train.init_state({"w": jnp.zeros(4, jnp.float32)}, opt, jax.random.key(0))
        return gf.train.fit(state, step_fn, data, 2, chunk_size=2, progress=False)

    _, h = go(step)
    assert h["loss"].dtype == np.float32 and h["compile_time"] > 0
    with jax.enable_x64(True):
        (s_cached, h_cached), (s_fresh, _) = go(step), go(gf.train.make_train_step(loss, opt))
    assert h_cached["compile_time"] > 0 and h_cached["loss"].dtype == np.float64
    np.testing.assert_array_equal(s_cached.params["w"], s_fresh.params["w"])
    assert go(step)[1]["compile_time"] == 0.0  # (back in float32: the first program again)
    with jax.default_matmul_precision("highest"):
        assert go(step)[1]["compile_time"] > 0


def test_fit_runs_eagerly_under_disable_jit_and_checks_nans_under_debug_nans():
    """fit's compiled chunks (AOT) refused jax.disable_jit ("Disable jit is not supported in the AOT
    path"), where a user wants to print inside a loss; with jax_debug_nans on, a cached chunk
    ignored it (NonFiniteLossError, no culprit), a fresh one raised JAX's private
    InternalFloatingPointError. Both now go through jax.jit, as a jitted function would."""
    opt = optax.sgd(0.1)
    calls = []

    def loss(p, b, k):
        calls.append(1)
        return jnp.mean((b - p["w"]) ** 2), {}

    step = gf.train.make_train_step(loss, opt)
    data = lambda k: jax.random.normal(k, (8, 4))  # noqa: E731
    fresh = lambda: gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))  # noqa: E731
    ref, _ = gf.train.fit(fresh(), step, data, 4, chunk_size=2, progress=False)
    calls.clear()
    with jax.disable_jit():
        eager, _ = gf.train.fit(fresh(), step, data, 4, chunk_size=2, progress=False)
    assert len(calls) >= 4  # (the loss ran in Python at every step)
    np.testing.assert_allclose(eager.params["w"], ref.params["w"], rtol=1e-5, atol=1e-6)

    bad = gf.train.make_train_step(lambda p, b, k: (jnp.mean(jnp.log(b - 10.0)) + jnp.sum(p["w"]), {}), opt)
    with pytest.raises(gf.train.NonFiniteLossError):
        gf.train.fit(fresh(), bad, data, 2, chunk_size=2, progress=False)
    with jax.debug_nans(True):
        with pytest.raises(FloatingPointError, match="nan") as info:
            gf.train.fit(fresh(), bad, data, 2, chunk_size=2, progress=False)
    assert not isinstance(info.value, gf.train.NonFiniteLossError)
    # debug_infs: JAX keeps donating under it, and its op-by-op re-run read the deleted state
    # ("Array has been deleted"; review): the checked chunk does not donate
    inf = gf.train.make_train_step(lambda p, b, k: (jnp.mean(b - p["w"]) + jnp.where(
        jax.lax.stop_gradient(jnp.sum(p["w"])) > 1.0, jnp.inf, 0.0), {}), opt)  # (w grows 0.1 a step)
    with jax.debug_infs(True):
        with pytest.raises(FloatingPointError, match="inf") as info:
            gf.train.fit(fresh(), inf, data, 40, chunk_size=4, progress=False)
    assert int(info.value.state.step) % 4 == 0 and not info.value.state.params["w"].is_deleted()


def test_compiled_chunks_live_as_long_as_their_step_function():
    """fit's cache of compiled chunks held up to 16 dropped runs' step and data functions, and the
    arrays they close over twice (the closure's and the executable's constant): a sweep with a
    device-resident dataset per run kept 16 of them alive. The cache now lives with the step
    function (for a bound method, with its object), which still compiles once per program."""
    import gc
    import weakref

    from conftest import count_compiles

    opt = optax.sgd(0.01)
    refs = []
    for i in range(4):
        dataset = jax.random.normal(jax.random.key(i), (512, 4))
        refs.append(weakref.ref(dataset))

        def batch_fn(key, dataset=dataset):
            idx = jax.random.randint(key, (16,), 0, 512)
            return dataset[idx], dataset[idx] @ W_STAR

        state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
        gf.train.fit(state, gf.train.make_train_step(lsq_loss, opt), batch_fn, 4, chunk_size=2, progress=False)
    del dataset, batch_fn
    gc.collect()
    assert sum(r() is not None for r in refs) == 0  # (all 4 were alive before)

    class Trainer:
        def __init__(self):
            self.inner = gf.train.make_train_step(lsq_loss, opt)

        def step(self, state, batch):  # (a bound method: a new object at every attribute access)
            return self.inner(state, batch)

    @dataclasses.dataclass
    class DataclassTrainer(Trainer):  # (unhashable, so no weak key: a strong cache, as before)
        lr: float = 0.01

        def __post_init__(self):
            Trainer.__init__(self)

    class Run:  # (the data function a bound method of the step's object: it kept its own table alive)
        def __init__(self, i):
            self.data = jax.random.normal(jax.random.key(i), (512, 4))
            self.inner = gf.train.make_train_step(lsq_loss, opt)

        def train_step(self, state, batch):
            return self.inner(state, batch)

        def batch(self, key):
            idx = jax.random.randint(key, (16,), 0, 512)
            return self.data[idx], self.data[idx] @ W_STAR

    refs = []
    for i in range(3):
        run = Run(i)
        refs.append(weakref.ref(run.data))
        gf.train.fit(gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0)), run.train_step, run.batch, 2,
                     chunk_size=2, progress=False)
    del run
    gc.collect()
    assert sum(r() is not None for r in refs) == 0

    @dataclasses.dataclass(frozen=True)
    class Setter:  # (equal objects whose step differs: compare=False data)
        name: str
        target: jax.Array = dataclasses.field(compare=False, hash=False)

        def step(self, state, batch):
            return state.replace(params={"w": self.target}, step=state.step + 1), \
                {"loss": jnp.sum(self.target), "finite": jnp.array(True)}

    outs = [gf.train.fit(gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0)), Setter("s", v).step,
                         full_batch, 2, chunk_size=2, progress=False)[0] for v in (jnp.zeros(4), jnp.ones(4))]
    np.testing.assert_array_equal(np.asarray(outs[1].params["w"]), np.ones(4))  # (ran the first one's program)

    for trainer in (Trainer(), DataclassTrainer()):
        state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
        state, _ = gf.train.fit(state, trainer.step, full_batch, 4, chunk_size=2, progress=False)
        assert count_compiles(lambda: gf.train.fit(state, trainer.step, full_batch, 4, chunk_size=2,
                                                   progress=False)) == 0


def test_ema_matches_recurrence():
    opt = optax.sgd(0.1)
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0), ema_decays=(0.9, 0.5))
    step = jax.jit(gf.train.make_train_step(lsq_loss, opt))
    ema = {d: np.zeros(4) for d in (0.9, 0.5)}
    for _ in range(5):
        state, _ = step(state, (X, Y))
        for d in ema:
            ema[d] = d * ema[d] + (1 - d) * np.asarray(state.params["w"])
    for d in ema:
        np.testing.assert_allclose(state.ema[gf.train.ema_key(d)]["w"], ema[d], rtol=1e-5, atol=1e-6)


def test_momo_receives_the_loss_value():
    """optax.contrib.momo needs value=loss; the train step passes it, matching a manual loop."""
    opt = optax.contrib.momo(learning_rate=0.5)
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    state, hist = gf.train.fit(state, gf.train.make_train_step(lsq_loss, opt), full_batch, 20, chunk_size=20,
                               progress=False)
    params, s = {"w": jnp.zeros(4)}, opt.init({"w": jnp.zeros(4)})
    for _ in range(20):
        loss, g = jax.value_and_grad(lambda p: lsq_loss(p, (X, Y), None)[0])(params)
        u, s = opt.update(g, s, params, value=loss)
        params = optax.apply_updates(params, u)
    np.testing.assert_allclose(state.params["w"], params["w"], rtol=1e-5, atol=1e-6)
    assert hist["loss"][-1] < hist["loss"][0]


def test_non_finite_loss_stops_with_last_good_state():
    opt = optax.sgd(0.01)

    def loss_nan_at_13(params, batch, key):
        loss, aux = lsq_loss(params, batch, key)
        return loss, aux

    step = gf.train.make_train_step(loss_nan_at_13, opt)

    def guarded(state, batch):
        # inject a NaN into the batch at update 13
        x, y = batch
        y = jnp.where(state.step == 13, jnp.nan, y)
        return step(state, (x, y))

    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    msg = r"at step 13 \(the update from step 13 to 14 was not applied\).*last good state \(step 13, after 13 updates\)"
    with pytest.raises(gf.train.NonFiniteLossError, match=msg) as exc:
        gf.train.fit(state, guarded, full_batch, 40, chunk_size=10, progress=False)
    err = exc.value
    assert err.step == 13 and int(err.state.step) == 13
    assert np.all(np.isfinite(np.asarray(err.state.params["w"])))
    assert err.history["loss"].shape == (13,)
    # the last good state equals a clean run of 13 steps
    clean = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    clean, _ = gf.train.fit(clean, step, full_batch, 13, chunk_size=13, progress=False)
    np.testing.assert_allclose(err.state.params["w"], clean.params["w"], rtol=1e-6)


def test_step_guard_catches_non_finite_gradients_and_parameters_with_a_finite_loss():
    # loss sqrt(|w - 1|) is 0 at w = 1, its gradient is infinite there
    def sqrt_loss(params, batch, key):
        return jnp.sum(jnp.sqrt(jnp.abs(params["w"] - batch))), {}

    cases = [(optax.set_to_zero(), jnp.ones(3), False),   # inf gradient (the parameters stay finite)
             (optax.scale(jnp.nan), 2.0 * jnp.ones(3), False),  # finite gradient, nan update
             (optax.sgd(1e30), 2.0 * jnp.ones(3), True)]       # huge but finite parameters
    for opt, w0, finite in cases:
        step = jax.jit(gf.train.make_train_step(sqrt_loss, opt))
        state = gf.train.init_state({"w": w0, "b": jnp.zeros((), jnp.bfloat16)}, opt, jax.random.key(0))
        new, m = step(state, jnp.ones(3))
        assert bool(m["finite"]) is finite and np.isfinite(float(m["loss"]))
        if finite:
            assert int(new.step) == 1 and float(jnp.abs(new.params["w"]).max()) > 1e28
        else:  # the state is left as it was
            assert int(new.step) == 0
            np.testing.assert_array_equal(new.params["w"], w0)
    # float16 gradients of norm ~265 (their own float16 sum of squares would overflow) are finite
    half = {"w": jnp.zeros(70_000, jnp.float16)}
    step = jax.jit(gf.train.make_train_step(lambda p, b, k: (jnp.sum(p["w"].astype(jnp.float32)), {}), optax.sgd(1e-3)))
    new, m = step(gf.train.init_state(half, optax.sgd(1e-3), jax.random.key(0)), None)
    assert bool(m["finite"]) and int(new.step) == 1
    np.testing.assert_allclose(float(m["grad_norm"]), np.sqrt(70_000), rtol=1e-3)


def test_host_iterator_data():
    opt = optax.adam(0.05)
    rng = np.random.default_rng(0)

    def batches():
        while True:
            idx = rng.integers(0, 512, 64)
            yield (np.asarray(X)[idx], np.asarray(Y)[idx])

    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    state, hist = gf.train.fit(state, gf.train.make_train_step(lsq_loss, opt), batches(), 300, chunk_size=100,
                               progress=False)
    # the least-squares solution of the data (measured 0.0067 off; W_STAR, the noiseless weights,
    # is 0.01 from it)
    np.testing.assert_allclose(state.params["w"], W_LS, atol=0.03)


def test_diffusion_objective_with_labels_and_dropout():
    m = gf.nets.MLP(hidden=(16,), num_classes=2)
    p = m.init(jax.random.key(0), jnp.ones((8, 2)), jnp.zeros((8,)), jnp.zeros((8,), jnp.int32))
    loss_fn = gf.train.diffusion_objective(m.apply, gf.paths.linear(), prediction="velocity", label_dropout=0.5,
                                           null_label=2)
    batch = {"x": jnp.ones((8, 2)), "y": jnp.zeros((8,), jnp.int32)}
    loss, _ = loss_fn(p, batch, jax.random.key(1))
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="needs null_label"):
        gf.train.diffusion_objective(m.apply, gf.paths.linear(), label_dropout=0.1)
    with pytest.raises(ValueError, match="'x' entry"):
        loss_fn(p, {"image": jnp.ones((8, 2))}, jax.random.key(1))
    # label dropout on a batch without labels was skipped silently (no null-label training at all)
    with pytest.raises(ValueError, match=r"label_dropout=0.5 needs labels: the batch has no 'y'"):
        loss_fn(p, {"x": jnp.ones((8, 2))}, jax.random.key(1))


def test_bad_arguments():
    opt = optax.sgd(0.1)
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    step = gf.train.make_train_step(lsq_loss, opt)
    with pytest.raises(ValueError, match="num_steps must be"):
        gf.train.fit(state, step, full_batch, -1, progress=False)
    with pytest.raises(ValueError, match="chunk_size must be"):
        gf.train.fit(state, step, full_batch, 10, chunk_size=0, progress=False)
    for bad in (0, 2.0):  # 0 was accepted, a float failed inside lax.scan without naming it
        with pytest.raises(ValueError, match="unroll must be a positive int"):
            gf.train.fit(state, step, full_batch, 10, unroll=bad, progress=False)
    with pytest.raises(ValueError, match=r"ema_decays must lie in \(0, 1\)"):
        gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0), ema_decays=(1.5,))


def test_wrong_kinds_of_state_optimizer_and_loss_are_named():
    """Each of these failed deep inside JAX or optax without naming the argument: parameters given
    to fit as its state ("'dict' object has no attribute 'rng'"), an optimizer's name or None
    ("'NoneType' object has no attribute 'init'"), a loss_fn returning a bare loss ("expected
    function with aux output to return a two-element tuple")."""
    opt = optax.sgd(0.1)
    step = gf.train.make_train_step(lsq_loss, opt)
    with pytest.raises(TypeError, match="state must be a genflow.train.TrainState .*got dict"):
        gf.train.fit({"w": jnp.zeros(4)}, step, full_batch, 2, progress=False)
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    with pytest.raises(TypeError, match="step_fn must be a function"):
        gf.train.fit(state, None, full_batch, 2, progress=False)
    with pytest.raises(TypeError, match=r"optimizer must be an optax.GradientTransformation; got the name 'adam'.*"
                                        r"gf.optim.get\('adam'\)"):
        gf.train.make_train_step(lsq_loss, "adam")
    for f in (lambda: gf.train.make_train_step(lsq_loss, None),
              lambda: gf.train.init_state({"w": jnp.zeros(4)}, None, jax.random.key(0))):
        with pytest.raises(TypeError, match=r"optimizer must be an optax.GradientTransformation \(with init and "
                                            r"update\); got NoneType"):
            f()
    with pytest.raises(TypeError, match="loss_fn must be a function"):
        gf.train.make_train_step(3.0, opt)
    bare = gf.train.make_train_step(lambda p, b, k: lsq_loss(p, b, k)[0], opt)
    with pytest.raises(TypeError, match=r"loss_fn must return a pair \(loss, aux\).*got an array of shape \(\)"):
        bare(state, (X, Y))
    triple = gf.train.make_train_step(lambda p, b, k: (*lsq_loss(p, b, k), 0.0), opt, grad_accum=2)
    with pytest.raises(TypeError, match=r"loss_fn must return a pair \(loss, aux\).*got a tuple of length 3"):
        triple(state, (X, Y))
    as_list = gf.train.make_train_step(lambda p, b, k: list(lsq_loss(p, b, k)), opt)  # a list pair still trains
    np.testing.assert_allclose(as_list(state, (X, Y))[0].params["w"], step(state, (X, Y))[0].params["w"])


# --- gradient accumulation, optimizer presets, metrics log, mixed precision, dropout -------------

def test_grad_accumulation_matches_the_full_batch_step():
    """k microbatches of a mean-over-examples loss give the full-batch gradient: same update."""
    opt = optax.adam(0.05)
    runs = {}
    for k in (1, 4):
        state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
        step = jax.jit(gf.train.make_train_step(lsq_loss, opt, grad_accum=k))
        for _ in range(3):
            state, m = step(state, (X, Y))
        runs[k] = (state, m)
    np.testing.assert_allclose(runs[4][0].params["w"], runs[1][0].params["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runs[4][1]["loss"], runs[1][1]["loss"], rtol=1e-5)
    np.testing.assert_allclose(runs[4][1]["grad_norm"], runs[1][1]["grad_norm"], rtol=1e-5)
    with pytest.raises(ValueError, match="grad_accum=3 must divide the batch size"):
        jax.jit(gf.train.make_train_step(lsq_loss, opt, grad_accum=3))(runs[1][0], (X, Y))
    with pytest.raises(ValueError, match="grad_accum must be a positive int"):
        gf.train.make_train_step(lsq_loss, opt, grad_accum=0)


def test_grad_accumulation_passes_the_mean_loss_to_value_fn():
    """An optimizer that re-evaluates the loss (value_fn) sees the mean over microbatches, the
    same as the reported loss (another engineer's SMB optimizer relies on this)."""
    seen = {}

    def probe():
        def init(params):
            return optax.EmptyState()

        def update(updates, state, params=None, *, value=None, value_fn=None, **kw):
            seen["value"], seen["value_fn"] = value, value_fn(params)
            return jax.tree.map(lambda g: -0.1 * g, updates), state

        return optax.GradientTransformationExtraArgs(init, update)

    state = gf.train.init_state({"w": jnp.ones(4)}, probe(), jax.random.key(0))
    gf.train.make_train_step(lsq_loss, probe(), grad_accum=4)(state, (X, Y))
    np.testing.assert_allclose(seen["value_fn"], seen["value"], rtol=1e-6)
    np.testing.assert_allclose(seen["value"], lsq_loss({"w": jnp.ones(4)}, (X, Y), None)[0], rtol=1e-5)


def test_lr_schedule_and_optimizer_presets():
    s = gf.train.lr_schedule(1e-3, warmup_steps=10, decay_steps=110, end_factor=0.1)
    ref = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 110, end_value=1e-4)
    for i in (0, 5, 10, 60, 110, 200):
        np.testing.assert_allclose(s(i), ref(i), rtol=1e-6)
    np.testing.assert_allclose(s(60), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5)  # cosine half way
    c = gf.train.lr_schedule(1e-3, warmup_steps=4)
    np.testing.assert_allclose([c(i) for i in (0, 2, 4, 100)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    # clipping then adam equals optax's own chain
    tx = gf.train.make_optimizer(1e-2, name="adam", clip_norm=0.5)
    ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2))
    g, p = {"w": jnp.array([3.0, -4.0])}, {"w": jnp.zeros(2)}
    u, _ = tx.update(g, tx.init(p), p)
    u_ref, _ = ref.update(g, ref.init(p), p)
    np.testing.assert_allclose(u["w"], u_ref["w"], rtol=1e-6)
    for kw, match in ((dict(clip_norm="2"), "clip_norm must be"), (dict(learning_rate="1"), "learning_rate must be")):
        with pytest.raises(ValueError, match=match):  # strings read as numbers were accepted
            gf.train.make_optimizer(**kw)
    with pytest.raises(ValueError, match="unknown optimizer 'adamz'"):
        gf.train.make_optimizer(name="adamz")
    # optax.contrib's and genflow's optimizers by name too (it looked only in optax: 'momo' failed)
    for name, ref in (("momo", optax.contrib.momo(1e-2)), ("grams", gf.optim.grams(1e-2))):
        tx = gf.train.make_optimizer(1e-2, name=name)
        kw = {"value": jnp.float32(2.0)} if name == "momo" else {}
        u, _ = tx.update(g, tx.init(p), p, **kw)
        u_ref, _ = ref.update(g, ref.init(p), p, **kw)
        np.testing.assert_allclose(u["w"], u_ref["w"], rtol=1e-6)
    with pytest.raises(ValueError, match="decay_steps"):
        gf.train.lr_schedule(1.0, warmup_steps=10, decay_steps=5)
    with pytest.raises(ValueError, match="learning_rate must be a finite real >= 0"):
        gf.train.make_optimizer(-1.0)
    with pytest.raises(ValueError, match=r"end_factor must be a real in \[0, 1\]"):
        gf.train.lr_schedule(1e-3, decay_steps=100, end_factor=-1.0)
    # accepted silently before: inf rates (NaN schedules), an end_factor without decay_steps
    # (ignored), fractional or bool step counts, a NaN clip norm (NaN updates)
    for kw, match in ((dict(learning_rate=float("inf")), "learning_rate must be a finite real"),
                      (dict(learning_rate=1e-3, decay_steps=10, end_factor=float("inf")), "end_factor must be a real in"),
                      (dict(learning_rate=1e-3, end_factor=0.1), "end_factor needs decay_steps"),
                      (dict(learning_rate=1e-3, warmup_steps=2.5), "warmup_steps must be an int >= 0"),
                      (dict(learning_rate=1e-3, warmup_steps=True), "warmup_steps must be an int >= 0"),
                      (dict(learning_rate=1e-3, decay_steps=10.0), "decay_steps must be a positive int")):
        with pytest.raises(ValueError, match=match):
            gf.train.lr_schedule(**kw)
    with pytest.raises(ValueError, match="clip_norm must be a finite real > 0"):
        gf.train.make_optimizer(1e-3, clip_norm=float("nan"))
    # a traced learning rate (optax.inject_hyperparams) still works
    tx = optax.inject_hyperparams(lambda learning_rate: gf.train.make_optimizer(learning_rate, warmup_steps=10))(1e-3)
    state = jax.jit(tx.init)(p)
    jax.jit(tx.update)(g, state, p)


def test_metrics_writer_logs_chunk_means(tmp_path):
    opt = optax.adam(0.05)
    log = gf.train.MetricsWriter(str(tmp_path / "logs" / "metrics.jsonl"))
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(2))
    state, hist = gf.train.fit(state, gf.train.make_train_step(lsq_loss, opt), full_batch, 600, chunk_size=200,
                               progress=False, callback=[log])
    rows = gf.train.read_jsonl(log.path)
    assert [r["step"] for r in rows] == [200, 400, 600]
    np.testing.assert_allclose([r["loss"] for r in rows], hist["loss"].reshape(3, 200).mean(1), rtol=1e-6)
    assert all(r["steps_per_s"] > 0 and "grad_norm" in r for r in rows)


def test_bfloat16_network_keeps_float32_master_weights():
    """A net with dtype=bfloat16 computes in bf16; params, grads, Adam moments and EMA stay float32,
    and the bf16 loss tracks the float32 loss."""
    losses = {}
    for dt in (None, jnp.bfloat16):
        m = gf.nets.MLP(hidden=(32,), dtype=dt)
        p = m.init(jax.random.key(0), jnp.ones((1, 2)), jnp.zeros((1,)))
        opt = optax.adam(1e-2)
        loss_fn = gf.train.diffusion_objective(m.apply, gf.paths.linear(), prediction="velocity")
        state = gf.train.init_state(p, opt, jax.random.key(1), ema_decays=(0.9,))
        state, hist = gf.train.fit(state, gf.train.make_train_step(loss_fn, opt),
                                   lambda k: gf.data.moons(k, 64), 10, chunk_size=10, progress=False)
        dtypes = {a.dtype for a in jax.tree.leaves((state.params, state.opt_state, state.ema))
                  if jnp.issubdtype(a.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
        losses[dt] = hist["loss"]
    np.testing.assert_allclose(losses[jnp.bfloat16], losses[None], rtol=0.05)


def test_diffusion_objective_dropout_rng():
    import flax.linen as nn

    class DropNet(nn.Module):
        @nn.compact
        def __call__(self, x, t, train=False):
            return nn.Dropout(0.5, deterministic=not train)(nn.Dense(x.shape[-1])(x) + t[:, None])

    net = DropNet()
    x = jax.random.normal(jax.random.key(0), (16, 3))
    p = net.init(jax.random.key(1), x, jnp.zeros((16,)))
    f = jax.jit(lambda k, d: gf.train.diffusion_objective(net.apply, gf.paths.linear(), dropout_rng=d)(p, x, k)[0],
                static_argnums=1)
    key = jax.random.key(0)
    # without dropout_rng the network runs deterministically (train=False); with it, dropout is
    # active and its mask comes from the step key (reproducible for a given key)
    assert float(f(key, True)) == float(f(key, True))
    assert float(f(key, True)) != float(f(key, False))
    assert float(f(key, True)) != float(f(jax.random.key(1), True))


def test_params_stay_usable_after_fit_and_paired_noise_batches():
    """init_state copies the caller's params (fit donates the state), and a dict batch with
    pre-coupled noise "x1" (gf.ot.CoupledBatches) replaces the loss's own noise draw."""
    m = gf.nets.MLP(hidden=(8,))
    p = m.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
    opt = optax.sgd(0.1)
    path = gf.paths.linear()
    loss_fn = gf.train.diffusion_objective(m.apply, path, prediction="velocity")
    x0 = jax.random.normal(jax.random.key(1), (32, 2))
    x1 = jax.random.normal(jax.random.key(2), (32, 2))
    state = gf.train.init_state(p, opt, jax.random.key(3))
    gf.train.fit(state, gf.train.make_train_step(loss_fn, opt), iter([{"x": x0, "x1": x1}] * 2), 2, progress=False)
    gf.train.init_state(p, opt, jax.random.key(3))  # p was not donated
    key = jax.random.key(4)
    paired, _ = loss_fn(p, {"x": x0, "x1": x1}, key)
    fn = lambda x, t: m.apply(p, x, t)
    expected, _ = gf.losses.flow_matching_loss(fn, path, x0, jax.random.split(key)[1],
                                               coupling=gf.losses.paired_coupling(x1))
    np.testing.assert_allclose(paired, expected, rtol=1e-6)
    unpaired, _ = loss_fn(p, {"x": x0}, key)
    assert abs(float(paired) - float(unpaired)) > 1e-4


def _lsq_batches(fail_at=None):
    rng = np.random.default_rng(0)
    i = 0
    while True:
        if i == fail_at:
            raise RuntimeError(f"data source failed at batch {i}")
        idx = rng.integers(0, 512, 32)
        yield (np.asarray(X)[idx], np.asarray(Y)[idx])
        i += 1


def test_exceptions_keep_the_last_good_state():
    """A failing data iterator, an exhausted one, a failing callback: fit re-raises with the last
    good state (usable, not donated), its step and the history so far."""
    opt = optax.sgd(0.01)
    step = gf.train.make_train_step(lsq_loss, opt)

    def fresh():
        return gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))

    with pytest.raises(RuntimeError, match="failed at batch 25") as exc:
        gf.train.fit(fresh(), step, _lsq_batches(fail_at=25), 40, chunk_size=10, progress=False)
    err = exc.value
    assert err.step == 20 and int(err.state.step) == 20 and err.history["loss"].shape == (20,)
    clean, _ = gf.train.fit(fresh(), step, _lsq_batches(), 20, chunk_size=10, progress=False)
    np.testing.assert_array_equal(np.asarray(err.state.params["w"]), np.asarray(clean.params["w"]))

    with pytest.raises(ValueError, match=r"data ran out after 7 batches; fit was asked for num_steps=12") as exc:
        gf.train.fit(fresh(), step, [(np.asarray(X[:8]), np.asarray(Y[:8]))] * 7, 12, chunk_size=5, progress=False)
    assert int(exc.value.state.step) == 5

    def bad_callback(state, metrics):
        if int(state.step) >= 20:
            raise KeyError("callback failed")

    # a smaller last batch (no drop_remainder) failed in np.stack naming neither the batch nor the cause
    short = [(np.asarray(X[:8]), np.asarray(Y[:8]))] * 6 + [(np.asarray(X[:3]), np.asarray(Y[:3]))]
    with pytest.raises(ValueError, match=r"batch 6 has shapes \(\(3, 4\), \(3,\)\) where batch 5 had "
                                         r"\(\(8, 4\), \(8,\)\).*drop_remainder") as exc:
        gf.train.fit(fresh(), step, short, 7, chunk_size=5, progress=False)
    assert int(exc.value.state.step) == 5

    with pytest.raises(KeyError, match="callback failed") as exc:
        gf.train.fit(fresh(), step, full_batch, 40, chunk_size=10, callback=bad_callback, progress=False)
    assert int(exc.value.state.step) == 20 and np.isfinite(np.asarray(exc.value.state.params["w"])).all()
    with pytest.raises(TypeError, match="data must be a callable batch_fn"):
        gf.train.fit(fresh(), step, 5, 10, progress=False)
    # a dataset array trained on one row per step without an error; a dict's keys were its batches
    for data, match in [(np.asarray(X), r"data is an array of shape \(512, 4\): fit would iterate its leading axis"),
                        (X, r"data is an array of shape \(512, 4\).*pass iter\(x\)"),
                        ({"x": X, "y": Y}, r"data is a dict: fit would iterate its keys as batches.*itertools.repeat"),
                        ("batches", r"data is a str: fit would iterate its characters")]:
        with pytest.raises(TypeError, match=match):
            gf.train.fit(fresh(), step, data, 10, progress=False)
    stacked = np.stack([np.asarray(X[:8])] * 3), np.stack([np.asarray(Y[:8])] * 3)  # (pre-batched: iter() passes)
    state, _ = gf.train.fit(fresh(), step, iter(zip(*stacked)), 3, chunk_size=3, progress=False)
    assert int(state.step) == 3


def test_host_batches_of_the_next_chunk_are_gathered_while_a_chunk_runs(tmp_path):
    """fit gathers chunk k + 1's host batches between dispatching chunk k and fetching its metrics
    (the device used to idle while the host gathered): the order of the iterator's reads and the
    callbacks shows it. It reads no batch past num_steps, a checkpoint records the position after
    the saved state's own batches, and an error gathering the next chunk is raised after the
    running chunk is logged, called back and saved."""
    opt = optax.sgd(0.01)
    step = gf.train.make_train_step(lsq_loss, opt)
    events = []

    class Stream:
        def __init__(self, fail_at=None):
            self.i, self.fail_at = 0, fail_at

        def __iter__(self):
            return self

        def __next__(self):
            if self.i == self.fail_at:
                raise RuntimeError(f"source failed at batch {self.i}")
            events.append(f"batch {self.i}")
            self.i += 1
            return (np.asarray(X[:8]), np.asarray(Y[:8]))

        def get_state(self):
            return {"i": self.i}

    def record(state, metrics):
        events.append(f"callback {int(state.step)}")

    def fresh():
        return gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))

    stream = Stream()
    gf.train.fit(fresh(), step, stream, 6, chunk_size=2, callback=record, progress=False)
    assert events == ["batch 0", "batch 1", "batch 2", "batch 3", "callback 2", "batch 4", "batch 5", "callback 4",
                      "callback 6"]
    assert stream.i == 6  # (nothing read past num_steps: the same iterator can train on)

    events.clear()
    with gf.train.Checkpointer(str(tmp_path / "ck"), save_every=2, keep=5) as ckpt:
        with pytest.raises(RuntimeError, match="source failed at batch 5") as exc:
            gf.train.fit(fresh(), step, Stream(fail_at=5), 8, chunk_size=2, callback=record, progress=False,
                         checkpointer=ckpt)
        assert exc.value.step == 4 and exc.value.history["loss"].shape == (4,)
        assert events[-2:] == ["batch 4", "callback 4"] and ckpt.all_steps() == [2, 4]
        for s in (2, 4):  # (the positions after each saved state's batches, not the read-ahead's)
            assert ckpt.restore(fresh(), step=s)[1] == {"i": s}

    def bad_callback(state, metrics):
        raise KeyError("callback failed")

    with pytest.raises(KeyError, match="callback failed") as exc:
        gf.train.fit(fresh(), step, Stream(fail_at=3), 8, chunk_size=2, callback=bad_callback, progress=False)
    assert exc.value.step == 2 and any("gathering the next chunk's batches had failed too (RuntimeError: source "
                                       "failed at batch 3)" in n for n in exc.value.__notes__)


def test_non_finite_step_is_the_global_step_after_resuming():
    opt = optax.sgd(0.01)
    step = gf.train.make_train_step(lsq_loss, opt)

    def nan_at_7(state, batch):
        x, y = batch
        return step(state, (x, jnp.where(state.step == 7, jnp.nan, y)))

    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    state, _ = gf.train.fit(state, step, full_batch, 5, chunk_size=5, progress=False)
    with pytest.raises(gf.train.NonFiniteLossError, match="at step 7") as exc:
        gf.train.fit(state, nan_at_7, full_batch, 10, chunk_size=10, progress=False)
    assert exc.value.step == 7 and int(exc.value.state.step) == 7 and exc.value.history["loss"].shape == (2,)


def test_ema_keys_are_exact_for_decays_near_one():
    assert gf.train.ema_key(0.99) == "0.99" and gf.train.ema_key(0.9999) == "0.9999"
    d1, d2 = 0.9999995, 0.99999991
    assert gf.train.ema_key(d1) != "1" and gf.train.ema_key(d1) != gf.train.ema_key(d2)
    opt = optax.sgd(0.1)
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0), ema_decays=(d1,))
    state, _ = gf.train.fit(state, gf.train.make_train_step(lsq_loss, opt), full_batch, 3, progress=False)
    # the EMA moved by (1 - d) of the parameters each step, not 0
    ema = np.asarray(state.ema[gf.train.ema_key(d1)]["w"])
    assert np.all(np.abs(ema) > 0) and np.all(np.abs(ema) < 1e-4 * np.abs(np.asarray(state.params["w"])).max() * 10)


def test_ema_keys_are_those_of_the_decays_given():
    """EMA copies are keyed by ema_key of the decay's exact value (a float32 0.999 is not 0.999:
    the key differs, and checkpoints saved with it must keep restoring), so a lookup with the same
    value finds its copy, and a float32 and a Python decay are two copies."""
    decays = (np.float32(0.999), 0.999, np.float16(0.99))
    state = gf.train.init_state({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.key(0), ema_decays=decays)
    assert sorted(state.ema) == sorted(gf.train.ema_key(d) for d in decays) and len(state.ema) == 3
    assert gf.train.ema_key(np.float32(0.999)) == repr(float(np.float32(0.999))) != gf.train.ema_key(0.999)


def test_grad_accumulation_sums_low_precision_gradients_in_float32():
    # Microbatch gradients 256, 1, 1, ..., 1 (64 of them): a bfloat16 running sum stays at 256
    # (257 rounds back to 256), a float32 one reaches 319; the mean keeps the parameters' dtype.
    params = {"w": jnp.zeros(2, jnp.bfloat16)}

    def loss(p, batch, key):
        return jnp.sum(p["w"].astype(jnp.float32) * batch.mean()).astype(jnp.bfloat16), {}

    step = jax.jit(gf.train.make_train_step(loss, optax.sgd(1.0), grad_accum=64))
    state = gf.train.init_state(params, optax.sgd(1.0), jax.random.key(0))
    new, m = step(state, jnp.ones((64,), jnp.float32).at[0].set(256.0))
    assert new.params["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(new.params["w"], np.float32), -319.0 / 64, rtol=1e-2)


def test_on_device_batch_key_is_not_the_loss_key():
    # fit drew the batch from fold_in(rng, 1), which under JAX's default partitionable threefry
    # is split(rng)[1], the train step's loss key: a loss drawing its noise from that key got the
    # data itself as noise (correlation 1.0 at every step)
    def loss_fn(params, x0, key):
        eps = jax.random.normal(key, x0.shape)
        return jnp.mean((x0 @ params["w"] - eps) ** 2), {"corr": jnp.corrcoef(x0.ravel(), eps.ravel())[0, 1]}

    opt = optax.sgd(1e-2)
    state = gf.train.init_state({"w": jnp.eye(2)}, opt, jax.random.key(0))
    _, hist = gf.train.fit(state, gf.train.make_train_step(loss_fn, opt), lambda k: jax.random.normal(k, (256, 2)),
                           5, chunk_size=5, progress=False)
    assert np.all(np.abs(hist["corr"]) < 0.2), hist["corr"]
    rng = jax.random.key(7)
    used = jax.random.split(rng, 3)[:2]
    bk = jax.random.key_data(gf.train.batch_key(rng))
    assert not any(np.array_equal(bk, jax.random.key_data(k)) for k in used)


def test_fit_leaves_the_callers_key_usable():
    # init_state stored the caller's key itself, and fit donated (deleted) it
    key = jax.random.key(0)
    opt = optax.sgd(0.1)
    state = gf.train.init_state({"w": jnp.ones(2)}, opt, key)
    step = gf.train.make_train_step(lambda p, b, k: (jnp.sum(p["w"] ** 2), {}), opt)
    gf.train.fit(state, step, lambda k: None, 3, chunk_size=3, progress=False)
    assert not key.is_deleted()
    jax.random.split(key)


def test_ema_of_bfloat16_params_moves():
    # a bfloat16 EMA at decay 0.9999 rounded every (1 - d)(p - e) away and stayed at 1.0
    opt = optax.sgd(1.0)
    loss = lambda p, b, k: (-0.5 * jnp.sum(p["w"].astype(jnp.float32)), {})  # w += 0.5 per step
    state = gf.train.init_state({"w": jnp.ones(4, jnp.bfloat16)}, opt, jax.random.key(0), ema_decays=(0.9999,))
    state, _ = gf.train.fit(state, gf.train.make_train_step(loss, opt), lambda k: None, 50, chunk_size=50,
                            progress=False)
    e, d = 1.0, 0.9999
    for i in range(1, 51):
        e = d * e + (1 - d) * (1.0 + 0.5 * i)
    ema = state.ema[gf.train.ema_key(d)]["w"]
    assert ema.dtype == jnp.float32 and state.params["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ema), e, rtol=1e-4)


def test_metrics_writer_drops_rows_past_the_resume_step(tmp_path):
    # a run resumed from an older checkpoint (or re-run into the same directory) logged those steps twice
    path = str(tmp_path / "m.jsonl")
    w = gf.train.MetricsWriter(path)
    for s in range(1, 16):
        w.write(s, {"loss": 1.0 / s})
    w = gf.train.MetricsWriter(path, resume_step=10)
    for s in range(11, 21):
        w.write(s, {"loss": 1.0 / s})
    assert [r["step"] for r in gf.train.read_jsonl(path)] == list(range(1, 21))
    gf.train.MetricsWriter(path, resume_step=0)
    assert gf.train.read_jsonl(path) == []


_X = jax.random.normal(jax.random.key(0), (64, 4))
_Y = _X @ jnp.array([1.0, -2.0, 0.5, 3.0])


def _lsq(params, batch, key):
    x, y = batch
    return jnp.mean((x @ params["w"] - y) ** 2), {}


@pytest.mark.parametrize("name,lr", [("prodigy", 1.0), ("dog", 1.0), ("madgrad", 1e-2), ("cocob", 1.0)])
def test_fit_with_an_optimizer_state_that_holds_the_params(name, lr):
    # prodigy / dog / madgrad keep the initial params in their state, cocob one zeros array in
    # three leaves: fit donated one buffer twice ("Attempt to donate the same buffer twice";
    # a segfault with a mesh)
    opt = gf.optim.get(name, learning_rate=lr)
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    assert len({id(x) for x in leaves}) == len(leaves)
    step = gf.train.make_train_step(_lsq, opt)
    state, hist = gf.train.fit(state, step, lambda k: (_X, _Y), 3, chunk_size=3, progress=False)
    assert int(state.step) == 3 and np.all(np.isfinite(hist["loss"]))
    # a hand-built state that aliases its parameters in the optimizer state is copied by fit
    params = {"w": jnp.zeros(4)}
    hand = gf.train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                               rng=jax.random.key(0), ema={})
    state, _ = gf.train.fit(hand, step, lambda k: (_X, _Y), 3, chunk_size=3, progress=False)
    assert int(state.step) == 3


@pytest.mark.parametrize("opt", [optax.lbfgs(), optax.chain(optax.sgd(1.0), optax.scale_by_zoom_linesearch(15)),
                                 optax.chain(optax.sgd(1.0), optax.scale_by_backtracking_linesearch(15))],
                         ids=["lbfgs", "zoom", "backtracking"])
def test_line_search_optimizers_get_value_grad_and_value_fn(opt):
    # optax's line searches need grad= beside value= and value_fn= (a TypeError before)
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    step = jax.jit(gf.train.make_train_step(_lsq, opt))
    losses = []
    for _ in range(5):
        state, m = step(state, (_X, _Y))
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


def test_aux_named_like_a_step_metric_is_refused():
    """An aux entry named "finite" replaced the step's guard flag (fit ran on past a NaN loss with
    the state stuck, no error); one named "loss" silently replaced the loss in the history."""
    opt = optax.sgd(0.1)

    def nan_loss(params, batch, key):
        loss = jnp.where(params["w"][0] > 0.25, jnp.nan, jnp.sum((params["w"] - 1.0) ** 2))
        return loss, {"finite": jnp.array(True)}

    state = gf.train.init_state({"w": jnp.zeros(2)}, opt, jax.random.key(0))
    with pytest.raises(ValueError, match="aux"):
        gf.train.fit(state, gf.train.make_train_step(nan_loss, opt), lambda k: jnp.zeros(1), 6, chunk_size=3,
                     progress=False)

    def loss_with_aux_loss(params, batch, key):
        loss = jnp.mean((batch @ params["w"]) ** 2)
        return loss, {"loss": 2 * loss + 100.0}

    state = gf.train.init_state({"w": jnp.zeros(3)}, opt, jax.random.key(0))
    with pytest.raises(ValueError, match="'loss'"):
        jax.jit(gf.train.make_train_step(loss_with_aux_loss, opt))(state, jnp.ones((2, 3)))


def test_grad_accumulation_averages_integer_and_bool_metrics():
    """The microbatch mean of an int metric was cast back to int (0.75 -> 0), and bool metrics were
    summed with a logical or."""
    opt = optax.sgd(0.1)

    def loss_fn(params, batch, key):
        loss = jnp.mean((batch @ params["w"] - 1.0) ** 2)
        return loss, {"n_pos": jnp.sum(batch[:, 0] > 0).astype(jnp.int32), "any_pos": jnp.any(batch[:, 0] > 0)}

    state = gf.train.init_state({"w": jnp.zeros(3)}, opt, jax.random.key(0))
    batch = jnp.array([[1.0, 0, 0], [1.0, 0, 0], [-1.0, 0, 0], [1.0, 0, 0]])
    _, m = jax.jit(gf.train.make_train_step(loss_fn, opt, grad_accum=4))(state, batch)
    np.testing.assert_allclose(m["n_pos"], 0.75)   # mean over the 4 microbatches of [1, 1, 0, 1]
    np.testing.assert_allclose(m["any_pos"], 0.75)


def test_init_state_ema_decays_errors_name_the_argument():
    opt = optax.sgd(0.1)
    for bad in (0.999, None, ("0.999",)):
        with pytest.raises((TypeError, ValueError), match="ema_decays"):
            gf.train.init_state({"w": jnp.zeros(3)}, opt, jax.random.key(0), ema_decays=bad)


def test_init_state_names_a_non_array_leaf_of_params_and_the_way_to_split_a_model():
    """An equinox Module passed whole failed in jnp.array as "Value '<custom_jvp ...>' with dtype
    object is not a valid JAX array type", naming neither params nor the leaf; split as the
    message says, the same model trains."""
    import equinox as eqx

    net = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0))
    opt = optax.adam(1e-2)
    with pytest.raises(TypeError, match=r"params must be a pytree of arrays; the leaf at \.activation .*eqx.partition"):
        gf.train.init_state(net, opt, jax.random.key(1))
    with pytest.raises(TypeError, match=r"the leaf at \['act'\] is a str"):
        gf.train.init_state({"w": jnp.ones(2), "act": "relu"}, opt, jax.random.key(1))
    params, static = eqx.partition(net, eqx.is_array)
    state = gf.train.init_state(params, opt, jax.random.key(1))
    x = jnp.ones((8, 2))

    def loss_fn(p, batch, key):
        m = eqx.combine(p, static)
        return gf.losses.flow_matching_loss(lambda x, t: jax.vmap(m)(jnp.concatenate([x, t[:, None]], -1)),
                                            gf.paths.linear(), batch, key)

    state, hist = gf.train.fit(state, gf.train.make_train_step(loss_fn, opt), lambda k: x, num_steps=40,
                               chunk_size=20, progress=False)
    assert float(np.mean(hist["loss"][-5:])) < float(np.mean(hist["loss"][:5]))


def test_diffusion_objective_refuses_a_tuple_batch_by_name():
    """A tuple (x, y) failed with a jnp.asarray concatenation error, a tuple (x, x1) with an
    AttributeError, neither naming the batch."""
    model = gf.nets.MLP(hidden=(8,), time_dim=4)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
    loss_fn = gf.train.diffusion_objective(model.apply, gf.paths.linear(), prediction="velocity")
    x = jnp.ones((4, 2))
    for batch in ((x, jnp.zeros((4,), jnp.int32)), (x, x)):
        with pytest.raises(TypeError, match="batch"):
            loss_fn(params, batch, jax.random.key(0))


def test_step_guard_catches_a_non_finite_optimizer_state():
    """float16 parameters with adam: g = 300 overflows the float16 second moment (g^2 > 65504) while
    the loss, the float32 gradient norm and the parameters stay finite; the inf in the state froze
    the parameter for good (updates m / sqrt(inf) = 0) and fit reported every step as finite."""
    opt = optax.adam(1e-2)

    def loss_fn(params, batch, key):
        return jnp.sum(params["w"].astype(jnp.float32) * batch), {}

    state = gf.train.init_state({"w": jnp.zeros(2, jnp.float16)}, opt, jax.random.key(0))
    with pytest.raises(gf.train.NonFiniteLossError) as e:
        gf.train.fit(state, gf.train.make_train_step(loss_fn, opt), lambda k: jnp.array([300.0, 1.0]), 5,
                     chunk_size=5, progress=False)
    assert e.value.step == 0 and int(e.value.state.step) == 0


def test_optax_contrib_sam_with_make_train_step():
    """An ExtraArgs optimizer whose update names its extra arguments without **extra_args
    (optax.contrib.sam: grad_fn= only) trains through make_train_step: value= / grad= /
    value_fn= failed with "unexpected keyword argument 'value'"."""
    opt = optax.contrib.sam(optax.adam(0.05), optax.sgd(1e-3), sync_period=2)
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(2))
    state, hist = gf.train.fit(state, gf.train.make_train_step(lsq_loss, opt), full_batch, 400, chunk_size=200,
                               progress=False)
    assert hist["finite"].all() and hist["loss"][-1] < 0.1 * hist["loss"][0]


def test_label_dropout_replaces_the_given_fraction_of_labels():
    """label_dropout=p sends the null label for a fraction p of the batch (p = 0.5 cannot tell p from
    1 - p); the model sees the labels through apply_fn's y."""
    seen = []

    def apply_fn(params, x, t, y=None):
        seen.append(np.asarray(y))
        return jnp.zeros_like(x)

    b = 4000
    batch = {"x": jnp.ones((b, 2)), "y": jnp.zeros((b,), jnp.int32)}
    for p in (0.1, 0.8):
        seen.clear()
        loss_fn = gf.train.diffusion_objective(apply_fn, gf.paths.linear(), prediction="velocity", label_dropout=p,
                                               null_label=7)
        loss_fn({}, batch, jax.random.key(3))
        y = seen[-1]
        assert set(np.unique(y)) <= {0, 7}
        frac = float(np.mean(y == 7))
        assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / b), (p, frac)


def test_grad_accumulation_draws_each_microbatch_noise_from_its_own_key():
    """Documented: microbatch i draws its noise from fold_in(key, i), key the step's loss key
    (split(state.rng, 3)[1]): the microbatches' noise is independent, not k copies of one draw."""
    def noisy_loss(params, batch, key):
        noise = jax.random.normal(key, batch.shape)
        return jnp.mean((params["w"] - batch - noise) ** 2), {}

    k = 4
    batch = jnp.arange(16.0)
    opt = optax.sgd(0.1)
    state = gf.train.init_state({"w": jnp.zeros(())}, opt, jax.random.key(5))
    _, m = jax.jit(gf.train.make_train_step(noisy_loss, opt, grad_accum=k))(state, batch)
    key = jax.random.split(state.rng, 3)[1]
    micro = batch.reshape(-1, k).T  # strided: microbatch i holds rows i, i + k, ...
    ref = np.mean([float(noisy_loss(state.params, micro[i], jax.random.fold_in(key, i))[0]) for i in range(k)])
    np.testing.assert_allclose(float(m["loss"]), ref, rtol=1e-5)


def test_fit_keeps_the_last_good_state_when_later_steps_of_the_chunk_are_finite():
    """A NaN batch in the middle of a chunk stops training there: the finite batches after it in the
    same chunk must not be applied (the error's state is the state before the bad step)."""
    x = jax.random.normal(jax.random.key(0), (32, 4))
    y = x @ jnp.array([1.0, -2.0, 0.5, 3.0])

    def loss(params, batch, key):
        bx, by = batch
        return jnp.mean((bx @ params["w"] - by) ** 2), {}

    opt = optax.sgd(0.05)
    step = gf.train.make_train_step(loss, opt)
    batches = [(np.asarray(x), np.asarray(y)) for _ in range(10)]
    batches[3] = (np.asarray(x), np.full_like(np.asarray(y), np.nan))  # only the 4th batch is bad
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(1))
    with pytest.raises(gf.train.NonFiniteLossError) as exc:
        gf.train.fit(state, step, iter(batches), 10, chunk_size=10, progress=False)
    err = exc.value
    assert err.step == 3 and int(err.state.step) == 3 and err.history["loss"].shape == (3,)
    clean = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(1))
    clean, _ = gf.train.fit(clean, step, iter(batches[:3]), 3, chunk_size=3, progress=False)
    np.testing.assert_allclose(err.state.params["w"], clean.params["w"], rtol=1e-6)


def test_fit_recompiles_when_host_batches_change_shape_between_chunks():
    """Host batches of 8, 8 and 4 rows (no drop_remainder) at chunk_size=1: the last chunk has the
    same length but another shape, and reused the first executable ("Argument types differ...",
    with an x64 hint). Each step must equal the same step taken on its own."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 3)).astype(np.float32), rng.standard_normal(20).astype(np.float32)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 20, 8)]

    def loss_fn(params, batch, key):
        xb, yb = batch
        return jnp.mean((xb @ params["w"] - yb) ** 2), {}

    opt = optax.sgd(0.1)
    step = gf.train.make_train_step(loss_fn, opt)
    state, hist = gf.train.fit(gf.train.init_state({"w": jnp.zeros(3)}, opt, jax.random.key(0)), step,
                               iter(batches), 3, chunk_size=1, progress=False)  # (fit donates its state)
    ref = gf.train.init_state({"w": jnp.zeros(3)}, opt, jax.random.key(0))
    for b in batches:
        ref, _ = jax.jit(step)(ref, jax.tree.map(jnp.asarray, b))
    np.testing.assert_allclose(state.params["w"], ref.params["w"], rtol=1e-6)
    assert len(hist["loss"]) == 3


# -- from the sixth mutation audit (each test fails on its mutant) --
@pytest.mark.parametrize("k", [1, 4])
def test_value_fn_uses_the_same_key_as_the_gradient_for_a_noisy_loss(k):
    """Documented: value_fn(params) is the loss on the same batch and PRNG key as the gradient (and with
    grad_accum=k the mean over microbatches with microbatch i's key fold_in(key, i)). So at the step's
    params value_fn(params) == value= exactly, also for a loss that draws noise from its key. (The
    existing test used a key-independent loss, where any key gives the same value.)"""
    seen = {}

    def probe():
        def update(updates, state, params=None, *, value=None, value_fn=None, **kw):
            seen["value"], seen["value_fn"] = value, value_fn(params)
            return jax.tree.map(lambda g: -0.1 * g, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    def noisy_loss(params, batch, key):
        noise = jax.random.normal(key, batch.shape)
        return jnp.mean((params["w"] * batch - noise) ** 2), {}

    batch = jnp.linspace(-1.0, 1.0, 16)
    state = gf.train.init_state({"w": jnp.array(0.3)}, probe(), jax.random.key(0))
    gf.train.make_train_step(noisy_loss, probe(), grad_accum=k)(state, batch)  # (no jit: seen holds arrays)
    np.testing.assert_allclose(float(seen["value_fn"]), float(seen["value"]), rtol=1e-6)


def test_step_guard_catches_a_non_finite_loss_with_finite_gradients():
    """Documented: a step whose loss is not finite leaves the state untouched (finite=False), even
    when the gradients and updated parameters are finite (a NaN in a parameter-free term of the loss)."""
    def loss_fn(p, batch, key):
        return jnp.sum(p["w"] ** 2) + batch, {}  # d/dw = 2w: finite whatever batch is

    opt = optax.sgd(0.1)
    state = gf.train.init_state({"w": jnp.ones(3)}, opt, jax.random.key(0))
    step = jax.jit(gf.train.make_train_step(loss_fn, opt))
    new, m = step(state, jnp.float32(jnp.nan))
    assert not bool(m["finite"]) and np.isfinite(float(m["grad_norm"]))
    np.testing.assert_array_equal(new.params["w"], state.params["w"])
    assert int(new.step) == int(state.step)
    new, m = step(state, jnp.float32(0.0))  # control: the same step with a finite loss moves
    assert bool(m["finite"]) and not np.allclose(new.params["w"], 1.0)


def test_an_extra_args_optimizer_that_names_value_without_kwargs_receives_the_loss():
    """make_train_step passes value=loss (and value_fn=) to a GradientTransformationExtraArgs whose
    update names them explicitly without **kwargs (the forward_named path of _extra_args_view)."""
    seen = {}

    def update(updates, state, params=None, *, value, value_fn):
        seen["value"], seen["value_fn"] = value, value_fn(params)
        return jax.tree.map(lambda g: -0.1 * g, updates), state

    opt = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    def loss_fn(p, batch, key):
        return jnp.mean((p["w"] * batch - 1.0) ** 2), {}

    batch = jnp.arange(4.0)
    state = gf.train.init_state({"w": jnp.array(0.5)}, opt, jax.random.key(0))
    new, m = gf.train.make_train_step(loss_fn, opt)(state, batch)
    want = float(loss_fn({"w": jnp.array(0.5)}, batch, None)[0])
    np.testing.assert_allclose(float(seen["value"]), want, rtol=1e-6)
    np.testing.assert_allclose(float(seen["value_fn"]), want, rtol=1e-6)
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-6)


@pytest.mark.parametrize("own_step", [False, True], ids=["make_train_step", "a_step_of_ones_own"])
def test_a_non_finite_batch_mid_chunk_stops_make_train_steps_step_at_the_last_good_state(own_step):
    """fit hands make_train_step's step ``skip=`` after a non-finite step instead of guarding the
    state itself, and guards a step function of one's own (no ``skip=``) itself: either way, later
    finite batches of the chunk must not be applied (fit's own guard without its ``halted`` flag
    applied them and passed every other test; a mutation audit)."""
    opt = optax.sgd(0.01)
    step = gf.train.make_train_step(lsq_loss, opt)
    assert step.takes_skip is step
    if own_step:
        step = lambda state, batch: gf.train.make_train_step(lsq_loss, opt)(state, batch)  # noqa: E731
        assert not hasattr(step, "takes_skip")
    batches = [(X, jnp.where(i == 13, jnp.nan, Y)) for i in range(40)]
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    with pytest.raises(gf.train.NonFiniteLossError, match="at step 13") as exc:
        gf.train.fit(state, step, iter(batches), 40, chunk_size=10, progress=False)
    assert int(exc.value.state.step) == 13 and exc.value.history["loss"].shape == (13,)
    clean = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    clean, _ = gf.train.fit(clean, step, iter(batches[:13]), 13, chunk_size=13, progress=False)
    np.testing.assert_array_equal(exc.value.state.params["w"], clean.params["w"])


def test_a_chunk_holds_one_copy_of_the_state_beside_its_input():
    """fit's own guard around make_train_step's step (which keeps its input state on a
    non-finite step already) held a third copy of the state in XLA's plan: 256 MiB of
    temporaries for a 128 MiB Adam + EMA state (memory audit); now about one state."""
    from genflow.train._loop import _chunk_fn
    d = 512
    params = {"w1": jnp.zeros((d, d)), "w2": jnp.zeros((d, d))}

    def loss(p, batch, key):
        return jnp.mean((jnp.tanh(batch @ p["w1"]) @ p["w2"] - batch) ** 2), {}

    opt = optax.adam(1e-3)
    state = jax.eval_shape(lambda: gf.train.init_state(params, opt, jax.random.key(0), ema_decays=(0.999,)))
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    run = jax.jit(_chunk_fn(gf.train.make_train_step(loss, opt), lambda k: jax.random.normal(k, (16, d))),
                  static_argnums=2, donate_argnums=0)
    temp = run.lower(state, None, 4).compile().memory_analysis().temp_size_in_bytes
    assert temp < 1.5 * size, (temp / size)


def test_a_wrapper_of_make_train_steps_step_gets_fits_own_guard():
    """functools.wraps copies ``takes_skip`` onto a wrapper: fit then trusted a wrapper that
    rejects more steps than it tells the inner step (a trust region here) to keep its state,
    and kept a rejected update; a wrapper without ``**kw`` failed on ``skip=`` (review). Only
    make_train_step's step itself is told to skip; a Python-bool skip keeps a bool finite."""
    import functools

    opt = optax.sgd(0.05)
    step = gf.train.make_train_step(lsq_loss, opt)

    @functools.wraps(step)
    def trust_region(state, batch, **kw):
        s, m = step(state, batch, **kw)
        return s, dict(m, finite=m["finite"] & (jnp.linalg.norm(s.params["w"]) < 0.5))

    @functools.wraps(step)
    def logged(state, batch):
        s, m = step(state, batch)
        return s, dict(m, w_norm=jnp.linalg.norm(s.params["w"]))

    fresh = lambda: gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))  # noqa: E731
    batches = [(X, Y)] * 6
    with pytest.raises(gf.train.NonFiniteLossError) as exc:
        gf.train.fit(fresh(), trust_region, iter(batches), 6, chunk_size=6, progress=False)
    s = exc.value.state
    assert int(s.step) == exc.value.step and float(jnp.linalg.norm(s.params["w"])) < 0.5
    _, hist = gf.train.fit(fresh(), logged, iter(batches), 6, chunk_size=3, progress=False)
    assert hist["w_norm"].shape == (6,)
    new, m = step(fresh(), (X, Y), skip=True)
    assert m["finite"].dtype == jnp.bool_ and not m["finite"] and int(new.step) == 0


def test_non_scalar_aux_entries_are_dropped_and_a_bad_key_is_named():
    """A nested dict in the loss's aux (batch statistics) has ndim 0 too: it reached fit's metric
    log and failed there, and the failure handler then failed too, losing the state. init_state
    now checks its key: an int failed inside fit (interoperability audit)."""
    opt = optax.sgd(0.1)

    def loss(p, b, k):
        return jnp.mean((b @ p["w"]) ** 2), {"stats": {"mean": jnp.ones(3)}, "w_sum": jnp.sum(p["w"]), "n": 4,
                                             "c": 1 + 2j}

    state = gf.train.init_state({"w": jnp.ones(2)}, opt, jax.random.key(0))
    _, hist = gf.train.fit(state, gf.train.make_train_step(loss, opt), lambda k: jnp.ones((4, 2)), 2, chunk_size=2,
                           progress=False)
    assert "stats" not in hist and hist["w_sum"].shape == (2,) and list(hist["n"]) == [4, 4]
    assert list(hist["c"]) == [1 + 2j, 1 + 2j]  # (a Python complex is a scalar too: kept, as before)
    with pytest.raises((TypeError, ValueError), match="key"):
        gf.train.init_state({"w": jnp.ones(2)}, opt, 0)


@pytest.mark.parametrize("prediction,weighting", [("eps", "uniform"), ("x0", "uniform"),
                                                  ("velocity", lambda path, t: 1.0 + 3.0 * t)])
def test_diffusion_objective_passes_prediction_and_weighting_to_the_loss(prediction, weighting):
    """The objective is diffusion_loss(fn, path, x0, split(key)[1], prediction=, weighting=) (its
    docstring); prediction and weighting reach the loss."""
    m = gf.nets.MLP(hidden=(8,))
    p = m.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
    path = gf.paths.linear()
    x0 = jax.random.normal(jax.random.key(1), (32, 2))
    key = jax.random.key(4)
    loss_fn = gf.train.diffusion_objective(m.apply, path, prediction=prediction, weighting=weighting)
    got, _ = loss_fn(p, x0, key)
    expected, _ = gf.losses.diffusion_loss(lambda x, t: m.apply(p, x, t), path, x0, jax.random.split(key)[1],
                                           prediction=prediction, weighting=weighting)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_diffusion_objective_dropout_key_is_fresh_each_step():
    """dropout_rng: the network's dropout key is jax.random.fold_in(key, 2) of the step key (its
    docstring), so it changes with the step key (the existing test could not tell: the loss noise
    changes with the key anyway)."""
    seen = []

    def apply_fn(params, x, t, train=False, rngs=None):
        seen.append(np.asarray(jax.random.key_data(rngs["dropout"])))
        return jnp.zeros_like(x)

    loss_fn = gf.train.diffusion_objective(apply_fn, gf.paths.linear(), prediction="velocity", dropout_rng=True)
    x0 = jnp.ones((4, 2))
    for k in (0, 1):
        key = jax.random.key(k)
        loss_fn({}, x0, key)
        np.testing.assert_array_equal(seen[-1], jax.random.key_data(jax.random.fold_in(key, 2)))
    assert not np.array_equal(seen[0], seen[-1])


def test_lr_schedule_edges_of_its_documented_ranges():
    """Audit round 8: a one-step warm-up starts at rate 0 (a `warmup_steps <= 1` shortcut skipped it),
    end_factor=1 (closed range) keeps the rate, decay_steps == warmup_steps is refused by name (optax
    said 'requires positive decay_steps'), clip_norm=0 is refused (it zeroed every update), and the
    optimizers that take a float rate refuse decay_steps alone (it was dropped silently)."""
    s = gf.train.lr_schedule(1e-3, warmup_steps=1)
    np.testing.assert_allclose([float(s(i)) for i in (0, 1, 5)], [0.0, 1e-3, 1e-3], rtol=1e-6)
    s = gf.train.lr_schedule(1e-3, warmup_steps=2, decay_steps=10, end_factor=1.0)
    np.testing.assert_allclose([float(s(i)) for i in (0, 1, 2, 6, 10, 20)], [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3],
                               rtol=1e-6)
    with pytest.raises(ValueError, match=r"decay_steps \(10\) must exceed warmup_steps \(10\)"):
        gf.train.lr_schedule(1e-3, warmup_steps=10, decay_steps=10)
    with pytest.raises(ValueError, match="clip_norm must be a finite real > 0"):
        gf.train.make_optimizer(1e-2, name="sgd", clip_norm=0.0)
    for name in ("sm3", "rprop", "optimistic_adam"):
        with pytest.raises(ValueError, match=f"optimizer '{name}' takes a float learning rate, not a schedule"):
            gf.train.make_optimizer(1e-2, name=name, decay_steps=10)


def test_a_non_finite_step_leaves_the_rng_untouched_too():
    """'leaves the state untouched': a skipped step must not advance the PRNG key either (a run
    resumed from e.state would otherwise draw other noise than the one that failed)."""
    opt = optax.sgd(0.1)
    state = gf.train.init_state({"w": jnp.ones(3)}, opt, jax.random.key(0))
    new, m = jax.jit(gf.train.make_train_step(_scaled_lsq, opt))(state, jnp.full((4, 3), jnp.nan))
    assert not bool(m["finite"])
    np.testing.assert_array_equal(jax.random.key_data(new.rng), jax.random.key_data(state.rng))
    assert int(new.step) == 0


def test_grad_accumulation_keeps_the_dtypes_of_a_bfloat16_loss_and_state():
    """grad_accum=k averages in float32 but hands back the loss's and gradients' own dtypes: a
    bfloat16 model's Adam state stays bfloat16 (a float32 mean changed the scan carry's type)."""
    def loss(p, batch, key):
        return jnp.mean((p["w"].astype(jnp.float32) * batch - 1.0) ** 2).astype(jnp.bfloat16), {}

    opt = optax.adam(1e-2)
    state = gf.train.init_state({"w": jnp.ones(3, jnp.bfloat16)}, opt, jax.random.key(0))
    step = gf.train.make_train_step(loss, opt, grad_accum=2)
    new, m = jax.jit(step)(state, jnp.ones((4, 3)))
    assert m["loss"].dtype == jnp.bfloat16
    assert [x.dtype for x in jax.tree.leaves(new.opt_state)] == [x.dtype for x in jax.tree.leaves(state.opt_state)]
    state, hist = gf.train.fit(state, step, lambda key: jnp.ones((4, 3)), 4, chunk_size=2, progress=False)
    assert int(state.step) == 4 and hist["loss"].shape == (4,)


def test_init_state_refuses_an_ema_decay_of_zero():
    """ema_decays must lie in the open interval (0, 1)."""
    with pytest.raises(ValueError, match="ema_decays"):
        gf.train.init_state({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.key(0), ema_decays=(0.0,))


def test_the_step_counter_is_int32():
    """TrainState.step: an int32 scalar (a float32 counter stops counting at 2**24 steps)."""
    opt = optax.sgd(0.1)
    state = gf.train.init_state({"w": jnp.zeros(3)}, opt, jax.random.key(0))
    assert state.step.dtype == jnp.int32 and state.step.shape == ()
    new, _ = jax.jit(gf.train.make_train_step(_scaled_lsq, opt))(state, jnp.ones((4, 3)))
    assert new.step.dtype == jnp.int32 and int(new.step) == 1


def test_fit_reads_exactly_num_steps_host_batches_with_a_shorter_last_chunk():
    """'never past num_steps batches': 5 steps at chunk_size=2 read 5 batches (an iterator of
    exactly 5 suffices, and a longer one is left at its 6th)."""
    opt = optax.sgd(0.1)
    step = gf.train.make_train_step(_scaled_lsq, opt)
    state = gf.train.init_state({"w": jnp.zeros(3)}, opt, jax.random.key(0))
    state, hist = gf.train.fit(state, step, iter([np.ones((4, 3), np.float32)] * 5), 5, chunk_size=2, progress=False)
    assert int(state.step) == 5 and hist["loss"].shape == (5,)
    it = iter([np.full((4, 3), i, np.float32) for i in range(8)])
    state = gf.train.init_state({"w": jnp.zeros(3)}, opt, jax.random.key(0))
    gf.train.fit(state, step, it, 5, chunk_size=2, progress=False)
    assert float(next(it)[0, 0]) == 5.0


def _scaled_lsq(p, batch, key):
    return jnp.mean((p["w"] * batch - 1.0) ** 2), {}


def _apply_recording(seen):
    def apply_fn(params, x, t, y=None):
        seen.append(None if y is None else np.asarray(y))
        return jnp.zeros_like(x)
    return apply_fn


def test_diffusion_objective_accepts_label_dropout_one_and_drops_with_the_first_split_key():
    """label_dropout must lie in [0, 1] (its error says so): 1.0, an always-unconditional run, is
    accepted and replaces every label by null_label; and labels are dropped with k_drop, the first
    half of jax.random.split(key) (the docstring's key contract)."""
    seen = []
    path = gf.paths.linear()
    x0, y = jnp.ones((64, 2)), jnp.arange(64) % 3
    loss_fn = gf.train.diffusion_objective(_apply_recording(seen), path, prediction="velocity", label_dropout=1.0,
                                           null_label=3)
    loss_fn({}, {"x": x0, "y": y}, jax.random.key(0))
    assert np.all(seen[-1] == 3)
    loss_fn = gf.train.diffusion_objective(_apply_recording(seen), path, prediction="velocity", label_dropout=0.5,
                                           null_label=3)
    key = jax.random.key(7)
    loss_fn({}, {"x": x0, "y": y}, key)
    want = gf.losses.drop_labels(jax.random.split(key)[0], y, 0.5, 3)
    np.testing.assert_array_equal(seen[-1], np.asarray(want))


def test_diffusion_objective_default_prediction_is_eps():
    """diffusion_objective's signature default is prediction="eps": the default objective is the eps
    loss (not the velocity loss of flow matching)."""
    m = gf.nets.MLP(hidden=(8,))
    p = m.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
    x0 = jax.random.normal(jax.random.key(1), (32, 2))
    path = gf.paths.linear()
    key = jax.random.key(4)
    got, _ = gf.train.diffusion_objective(m.apply, path)(p, x0, key)
    want, _ = gf.losses.diffusion_loss(lambda x, t: m.apply(p, x, t), path, x0, jax.random.split(key)[1],
                                       prediction="eps")
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_make_optimizer_default_learning_rate_is_1e_3():
    """``learning_rate`` defaults to 1e-3 for every name (make_optimizer's docstring): sgd's first
    update of a gradient g is -1e-3 g."""
    tx = gf.train.make_optimizer(name="sgd")
    p = {"w": jnp.zeros(2)}
    u, _ = tx.update({"w": jnp.array([1.0, -2.0])}, tx.init(p), p)
    np.testing.assert_allclose(u["w"], [-1e-3, 2e-3], rtol=1e-6)


def test_prodigy_with_a_one_step_warmup_stays_finite():
    """make_optimizer gives prodigy safeguard_warmup=True for any warm-up, a one-step one included
    (its step-0 rate is 0 too, which optax's Prodigy divides by otherwise: NaN updates)."""
    tx = gf.train.make_optimizer(1.0, name="prodigy", warmup_steps=1)
    p = {"w": jnp.ones(3)}
    s = tx.init(p)
    for _ in range(3):
        u, s = tx.update({"w": jnp.array([1.0, -2.0, 0.5])}, s, p)
        assert np.all(np.isfinite(np.asarray(u["w"])))
        p = jax.tree.map(lambda a, b: a + b, p, u)
