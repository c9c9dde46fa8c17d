"""A time-conditioned MLP for vector data."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genflow._checks import check_int
from genflow.nets._common import TimeEmbedding, activation, batch_times, label_embedding

Array = jax.Array


class MLP(nn.Module):
    """Fully connected network for vector data, conditioned on time (and optional labels).

    ``h = concat(x, emb(t) [, label_emb(y)])``, then ``len(hidden)`` Dense+activation layers and
    an output layer (:class:`OutputDense`, named ``Dense_{len(hidden)}``) with ``x.shape[-1]``
    features (or ``out_dim``). The output layer stores its kernel as ``kernel_t: [out, in]`` (as
    ``torch.nn.Linear`` does), not flax's ``kernel: [in, out]``: see :class:`OutputDense`.

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
    _embeds_labels = True  # (model_fn: y are class labels in [0, num_classes], checked and traced)
    class_dim: int = 64
    out_dim: int | None = None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None) -> Array:
        if x.ndim != 2:
            raise ValueError(f"MLP expects x of shape [B, D]; got x.shape={x.shape}")
        t = batch_times(t, x)
        act = activation(self.activation)
        if self.time_embedding in ("sinusoidal", "fourier") and self.time_dim % 2:  # (the error named 'dim')
            raise ValueError(f"MLP's time_dim must be even for a {self.time_embedding} time embedding; "
                             f"got {self.time_dim}")
        # (out_dim=0 gave a [B, D] output, as None does; class_dim=0 a ZeroDivisionError in the
        # embedding's initialiser and -3 an MLIRError)
        out_dim = x.shape[-1] if self.out_dim is None else check_int("MLP's out_dim", self.out_dim)
        if self.num_classes is not None:
            check_int("MLP's class_dim", self.class_dim)
        feats = [x, TimeEmbedding(self.time_dim, self.time_embedding)(t).astype(x.dtype)]
        emb = label_embedding(y, self.num_classes, self.class_dim, x.shape[0], name="Embed_0")
        if emb is not None:
            feats.append(emb.astype(x.dtype))
        h = jnp.concatenate(feats, axis=-1)
        for width in self.hidden:
            h = act(nn.Dense(width, dtype=self.dtype)(h))
        out = OutputDense(out_dim, dtype=self.dtype, name=f"Dense_{len(self.hidden)}")(h)
        return out.astype(x.dtype)


_dense_init = nn.initializers.lecun_normal()  # nn.Dense's default kernel initialiser


class OutputDense(nn.Module):
    """``y = h @ kernel_t.T + bias``: a dense layer whose kernel is stored ``[out, in]``.

    Initialised as ``nn.Dense`` (LeCun normal over the fan-in, zero bias), with the same numbers for
    the same key (``kernel_t == Dense's kernel.T``), so it computes what ``nn.Dense`` would; only the
    storage order differs. The reason is speed on XLA:CPU: for a narrow output
    (``out`` much smaller than ``in``, e.g. a 2-D velocity from 256 hidden units), the kernel's
    gradient ``h^T g`` with a ``[in, out]`` result takes XLA:CPU's slow dot path, while ``g^T h``
    with a ``[out, in]`` result takes its fast one: measured on a 2-core AMD EPYC (jaxlib 0.10.2,
    batch 256) for 256 -> 2, forward plus both gradients 147 us against 23 us per call; the whole
    3x256 MLP training step on 2-D moons ran 12% faster (726 -> 818 steps/s, median of 7 rounds
    in one process; ``experiments/benchmarks/cfm_throughput.py``).
    The wide layers keep flax's ``[in, out]`` order, which is the fast one for them (for a narrow
    *input*, ``[out, in]`` is the slow order).

    MLP parameters saved before the output layer became an ``OutputDense`` hold
    ``Dense_{L}: {"kernel": [in, out], "bias"}``; to load them, rename the entry to ``kernel_t`` and
    transpose it.

    Attributes:
      features: output size ``out``.
      dtype: computation dtype; parameters stay float32.

    Shapes: ``h: [..., in] -> [..., out]``; ``kernel_t: [out, in]``, ``bias: [out]``.
    """

    features: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, h: Array) -> Array:
        # drawn as nn.Dense draws its [in, out] kernel, then transposed: the same numbers per seed
        kernel = self.param("kernel_t", lambda key, shape, dtype: _dense_init(key, shape[::-1], dtype).T,
                            (self.features, h.shape[-1]), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        h, kernel, bias = nn.dtypes.promote_dtype(h, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(h, kernel, (((h.ndim - 1,), (1,)), ((), ())))
        return y + bias
