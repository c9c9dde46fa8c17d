"""Building blocks shared by the networks: time and label embeddings, activations, ``model_fn``."""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genflow._checks import is_int

Array = jax.Array


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": nn.silu,
    "gelu": nn.gelu,
    "relu": nn.relu,
    "selu": nn.selu,
    "tanh": jnp.tanh,
    "softplus": nn.softplus,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation ``name`` of :data:`ACTIVATIONS` (a ``ValueError`` listing them otherwise)."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _times(t) -> Array:
    """``t`` as ``[B]`` (a scalar is ``[1]``); anything else is refused (a ``[B, 1]`` t gave
    ``[B, 1, dim]`` embeddings)."""
    t = jnp.atleast_1d(jnp.asarray(t))
    if t.ndim != 1:
        raise ValueError(f"t must be a scalar or have shape [B]; got shape {t.shape}")
    return t


def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10_000.0, scale: float = 1000.0) -> Array:
    """Transformer-style sinusoidal features of ``scale * t``.

    Args:
      t: ``[B]`` times in [0, 1] (or a scalar: ``B = 1``).
      dim: even number of features.
    Returns:
      ``[B, dim]``: ``[cos(scale t w_k), sin(scale t w_k)]`` with ``w_k = max_period^(-k/half)``.
    """
    if dim % 2:
        raise ValueError(f"dim must be even for a sinusoidal embedding, got {dim}")
    t = _times(t)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (scale * t.astype(jnp.float32))[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeEmbedding(nn.Module):
    """Embeds ``t: [B]`` into ``[B, dim]``.

    ``kind``: ``"sinusoidal"`` (fixed frequencies), ``"fourier"`` (random Gaussian frequencies
    of standard deviation ``fourier_scale``, drawn from ``fourier_seed``; Tancik et al. 2020 /
    Song et al. 2021), or ``"identity"`` (``t`` itself, ``dim`` ignored).

    The Fourier frequencies are a constant of the module, not a parameter: held as a parameter
    with a stopped gradient (score_sde's way) they still shrank under decoupled weight decay
    (AdamW: by ``(1 - lr * wd)`` per step, 0.82x after 200 steps at lr 1e-2, wd 0.1). Checkpoints
    written before this change hold a ``TimeEmbedding_*/freqs`` entry that is ignored: such a
    model embeds time with other frequencies now (retrain, or keep the old code for it).
    """

    dim: int = 64
    kind: str = "sinusoidal"
    fourier_scale: float = 16.0
    fourier_seed: int = 0

    @nn.compact
    def __call__(self, t: Array) -> Array:
        t = _times(t)
        if self.kind == "sinusoidal":
            return sinusoidal_embedding(t, self.dim)
        if self.kind == "fourier":
            if self.dim % 2:
                raise ValueError(f"the fourier time embedding needs an even dim; got {self.dim}")
            # a NumPy draw: independent of t's dtype and of JAX's PRNG settings/version
            w = self.fourier_scale * np.random.default_rng(self.fourier_seed).standard_normal(self.dim // 2)
            args = 2 * jnp.pi * t.astype(jnp.float32)[:, None] * jnp.asarray(w, jnp.float32)[None]
            return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        if self.kind == "identity":
            return t[:, None]
        raise ValueError(f"unknown time embedding kind {self.kind!r}; expected 'sinusoidal', 'fourier' or 'identity'")


def model_fn(module: nn.Module, params, **cond) -> Callable[[Array, Array], Array]:
    """Bind parameters (and conditioning such as ``y=labels``) into a pure ``fn(x, t)``.

    Returns a :class:`jax.tree_util.Partial`, so the parameters stay traced when the function
    is passed to a jitted sampler: new parameters do not trigger a recompilation. Array-valued
    conditioning (labels) is traced too, as is a Python-int ``y`` of genflow's class-conditional
    nets (``MLP`` / ``UNet`` / ``DiT`` with an int ``num_classes``: one class label for the batch;
    their concrete labels are range-checked here, since traced ones cannot be); other keywords
    (``train=False``, strings, ``None``, other Python numbers) are static, bound
    with the module into a hashable callable (an equal module, rebuilt, is the same function to
    ``jit``; a traced ``train`` flag failed inside the module).
    """
    # (a NumPy or concrete JAX bool train flag was traced: it failed in the module, also in gf.sample)
    num_classes, y = getattr(module, "num_classes", None), cond.get("y")
    python_int = isinstance(y, int) and not isinstance(y, bool)
    labels = getattr(module, "_embeds_labels", False) and is_int(num_classes, 0)  # (genflow's nets only: a
    # module of one's own may use num_classes and y otherwise, e.g. a one-hot condition's width)
    if labels and (python_int or isinstance(y, (np.ndarray, np.generic, jax.Array))):
        # the class labels of a genflow class-conditional net are traced (a Python int was static,
        # so sampling class after class compiled once per class), so they are range-checked here,
        # while concrete: traced, an out-of-range label gives NaN samples
        _check_label_values(y, num_classes)
        if python_int:
            cond["y"] = jnp.asarray(y, jnp.int32)
    static = {k: (bool(v) if _concrete_bool(v) else v) for k, v in cond.items()
              if _concrete_bool(v) or not isinstance(v, (jax.Array, np.ndarray, np.generic))}
    traced = {k: v for k, v in cond.items() if k not in static}
    return jax.tree_util.Partial(_Apply(module, tuple(sorted(static.items()))), params, **traced)


def _concrete_bool(v) -> bool:
    """A NumPy bool scalar or a concrete 0-d JAX bool array (a flag, bound statically)."""
    return isinstance(v, np.bool_) or (isinstance(v, (jax.Array, np.ndarray)) and not isinstance(v, jax.core.Tracer)
                                       and v.shape == () and v.dtype == bool)


class _Apply:
    """``module.apply(params, *args, **static, **kwargs)``, hashable by the module and the static
    keywords (a bound method ``module.apply`` compares by identity: every rebuilt module retraced)."""

    def __init__(self, module: nn.Module, static: tuple):
        self.module, self.static = module, static

    def __call__(self, params, *args, **kwargs):
        return self.module.apply(params, *args, **dict(self.static), **kwargs)

    def __eq__(self, other):
        return isinstance(other, _Apply) and self.module == other.module and self.static == other.static

    def __hash__(self):
        return hash((self.module, self.static))


def _check_label_values(y, num_classes: int) -> None:
    """Concrete labels must be ints in ``[0, num_classes]`` (traced ones cannot be checked)."""
    if isinstance(y, jax.core.Tracer):
        return
    yy = np.asarray(y)
    if yy.size and (not np.issubdtype(yy.dtype, np.integer) or yy.min() < 0 or yy.max() > num_classes):
        raise ValueError(f"labels y must be ints in [0, num_classes={num_classes}] ({num_classes}: no label); "
                         f"got dtype {yy.dtype}, values in [{yy.min()}, {yy.max()}]")


def label_embedding(y: Array | None, num_classes: int | None, dim: int, batch: int, name: str = "label_embed",
                    init: Callable = nn.linear.default_embed_init) -> Array | None:
    """Embed labels ``y: [B]`` (or one label, scalar or ``[1]``, for the whole batch) in
    ``[0, num_classes]`` (``num_classes`` = "no label") into ``[B, dim]``.

    Called inside a compact module. ``y=None`` means the null label when the network is
    class-conditional; labels given to an unconditional network (``num_classes=None``) raise.
    Concrete labels outside ``[0, num_classes]`` raise; traced ones (under ``jit``, e.g. in
    :func:`genflow.train.fit`) give NaN outputs, so training stops at that step.
    """
    if num_classes is None:
        if y is not None:
            raise ValueError("labels y were given but the network was built with num_classes=None")
        return None
    if not is_int(num_classes, 0):  # (-1 failed as a label error without labels)
        raise ValueError(f"num_classes must be None or an int >= 0; got {num_classes!r}")
    if y is None:
        y = jnp.full((batch,), num_classes, jnp.int32)
    _check_label_values(y, num_classes)  # (an out-of-range label gave nan outputs, -1 wrapped to the null label)
    y = jnp.asarray(y)
    if y.shape in ((), (1,)):  # one label for the whole batch, as t (model_fn(net, p, y=3) failed on its shape)
        y = jnp.broadcast_to(y.reshape(()), (batch,))
    if y.shape != (batch,):
        raise ValueError(f"labels y must be a scalar or have shape [B]={(batch,)}; got {y.shape}")
    # traced labels outside [0, num_classes] (no check can see them) give NaN outputs, as labels
    # above num_classes do through Embed's out-of-range fill: negative ones wrapped (-1 read as the
    # null label, -2 as class num_classes - 1), so a dataset's -1 "unlabelled" trained silently
    y = y.astype(jnp.promote_types(y.dtype, jnp.int32))  # (num_classes + 1 wrapped in int8 labels onto class 0)
    y = jnp.where((y >= 0) & (y <= num_classes), y, num_classes + 1)
    return nn.Embed(num_classes + 1, dim, embedding_init=init, name=name)(y)


def batch_times(t, x: Array) -> Array:
    """``t`` (scalar or ``[B]``) as a float32 ``[B]`` vector for ``x: [B, ...]``."""
    t = jnp.asarray(t, jnp.float32)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"t must be a scalar or have shape [B]={(x.shape[0],)}; got {t.shape}")
    return jnp.broadcast_to(t, (x.shape[0],))
