"""Flax linen networks used through the pure model signature ``fn(x, t) -> prediction``.

A network never knows which path or prediction kind it is trained with; it maps
``(x: [B, ...], t: [B] or scalar, y: [B] labels, one label (scalar or [1]) or None)`` to an
output shaped like ``x``.
Bind parameters and conditioning with :func:`model_fn`.

- :class:`MLP`: vector data ``[B, D]`` (its output layer, :class:`OutputDense`, stores its kernel
  ``[out, in]``).
- :class:`UNet`: DDPM++/NCSN++-style U-Net for images ``[B, H, W, C]``.
- :class:`DiT`: Diffusion Transformer (patchify + adaLN-Zero) for images; :func:`dit` builds the
  paper's sizes by name (``dit("S/2")``).
"""

from genflow.nets._common import ACTIVATIONS, TimeEmbedding, label_embedding, model_fn, sinusoidal_embedding
from genflow.nets._dit import DIT_PRESETS, DiT, DiTBlock, dit, sincos_pos_embedding_2d
from genflow.nets._mlp import MLP, OutputDense
from genflow.nets._unet import AttnBlock, ResBlock, UNet

__all__ = ["sinusoidal_embedding", "TimeEmbedding", "label_embedding", "MLP", "OutputDense", "UNet", "ResBlock",
           "AttnBlock", "DiT", "DiTBlock", "dit", "DIT_PRESETS", "sincos_pos_embedding_2d", "model_fn", "ACTIVATIONS"]
