"""Divergence (Jacobian trace) of a batched vector field, exact or estimated.

For ``f: [B, ...] -> [B, ...]`` acting on each batch element independently (no batch
statistics), the per-sample divergence ``div f(x_b) = tr(d f(x_b) / d x_b)`` is

* **exact**: the sum of the D diagonal entries, one forward-mode Jacobian column per basis
  vector ``e_i`` (the same ``e_i`` for every batch element, so column i of every sample's
  Jacobian comes from one batched JVP). ``jax.linearize`` evaluates ``f`` once; the columns
  are then pushed through the linearized map, ``chunk_size`` of them at a time
  (``jax.lax.map(..., batch_size=chunk_size)``: peak memory ``chunk_size * B * D``).
* **Hutchinson / Skilling**: ``tr(J) = E_z[z^T J z]`` for probes with ``E[z z^T] = I``
  (Rademacher, or Gaussian), averaged over ``K`` probes (Hutchinson 1989; Skilling 1989;
  used for CNFs by Grathwohl et al. 2019, FFJORD). The variance of one probe is
  ``2 sum_{i != j} J_ij^2`` (Rademacher; symmetric part) or ``2 ||sym(J)||_F^2`` (Gaussian),
  so Rademacher probes are exact for a diagonal Jacobian.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from genflow._checks import check_int

Array = jax.Array

__all__ = ["PROBES", "exact_divergence", "hutchinson_divergence", "sample_probes", "auto_chunk"]

PROBES = ("rademacher", "gaussian")


def auto_chunk(batch: int, dim: int, budget: int = 1 << 24) -> int:
    """Number of Jacobian columns per chunk so that ``chunk * batch * dim <= budget`` floats."""
    return int(max(1, min(dim, budget // max(1, batch * dim))))


def exact_divergence(f: Callable[[Array], Array], x: Array, chunk_size: int | None = None) -> tuple[Array, Array]:
    """``(f(x), div f(x))`` with the exact trace of the per-sample Jacobian.

    Args:
      f: ``[B, ...] -> [B, ...]``, acting on each sample independently.
      x: ``[B, ...]``.
      chunk_size: Jacobian columns evaluated per batched JVP (default: as many as fit in
        2**24 floats). ``D`` columns are needed in total, ``D = prod(x.shape[1:])``.
    Returns:
      ``f(x): [B, ...]`` and ``div: [B]``.
    """
    b = x.shape[0]
    d = math.prod(x.shape[1:])
    chunk = auto_chunk(b, d) if chunk_size is None else check_int("chunk_size", chunk_size)  # (1.5 became 1)
    fx, f_lin = jax.linearize(f, x)

    def diag_entry(i):
        e = jnp.zeros((d,), x.dtype).at[i].set(1.0).reshape(x.shape[1:])
        col = f_lin(jnp.broadcast_to(e, x.shape)).reshape(b, d)
        return col[:, i]

    idx = jnp.arange(d)
    if chunk >= d:
        diag = jax.vmap(diag_entry)(idx)
    else:
        diag = jax.lax.map(diag_entry, idx, batch_size=chunk)
    return fx, jnp.sum(diag, axis=0)


def sample_probes(key: Array, shape: tuple[int, ...], dtype, kind: str = "rademacher") -> Array:
    """Probe vectors with ``E[z z^T] = I``: ``"rademacher"`` (+-1) or ``"gaussian"`` (N(0, I))."""
    if kind == "rademacher":
        return jax.random.rademacher(key, shape, dtype=dtype)
    if kind == "gaussian":
        return jax.random.normal(key, shape, dtype)
    raise ValueError(f"unknown probe {kind!r}; expected one of {list(PROBES)}")


def hutchinson_divergence(f: Callable[[Array], Array], x: Array, probes: Array) -> tuple[Array, Array]:
    """``(f(x), mean_k z_k^T J z_k)``: the Hutchinson estimate with the given probes.

    Args:
      f: ``[B, ...] -> [B, ...]``.
      x: ``[B, ...]``.
      probes: ``[K, B, ...]`` probe vectors (:func:`sample_probes`); one JVP per probe.
    Returns:
      ``f(x): [B, ...]`` and the estimate ``[B]``.
    """
    if probes.shape[1:] != x.shape:
        raise ValueError(f"probes must have shape [K, *x.shape] = [K, {', '.join(map(str, x.shape))}]; "
                         f"got {probes.shape}")
    fx, f_lin = jax.linearize(f, x)
    jz = jax.vmap(f_lin)(probes)
    axes = tuple(range(2, probes.ndim))
    return fx, jnp.mean(jnp.sum(probes * jz, axis=axes), axis=0)
