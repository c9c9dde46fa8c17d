"""Flax linen networks used through the pure model signature ``fn(x, t) -> prediction``.

A network never knows which path or prediction kind it is trained with; it maps
``(x: [B, ...], t: [B], y: [B] labels or None)`` to an output shaped like ``x``.
Bind parameters and conditioning with :func:`model_fn`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["sinusoidal_embedding", "TimeEmbedding", "MLP", "model_fn", "ACTIVATIONS"]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": nn.silu,
    "gelu": nn.gelu,
    "relu": nn.relu,
    "selu": nn.selu,
    "tanh": jnp.tanh,
    "softplus": nn.softplus,
}


def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10_000.0, scale: float = 1000.0) -> Array:
    """Transformer-style sinusoidal features of ``scale * t``.

    Args:
      t: ``[B]`` times in [0, 1].
      dim: even number of features.
    Returns:
      ``[B, dim]``: ``[cos(scale t w_k), sin(scale t w_k)]`` with ``w_k = max_period^(-k/half)``.
    """
    if dim % 2:
        raise ValueError(f"dim must be even for a sinusoidal embedding, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (scale * t.astype(jnp.float32))[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeEmbedding(nn.Module):
    """Embeds ``t: [B]`` into ``[B, dim]``.

    ``kind``: ``"sinusoidal"`` (fixed frequencies), ``"fourier"`` (random Gaussian frequencies
    of standard deviation ``fourier_scale``, fixed after init; Tancik et al. 2020 / Song et al.
    2021), or ``"identity"`` (``t`` itself, ``dim`` ignored).
    """

    dim: int = 64
    kind: str = "sinusoidal"
    fourier_scale: float = 16.0

    @nn.compact
    def __call__(self, t: Array) -> Array:
        if self.kind == "sinusoidal":
            return sinusoidal_embedding(t, self.dim)
        if self.kind == "fourier":
            w = self.param("freqs", nn.initializers.normal(self.fourier_scale), (self.dim // 2,))
            args = 2 * jnp.pi * t[:, None] * jax.lax.stop_gradient(w)[None]
            return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        if self.kind == "identity":
            return t[:, None]
        raise ValueError(f"unknown time embedding kind {self.kind!r}; expected 'sinusoidal', 'fourier' or 'identity'")


class MLP(nn.Module):
    """Fully connected network for vector data, conditioned on time (and optional labels).

    ``h = concat(x, emb(t) [, label_emb(y)])``, then ``len(hidden)`` Dense+activation layers and
    a Dense output with ``x.shape[-1]`` features (or ``out_dim``).

    Attributes:
      hidden: widths of the hidden layers, e.g. ``(256, 256, 256)``.
      activation: a name in :data:`ACTIVATIONS`.
      time_embedding: ``"sinusoidal"``, ``"fourier"`` or ``"identity"``.
      time_dim: size of the time embedding.
      num_classes: if set, labels ``y: [B]`` in ``[0, num_classes]`` are embedded; the extra
        index ``num_classes`` is the "no label" token used for classifier-free guidance.
      out_dim: output features (default: same as the input).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    """

    hidden: Sequence[int] = (256, 256, 256)
    activation: str = "silu"
    time_embedding: str = "sinusoidal"
    time_dim: int = 64
    num_classes: int | None = None
    class_dim: int = 64
    out_dim: int | None = None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None) -> Array:
        if x.ndim != 2:
            raise ValueError(f"MLP expects x of shape [B, D]; got x.shape={x.shape}")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        act = ACTIVATIONS[self.activation]
        feats = [x, TimeEmbedding(self.time_dim, self.time_embedding)(t).astype(x.dtype)]
        if self.num_classes is not None:
            if y is None:
                y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
            feats.append(nn.Embed(self.num_classes + 1, self.class_dim)(y).astype(x.dtype))
        elif y is not None:
            raise ValueError("labels y were given but the MLP was built with num_classes=None")
        h = jnp.concatenate(feats, axis=-1)
        for width in self.hidden:
            h = act(nn.Dense(width, dtype=self.dtype)(h))
        out = nn.Dense(self.out_dim or x.shape[-1], dtype=self.dtype)(h)
        return out.astype(x.dtype)


def model_fn(module: nn.Module, params, **cond) -> Callable[[Array, Array], Array]:
    """Bind parameters (and conditioning such as ``y=labels``) into a pure ``fn(x, t)``.

    Returns a :class:`jax.tree_util.Partial`, so the parameters stay traced when the function
    is passed to a jitted sampler: new parameters do not trigger a recompilation.
    """
    return jax.tree_util.Partial(module.apply, params, **cond)
