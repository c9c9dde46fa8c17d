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
    with pytest.raises(gf.train.NonFiniteLossError, match="at step 13") as exc:
        gf.train.fit(state, guarded, full_batch, 40, chunk_size=10, progress=False)
    err = exc.value
    assert err.step == 13 and int(err.state.step) == 13
    assert np.all(np.isfinite(np.asarray(err.state.params["w"])))
    assert err.history["loss"].shape == (13,)
    # the last good state equals a clean run of 13 steps
    clean = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    clean, _ = gf.train.fit(clean, step, full_batch, 13, chunk_size=13, progress=False)
    np.testing.assert_allclose(err.state.params["w"], clean.params["w"], rtol=1e-6)


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
    np.testing.assert_allclose(state.params["w"], W_STAR, atol=0.1)


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


def test_bad_arguments():
    opt = optax.sgd(0.1)
    state = gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0))
    step = gf.train.make_train_step(lsq_loss, opt)
    with pytest.raises(ValueError, match="num_steps must be"):
        gf.train.fit(state, step, full_batch, -1, progress=False)
    with pytest.raises(ValueError, match="chunk_size must be"):
        gf.train.fit(state, step, full_batch, 10, chunk_size=0, progress=False)
    with pytest.raises(ValueError, match=r"ema_decays must lie in \(0, 1\)"):
        gf.train.init_state({"w": jnp.zeros(4)}, opt, jax.random.key(0), ema_decays=(1.5,))
