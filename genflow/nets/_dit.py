"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

The image is cut into ``p x p`` patches (flattened and linearly embedded), a fixed 2-D sin-cos position
embedding is added, and ``depth`` transformer blocks conditioned by adaLN-Zero process the tokens:
with ``c = emb(t) [+ emb(y)]``,

    shift1, scale1, gate1, shift2, scale2, gate2 = Dense_0(silu(c))      (zero-initialised)
    x = x + gate1 * Attn(LN(x) * (1 + scale1) + shift1)
    x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)

The final layer is adaLN-modulated too and zero-initialised, so a fresh DiT outputs exactly zero
(every block starts as the identity).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from genflow._checks import check_int, concrete_real, is_int
from genflow.nets._common import batch_times, label_embedding, sinusoidal_embedding

Array = jax.Array

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros
_normal = nn.initializers.normal(0.02)

# name -> (hidden, depth, num_heads), Table 1 of the paper (plus "Ti" from DeiT).
DIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def sincos_pos_embedding_2d(dim: int, h: int, w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding ``[h*w, dim]`` (MAE / DiT): half the features encode
    the row, half the column, each as ``[sin(pos w_k), cos(pos w_k)]`` with ``w_k = 10000^(-k/(dim/4))``."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs dim divisible by 4; got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def emb1d(pos):
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gy, gx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return np.concatenate([emb1d(gy), emb1d(gx)], axis=1).astype(np.float32)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (see the module docstring)."""

    hidden: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        b, n, d = x.shape
        if d != self.hidden:  # (the block ran at the tokens' width, ignoring hidden)
            raise ValueError(f"DiTBlock(hidden={self.hidden}) got tokens of width {d}")
        if d % self.num_heads:  # (a standalone block ran attention d // num_heads * num_heads wide)
            raise ValueError(f"DiTBlock: the width {d} must be divisible by num_heads={self.num_heads}")
        r = concrete_real(self.mlp_ratio)
        if r is None or not (math.isfinite(r) and int(d * r) >= 1):
            # (0 failed as a bare ZeroDivisionError in the initializer of a zero-width layer)
            raise ValueError(f"DiT's mlp_ratio must be a real > 0 with int(hidden * mlp_ratio) >= 1; got "
                             f"{self.mlp_ratio!r} (hidden={d})")
        mod = nn.Dense(6 * d, kernel_init=_zeros, dtype=self.dtype, name="adaLN")(nn.silu(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        ln = lambda name: nn.LayerNorm(1e-6, use_bias=False, use_scale=False, dtype=self.dtype, name=name)  # noqa: E731

        h = _modulate(ln("ln1")(x), shift1, scale1)
        qkv = nn.DenseGeneral((3, self.num_heads, d // self.num_heads), kernel_init=_xavier, dtype=self.dtype,
                              name="qkv")(h)
        h = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        h = nn.DenseGeneral(d, axis=(-2, -1), kernel_init=_xavier, dtype=self.dtype, name="proj")(h)
        x = x + gate1[:, None] * h

        h = _modulate(ln("ln2")(x), shift2, scale2)
        h = nn.Dense(int(d * self.mlp_ratio), kernel_init=_xavier, dtype=self.dtype, name="fc1")(h)
        h = nn.Dense(d, kernel_init=_xavier, dtype=self.dtype, name="fc2")(nn.gelu(h, approximate=True))
        return x + gate2[:, None] * h


class DiT(nn.Module):
    """Diffusion Transformer for images ``x: [B, H, W, C]``, ``t: [B]`` (and labels ``y: [B]``).

    Attributes:
      patch_size: ``p``; ``H`` and ``W`` must be divisible by it (``H W / p^2`` tokens).
      hidden, depth, num_heads: transformer width, number of blocks, attention heads
        (:data:`DIT_PRESETS` and :func:`dit` give the paper's sizes, e.g. ``dit("S/2")``).
      mlp_ratio: MLP width / ``hidden``.
      num_classes: if set, labels in ``[0, num_classes]`` are embedded (``num_classes`` or
        ``y=None`` is the "no label" token of classifier-free guidance).
      pos_embedding: ``"sincos"`` (fixed 2-D, as in DiT) or ``"none"`` (then the network is
        equivariant to permutations of whole patches).
      out_channels: output channels (default: ``C`` of the input).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.

    Returns ``[B, H, W, out_channels]`` in ``x.dtype``; exactly zero at initialisation (adaLN-Zero).
    """

    patch_size: int = 2
    hidden: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int | None = None
    _embeds_labels = True  # (model_fn: y are class labels in [0, num_classes], checked and traced)
    pos_embedding: str = "sincos"
    out_channels: int | None = None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None) -> Array:
        if x.ndim != 4:
            raise ValueError(f"DiT expects images x of shape [B, H, W, C]; got x.shape={x.shape}")
        b, hh, ww, ch = x.shape
        p = self.patch_size
        if not is_int(p, 1):  # (NumPy ints were refused as if not ints)
            raise ValueError(f"DiT's patch_size must be a positive int; got {p!r}")
        if hh % p or ww % p:
            raise ValueError(f"DiT with patch_size={p} needs H and W divisible by {p}; got x.shape={x.shape}")
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by num_heads={self.num_heads}")
        if self.pos_embedding not in ("sincos", "none"):
            raise ValueError(f"pos_embedding must be 'sincos' or 'none'; got {self.pos_embedding!r}")
        if self.pos_embedding == "sincos" and self.hidden % 4:  # (the error named 'dim')
            raise ValueError(f"DiT's hidden must be divisible by 4 for the sincos position embedding; got "
                             f"{self.hidden}")
        # (out_channels=0 gave C output channels, as None does)
        co = ch if self.out_channels is None else check_int("DiT's out_channels", self.out_channels)
        t = batch_times(t, x)
        gh, gw, d = hh // p, ww // p, self.hidden

        # patchify: [B, H, W, C] -> [B, N, d]
        # (a Dense on flattened patches: the same map as DiT's stride-p convolution)
        patches = x.reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * ch)
        tok = nn.Dense(d, kernel_init=_xavier, dtype=self.dtype, name="patch_embed")(patches)
        if self.pos_embedding == "sincos":
            tok = tok + jnp.asarray(sincos_pos_embedding_2d(d, gh, gw), tok.dtype)[None]

        # conditioning vector c: [B, d]
        temb = sinusoidal_embedding(t, 256)
        c = nn.Dense(d, kernel_init=_normal, dtype=self.dtype, name="t_embed1")(
            nn.silu(nn.Dense(d, kernel_init=_normal, dtype=self.dtype, name="t_embed0")(temb)))
        lemb = label_embedding(y, self.num_classes, d, b, name="y_embed", init=_normal)
        if lemb is not None:
            c = c + lemb.astype(c.dtype)

        for i in range(self.depth):
            tok = DiTBlock(d, self.num_heads, self.mlp_ratio, self.dtype, name=f"block{i}")(tok, c)

        # final adaLN layer and un-patchify: [B, N, p*p*C_out] -> [B, H, W, C_out]
        shift, scale = jnp.split(nn.Dense(2 * d, kernel_init=_zeros, dtype=self.dtype, name="final_adaLN")(
            nn.silu(c)), 2, axis=-1)
        tok = _modulate(nn.LayerNorm(1e-6, use_bias=False, use_scale=False, dtype=self.dtype)(tok), shift, scale)
        out = nn.Dense(p * p * co, kernel_init=_zeros, dtype=self.dtype, name="final")(tok)
        out = out.reshape(b, gh, gw, p, p, co).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, co)
        return out.astype(x.dtype)


def dit(name: str, **kwargs) -> DiT:
    """A :class:`DiT` of the paper's sizes: ``name`` is ``"<size>/<patch>"`` with size in
    :data:`DIT_PRESETS` (``"Ti"``, ``"S"``, ``"B"``, ``"L"``, ``"XL"``), e.g. ``dit("S/2", num_classes=10)``."""
    try:
        size, patch = name.split("/")
        hidden, depth, heads = DIT_PRESETS[size]
        patch = int(patch)
        if patch < 1:
            raise ValueError
    except (ValueError, KeyError):
        raise ValueError(f"DiT name must be '<size>/<patch>' with size in {list(DIT_PRESETS)}, e.g. 'S/2'; "
                         f"got {name!r}") from None
    return DiT(**{"patch_size": patch, "hidden": hidden, "depth": depth, "num_heads": heads, **kwargs})
