import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf


def test_mlp_shapes_and_time_dependence():
    for emb in ("sinusoidal", "fourier", "identity"):
        m = gf.nets.MLP(hidden=(32, 32), time_embedding=emb)
        x = jax.random.normal(jax.random.key(0), (5, 3))
        p = m.init(jax.random.key(1), x, jnp.zeros((5,)))
        out0 = m.apply(p, x, jnp.zeros((5,)))
        out1 = m.apply(p, x, jnp.full((5,), 0.7))
        assert out0.shape == (5, 3)
        assert not np.allclose(out0, out1), emb
        # per-example: row i depends only on x_i, t_i
        out_perm = m.apply(p, x[::-1], jnp.zeros((5,)))
        np.testing.assert_allclose(out_perm, out0[::-1], rtol=1e-5, atol=1e-6)


def test_fourier_frequencies_receive_no_gradient():
    m = gf.nets.MLP(hidden=(8,), time_embedding="fourier")
    x = jnp.ones((2, 2)); t = jnp.array([0.1, 0.9])
    p = m.init(jax.random.key(0), x, t)
    g = jax.grad(lambda p: jnp.sum(m.apply(p, x, t) ** 2))(p)
    assert float(jnp.abs(g["params"]["TimeEmbedding_0"]["freqs"]).max()) == 0.0


def test_labels_and_null_label():
    m = gf.nets.MLP(hidden=(16,), num_classes=3)
    x = jnp.ones((4, 2)); t = jnp.full((4,), 0.5)
    p = m.init(jax.random.key(0), x, t, jnp.zeros((4,), jnp.int32))
    a = m.apply(p, x, t, jnp.array([0, 1, 2, 3]))
    assert len({tuple(np.round(np.asarray(r), 6)) for r in a}) == 4  # each label (3 = null) differs
    np.testing.assert_allclose(m.apply(p, x, t), m.apply(p, x, t, jnp.full((4,), 3)))  # no label = null label
    fn = gf.nets.model_fn(m, p, y=jnp.array([1, 1, 1, 1]))
    np.testing.assert_allclose(fn(x, t), m.apply(p, x, t, jnp.ones((4,), jnp.int32)))
    assert isinstance(fn, jax.tree_util.Partial)


def test_sinusoidal_embedding_values():
    e = gf.nets.sinusoidal_embedding(jnp.array([0.0, 0.5]), 8, scale=1.0)
    assert e.shape == (2, 8)
    np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(e[1, 0], np.cos(0.5), rtol=1e-6)


def test_bfloat16_compute():
    m = gf.nets.MLP(hidden=(16,), dtype=jnp.bfloat16)
    x = jnp.ones((2, 2), jnp.bfloat16)
    p = m.init(jax.random.key(0), x, jnp.zeros((2,)))
    assert jax.tree.leaves(p)[0].dtype == jnp.float32
    assert m.apply(p, x, jnp.zeros((2,))).dtype == jnp.bfloat16


def test_bad_inputs():
    m = gf.nets.MLP(hidden=(4,))
    with pytest.raises(ValueError, match=r"MLP expects x of shape \[B, D\]"):
        m.init(jax.random.key(0), jnp.ones((2, 2, 2)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="num_classes=None"):
        m.init(jax.random.key(0), jnp.ones((2, 2)), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="unknown activation"):
        gf.nets.MLP(activation="swishy").init(jax.random.key(0), jnp.ones((2, 2)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match="unknown time embedding"):
        gf.nets.MLP(time_embedding="learned").init(jax.random.key(0), jnp.ones((2, 2)), jnp.zeros((2,)))
