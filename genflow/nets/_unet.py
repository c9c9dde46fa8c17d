"""A DDPM++ / NCSN++-style U-Net (Ho et al. 2020; Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", appendix H).

Residual blocks with GroupNorm and SiLU, the time (and label) embedding added inside every block,
self-attention at chosen resolutions, skip connections between the down and up paths
(concatenated), residual sums scaled by ``1/sqrt(2)``, and zero-initialised output layers
(score_sde's ``init_scale=0``), so that every residual branch starts as the identity.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genflow._checks import check_int, is_int
from genflow.nets._common import TimeEmbedding, batch_times, label_embedding

Array = jax.Array

# DDPM's default initialiser: variance scaling 1 with fan_avg, uniform.
_default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_zeros = nn.initializers.zeros


def _groups(channels: int, max_groups: int = 32) -> int:
    """``min(max_groups, channels // 4)`` groups (score_sde), reduced until it divides ``channels``."""
    g = max(1, min(max_groups, channels // 4))
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """``out = (skip(x) + h) / sqrt(2)`` with
    ``h = conv(drop(act(GN(conv(act(GN(x))) + Dense(act(temb))))))`` (the last conv zero-initialised)."""

    out_ch: int
    dropout: float = 0.0
    skip_rescale: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: Array, temb: Array, train: bool = False) -> Array:
        h = nn.silu(nn.GroupNorm(_groups(x.shape[-1]), dtype=self.dtype)(x))
        h = nn.Conv(self.out_ch, (3, 3), kernel_init=_default_init, dtype=self.dtype)(h)
        h = h + nn.Dense(self.out_ch, kernel_init=_default_init, dtype=self.dtype)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(_groups(self.out_ch), dtype=self.dtype)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.out_ch, (3, 3), kernel_init=_zeros, dtype=self.dtype)(h)
        if x.shape[-1] != self.out_ch:
            x = nn.Conv(self.out_ch, (1, 1), kernel_init=_default_init, dtype=self.dtype, name="skip")(x)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


class AttnBlock(nn.Module):
    """Multi-head self-attention over the ``H*W`` positions, ``out = (x + proj(attn(GN(x)))) / sqrt(2)``."""

    num_heads: int = 1
    skip_rescale: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hh, ww, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"attention at {hh}x{ww}: {c} channels are not divisible by num_heads={self.num_heads}")
        h = nn.GroupNorm(_groups(c), dtype=self.dtype)(x).reshape(b, hh * ww, c)
        qkv = nn.DenseGeneral((3, self.num_heads, c // self.num_heads), kernel_init=_default_init, dtype=self.dtype,
                              name="qkv")(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        h = jax.nn.dot_product_attention(q, k, v)  # [B, HW, heads, c/heads]
        h = nn.DenseGeneral(c, axis=(-2, -1), kernel_init=_zeros, dtype=self.dtype, name="proj")(h)
        out = x + h.reshape(b, hh, ww, c)
        return out / math.sqrt(2.0) if self.skip_rescale else out


class UNet(nn.Module):
    """DDPM++-style U-Net for images ``x: [B, H, W, C]``, ``t: [B]`` (and labels ``y: [B]``).

    Attributes:
      ch: base channel count; level ``i`` has ``ch * ch_mult[i]`` channels.
      ch_mult: channel multipliers, one per resolution level (``H`` is halved between levels,
        so ``H`` and ``W`` must be divisible by ``2 ** (len(ch_mult) - 1)``).
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: spatial sizes (``H`` of the feature map) at which self-attention is
        applied after each residual block; the middle block always has one attention layer.
      num_heads: attention heads.
      dropout: dropout rate inside residual blocks (active with ``train=True`` and a
        ``"dropout"`` rng).
      num_classes: if set, labels ``y`` in ``[0, num_classes]`` are embedded and added to the
        time embedding; ``num_classes`` itself (or ``y=None``) is the "no label" token used for
        classifier-free guidance.
      time_embedding: ``"sinusoidal"`` (DDPM) or ``"fourier"`` (NCSN++), see :class:`TimeEmbedding`.
      skip_rescale: scale residual sums by ``1/sqrt(2)`` (DDPM++).
      resample_with_conv: 3x3 conv after nearest upsampling / strided-conv downsampling
        (else plain nearest upsampling / average pooling).
      out_channels: output channels (default: ``C`` of the input).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.

    Returns ``[B, H, W, out_channels]`` in ``x.dtype``.
    """

    ch: int = 64
    ch_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    num_heads: int = 1
    dropout: float = 0.0
    num_classes: int | None = None
    _embeds_labels = True  # (model_fn: y are class labels in [0, num_classes], checked and traced)
    time_embedding: str = "sinusoidal"
    skip_rescale: bool = True
    resample_with_conv: bool = True
    out_channels: int | None = None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, train: bool = False) -> Array:
        if x.ndim != 4:
            raise ValueError(f"UNet expects images x of shape [B, H, W, C]; got x.shape={x.shape}")
        levels = len(self.ch_mult)
        if levels < 1:
            raise ValueError("ch_mult needs at least one level")
        if isinstance(self.attn_resolutions, int) or not all(is_int(r, 0) for r in self.attn_resolutions):
            raise ValueError(f"attn_resolutions must be a sequence of ints (feature-map sizes); got "
                             f"{self.attn_resolutions!r}")
        if not (isinstance(self.dropout, numbers.Real) and 0.0 <= self.dropout < 1.0):
            # (-0.5 / 1.5 trained a fixed, rng-independent rescaling: flax's Dropout does not check)
            raise ValueError(f"UNet's dropout must be a rate in [0, 1); got {self.dropout!r}")
        if self.ch % 2:  # (the time embedding of width ch needs it even; its error named 'dim')
            raise ValueError(f"UNet's ch must be even; got {self.ch}")
        # (out_channels=0 gave C output channels, as None does)
        out_ch = x.shape[-1] if self.out_channels is None else check_int("UNet's out_channels", self.out_channels)
        factor = 2 ** (levels - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"UNet with {levels} levels needs H and W divisible by {factor}; got x.shape={x.shape}")
        t = batch_times(t, x)
        dt, dense = self.dtype, lambda n, **kw: nn.Dense(n, kernel_init=_default_init, dtype=self.dtype, **kw)
        res = lambda c: ResBlock(c, self.dropout, self.skip_rescale, dt)  # noqa: E731
        attn = lambda: AttnBlock(self.num_heads, self.skip_rescale, dt)  # noqa: E731

        # time (and label) embedding: [B, 4 ch]
        temb = TimeEmbedding(self.ch, self.time_embedding)(t)
        temb = dense(4 * self.ch)(nn.silu(dense(4 * self.ch)(temb)))
        lemb = label_embedding(y, self.num_classes, 4 * self.ch, x.shape[0])
        if lemb is not None:
            temb = temb + lemb

        # down path
        h = nn.Conv(self.ch, (3, 3), kernel_init=_default_init, dtype=dt)(x)
        hs = [h]
        for i, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = res(self.ch * mult)(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn()(h)
                hs.append(h)
            if i != levels - 1:
                if self.resample_with_conv:
                    h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), kernel_init=_default_init, dtype=dt)(h)
                else:
                    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
                hs.append(h)

        # middle
        h = res(h.shape[-1])(h, temb, train)
        h = attn()(h)
        h = res(h.shape[-1])(h, temb, train)

        # up path
        for i in reversed(range(levels)):
            for _ in range(self.num_res_blocks + 1):
                h = res(self.ch * self.ch_mult[i])(jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn()(h)
            if i != 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour upsampling
                if self.resample_with_conv:
                    h = nn.Conv(h.shape[-1], (3, 3), kernel_init=_default_init, dtype=dt)(h)
        assert not hs

        h = nn.silu(nn.GroupNorm(_groups(h.shape[-1]), dtype=dt)(h))
        out = nn.Conv(out_ch, (3, 3), kernel_init=_zeros, dtype=dt, name="out")(h)
        return out.astype(x.dtype)
