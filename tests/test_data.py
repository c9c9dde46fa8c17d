import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf


@pytest.mark.parametrize("name", sorted(gf.data.TOY))
def test_toy_samplers_are_jittable_and_deterministic(name):
    f = jax.jit(gf.data.toy_sampler(name), static_argnums=1)
    a, b = f(jax.random.key(0), 1000), f(jax.random.key(0), 1000)
    assert a.shape == (1000, 2) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(np.asarray(a)))
    assert not np.allclose(a, f(jax.random.key(1), 1000))
    assert 0.3 < float(a.std()) < 5.0


def test_moons_match_scikit_learn():
    from sklearn.datasets import make_moons

    ref, _ = make_moons(4000, noise=0.05, random_state=0)
    ref = 2.0 * (ref - np.array([0.5, 0.25]))
    ours = np.asarray(gf.data.moons(jax.random.key(0), 4000))
    w_ours = gf.metrics.w2_exact(ours, ref)
    ref2, _ = make_moons(4000, noise=0.05, random_state=1)
    w_floor = gf.metrics.w2_exact(2.0 * (ref2 - np.array([0.5, 0.25])), ref)
    assert w_ours < 1.5 * w_floor + 0.02, (w_ours, w_floor)
    np.testing.assert_allclose(ours.mean(0), 0.0, atol=0.05)


def test_digits():
    xtr, ytr = gf.data.load_digits("train")
    xte, yte = gf.data.load_digits("test")
    assert xtr.shape[1:] == (8, 8, 1) and xtr.dtype == np.float32
    assert len(xtr) + len(xte) == 1797
    assert xtr.min() == -1.0 and xtr.max() == 1.0
    assert set(np.unique(yte)) == set(range(10))
    # the split is disjoint: no test image appears in train
    tr = {r.tobytes() for r in xtr.reshape(len(xtr), -1)}
    assert sum(r.tobytes() in tr for r in xte.reshape(len(xte), -1)) < 5  # a few digits are exact duplicates
    flat, _ = gf.data.load_digits("all", channels_last=False)
    assert flat.shape == (1797, 64)
    with pytest.raises(ValueError, match="split must be"):
        gf.data.load_digits("val")


def test_unknown_toy():
    with pytest.raises(ValueError, match="unknown toy dataset 'rings'"):
        gf.data.toy("rings", jax.random.key(0), 10)
