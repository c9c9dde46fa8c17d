"""Toy 2-D distributions: pure ``f(key, n) -> [n, 2]`` float32 samplers, usable inside ``jit`` and
``lax.scan`` (the training loop samples them on device)."""

from __future__ import annotations

import inspect
from typing import Callable

import jax
import jax.numpy as jnp

from genflow._checks import check_int, check_key

Array = jax.Array

__all__ = ["TOY", "toy", "toy_sampler",
           "moons", "eight_gaussians", "checkerboard", "swiss_roll", "spirals", "pinwheel", "circles"]


def _check_args(key, n) -> int:
    """``n`` as an int >= 0, and ``key`` checked (key=0 failed as JAX's "invalid PRNG key data",
    naming no argument)."""
    n = check_int("n", n, 0)
    check_key(key)
    return n


def moons(key: Array, n: int, noise: float = 0.05, scale: float = 2.0) -> Array:
    """Two interleaving half circles (scikit-learn's ``make_moons``), centred and scaled.

    As in scikit-learn, ``n // 2`` points lie on the upper moon and the rest on the lower one
    (equal halves, so that metrics between two draws do not count binomial mass imbalance). Which
    rows are upper is random without a sort: rows ``2i`` and ``2i + 1`` hold one point of each
    moon, the upper one first or second by a fair coin per pair (for odd ``n`` the last row is on
    the lower moon). So every row (but that last one) is upper with probability 1/2 and every
    even-length prefix ``x[:2m]`` (or block starting at an even row) holds exactly ``m`` points of
    each moon; the rows are not exchangeable, though (a pair is never on the same moon). The
    unordered point set has the same distribution as with a random permutation, which needs a sort
    and cost ~5% of a 2-D training step on XLA:CPU. The raw moons span x in [-1, 2], y in
    [-0.5, 1]; they are shifted by (-0.5, -0.25) and multiplied by ``scale``. Gaussian noise of
    std ``noise`` is added before scaling.

    Returns: ``[n, 2]`` float32.
    """
    n = _check_args(key, n)
    k1, k2, k3 = jax.random.split(key, 3)
    upper = _paired_halves(k1, n)
    theta = jax.random.uniform(k2, (n,), minval=0.0, maxval=jnp.pi)
    x = jnp.where(upper, jnp.cos(theta), 1.0 - jnp.cos(theta))
    y = jnp.where(upper, jnp.sin(theta), 0.5 - jnp.sin(theta))
    pts = jnp.stack([x, y], -1) + noise * jax.random.normal(k3, (n, 2))
    return (scale * (pts - jnp.array([0.5, 0.25]))).astype(jnp.float32)


def _paired_halves(key: Array, n: int) -> Array:
    """``[n]`` bools, exactly ``n // 2`` True: rows ``2i`` and ``2i + 1`` hold one True and one
    False, in an order drawn by a fair coin per pair (for odd ``n`` the last row is False); see
    :func:`moons`."""
    coin = jax.random.bernoulli(key, 0.5, (n // 2,))
    return jnp.concatenate([jnp.stack([coin, ~coin], axis=1).reshape(-1), jnp.zeros((n % 2,), bool)])


def eight_gaussians(key: Array, n: int, radius: float = 2.0, std: float = 0.2) -> Array:
    """Eight Gaussians of std ``std`` on a circle of radius ``radius``."""
    n = _check_args(key, n)
    k1, k2 = jax.random.split(key)
    idx = jax.random.randint(k1, (n,), 0, 8)
    ang = 2 * jnp.pi * idx / 8
    centres = radius * jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1)
    return (centres + std * jax.random.normal(k2, (n, 2))).astype(jnp.float32)


def checkerboard(key: Array, n: int, size: float = 4.0) -> Array:
    """Uniform on the dark squares of a 4x4 checkerboard covering ``[-size/2, size/2]^2``."""
    n = _check_args(key, n)
    k1, k2, k3 = jax.random.split(key, 3)
    x1 = jax.random.uniform(k1, (n,), minval=-2.0, maxval=2.0)
    x2 = jax.random.uniform(k2, (n,), minval=0.0, maxval=1.0) - 2.0 * jax.random.randint(k3, (n,), 0, 2)
    x2 = x2 + jnp.floor(x1) % 2
    return (jnp.stack([x1, x2], -1) * (size / 4.0)).astype(jnp.float32)


def swiss_roll(key: Array, n: int, noise: float = 0.25) -> Array:
    """2-D swiss roll (scikit-learn's ``make_swiss_roll`` projected on (x, z)), scaled by 1/5."""
    n = _check_args(key, n)
    k1, k2 = jax.random.split(key)
    t = 1.5 * jnp.pi * (1.0 + 2.0 * jax.random.uniform(k1, (n,)))
    pts = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], -1) + noise * jax.random.normal(k2, (n, 2))
    return (pts / 5.0).astype(jnp.float32)


def spirals(key: Array, n: int, noise: float = 0.1) -> Array:
    """Two interleaved spirals (FFJORD's ``2spirals`` without its uniform ``[0, 0.5)`` offset of
    each arm), scaled to about [-3.5, 3.5]. ``n // 2`` points on one arm, the rest on the other,
    paired by rows as in :func:`moons` (a coin per point gave the arms binomially unequal mass)."""
    n = _check_args(key, n)
    k1, k2, k3 = jax.random.split(key, 3)
    r = jnp.sqrt(jax.random.uniform(k1, (n,))) * 540.0 * (2 * jnp.pi) / 360.0
    sign = jnp.where(_paired_halves(k2, n), 1.0, -1.0)
    pts = sign[:, None] * jnp.stack([-jnp.cos(r) * r, jnp.sin(r) * r], -1)
    pts = pts + noise * 3.0 * jax.random.normal(k3, (n, 2))
    return (pts / 3.0).astype(jnp.float32)


def pinwheel(key: Array, n: int, num_arms: int = 5, radial_std: float = 0.3, tangential_std: float = 0.1,
             rate: float = 0.25) -> Array:
    """Pinwheel of ``num_arms`` curved arms (Johnson et al. 2016; as in FFJORD)."""
    n = _check_args(key, n)
    if not isinstance(num_arms, jax.core.Tracer):  # 0 gave NaN samples, < 0 nonsense
        num_arms = check_int("num_arms", num_arms)
    k1, k2 = jax.random.split(key)
    arm = jax.random.randint(k1, (n,), 0, num_arms)
    feats = jax.random.normal(k2, (n, 2)) * jnp.array([radial_std, tangential_std])
    feats = feats + jnp.array([1.0, 0.0])
    ang = 2 * jnp.pi * arm / num_arms + rate * jnp.exp(feats[:, 0])
    c, s = jnp.cos(ang), jnp.sin(ang)
    # FFJORD's einsum("ti,tij->tj", feats, [[c, -s], [s, c]]): the row vector times R, i.e. a
    # rotation by -ang (the arms curl clockwise outwards)
    out = jnp.stack([c * feats[:, 0] + s * feats[:, 1], -s * feats[:, 0] + c * feats[:, 1]], -1)
    return (2.0 * out).astype(jnp.float32)


def circles(key: Array, n: int, noise: float = 0.05, factor: float = 0.5, scale: float = 2.0) -> Array:
    """Two concentric circles (scikit-learn's ``make_circles``), scaled. As in scikit-learn,
    ``n // 2`` points lie on the outer circle and the rest on the inner one (paired by rows as in
    :func:`moons`; a coin per point gave 514 / 487 of 1,001)."""
    n = _check_args(key, n)
    k1, k2, k3 = jax.random.split(key, 3)
    inner = ~_paired_halves(k1, n)
    theta = jax.random.uniform(k2, (n,), maxval=2 * jnp.pi)
    r = jnp.where(inner, factor, 1.0)
    pts = r[:, None] * jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1) + noise * jax.random.normal(k3, (n, 2))
    return (scale * pts).astype(jnp.float32)


TOY: dict[str, Callable[..., Array]] = {
    "moons": moons,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "swissroll": swiss_roll,
    "spirals": spirals,
    "pinwheel": pinwheel,
    "circles": circles,
}


def toy_sampler(name: str, **kwargs) -> Callable[[Array, int], Array]:
    """The jittable sampler ``f(key, n) -> [n, 2]`` for a toy distribution name in :data:`TOY`."""
    if name not in TOY:
        raise ValueError(f"unknown toy dataset {name!r}; expected one of {sorted(TOY)}")
    f = TOY[name]
    if not kwargs:
        return f
    try:  # (an unknown option failed only at the first call, possibly inside a jitted training loop)
        inspect.signature(f).bind(None, 0, **kwargs)
    except TypeError as e:
        raise TypeError(f"toy dataset {name!r}: {e}") from None
    return lambda key, n: f(key, n, **kwargs)


def toy(name: str, key: Array, n: int, **kwargs) -> Array:
    """``n`` samples ``[n, 2]`` of the toy distribution ``name``."""
    return toy_sampler(name, **kwargs)(key, n)
