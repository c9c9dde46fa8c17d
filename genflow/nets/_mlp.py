"""A time-conditioned MLP for vector data."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genflow.nets._common import ACTIVATIONS, TimeEmbedding, batch_times, label_embedding

Array = jax.Array


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
        t = batch_times(t, x)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        act = ACTIVATIONS[self.activation]
        feats = [x, TimeEmbedding(self.time_dim, self.time_embedding)(t).astype(x.dtype)]
        emb = label_embedding(y, self.num_classes, self.class_dim, x.shape[0], name="Embed_0")
        if emb is not None:
            feats.append(emb.astype(x.dtype))
        h = jnp.concatenate(feats, axis=-1)
        for width in self.hidden:
            h = act(nn.Dense(width, dtype=self.dtype)(h))
        out = nn.Dense(self.out_dim or x.shape[-1], dtype=self.dtype)(h)
        return out.astype(x.dtype)
