"""Shared fixtures. Tests run on CPU; each module compiles its functions once."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import genflow as gf  # noqa: E402

ALL_PATHS = {name: gf.paths.get(name) for name in gf.paths.names()}


@pytest.fixture(params=sorted(ALL_PATHS))
def path(request):
    return ALL_PATHS[request.param]


@pytest.fixture(scope="session")
def gauss2():
    """A 2-D Gaussian with non-diagonal covariance."""
    return gf.oracles.Gaussian.full(jnp.array([0.7, -1.2]), jnp.array([[0.8, 0.3], [0.3, 0.5]]))
