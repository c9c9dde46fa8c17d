"""The products genflow treats as exact ask for full float32 precision on every backend.

XLA's default float32 matmul is TF32 on NVIDIA Ampere / Hopper GPUs and bfloat16 passes on TPUs
(see genflow/_precision.py for what that did, measured by emulation). A CPU computes every float32
product in full, so the tests check what the traced programs request: every ``dot_general`` of
these functions carries ``precision=HIGHEST``."""

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jex

import genflow as gf
from genflow import inverse as inv
from genflow.flows._layers import Invertible1x1Conv


def _products(fn, *args):
    """The ``precision`` parameter of every dot_general / convolution in ``fn``'s program."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.append(eqn.params["precision"])
        for sub in jex.subjaxprs(jaxpr):
            walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def _assert_full_precision(fn, *args):
    found = _products(fn, *args)
    assert found and all(p == HIGHEST for p in found), found


def test_the_gaussian_oracle_is_exact_at_full_precision():
    g = gf.oracles.Gaussian.full(jnp.arange(4.0), jnp.eye(4) + 0.5)
    path, x = gf.paths.linear(), jnp.ones((3, 4))
    for fn in (lambda x: g.x0(x, 0.3, path), lambda x: g.score(x, 0.3, path), lambda x: g.log_prob(x, 0.3, path),
               lambda x: g.flow_map(x, 0.9, 0.1, path), lambda x: g.cov + x[0, 0],
               lambda x: g.sample(jax.random.key(0), 3) + x, lambda x: g.prior_sample(jax.random.key(0), 3, path) + x):
        _assert_full_precision(fn, x)


def test_exact_operators_and_invertible_convolutions_are_full_precision():
    op = inv.compressed_sensing(jax.random.key(0), (4, 4, 1), 6)
    x, y = jnp.ones((2, 4, 4, 1)), jnp.ones((2, 6))
    for fn, arg in ((op.forward, x), (op.adjoint, y), (op.pinv, y), (lambda x: op.project(x, y), x)):
        _assert_full_precision(fn, arg)
    h = jnp.ones((2, 4, 4, 8))
    for lu in (True, False):
        layer = Invertible1x1Conv(lu=lu)
        p = layer.init(jax.random.key(1), h)
        for fn in (lambda h: layer.forward(p, h), lambda h: layer.inverse(p, h)):
            _assert_full_precision(fn, h)


@pytest.mark.parametrize("metric", ["mmd", "w2_sinkhorn"])
def test_gram_form_distances_are_full_precision(metric):
    x = jax.random.normal(jax.random.key(0), (16, 3))
    _assert_full_precision(lambda x: getattr(gf.metrics, metric)(x, x + 0.01), x)


def test_wide_keeps_float64_and_widens_half_precision():
    """genflow._precision.wide: "float32 or wider (float64 stays)" -- a float64 sum under x64 must
    not be rounded to float32 (1e8 + 1 is 1e8 in float32)."""
    from genflow._precision import wide

    with jax.enable_x64(True):
        assert wide(jnp.ones(2, jnp.float64)).dtype == jnp.float64
        assert wide(jnp.ones(2, jnp.bfloat16)).dtype == jnp.float32
        assert float(jnp.sum(wide(jnp.asarray([1e8, 1.0], jnp.float64)))) == 100000001.0
