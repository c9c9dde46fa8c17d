"""Invertible layers as pure functions: ``forward``, ``inverse`` and their log-determinants.

A layer is a small frozen dataclass (its hyper-parameters are static; it is hashable) with

* ``init(key, x) -> params`` (``x: [B, ...]`` an example batch: ActNorm's init is data-dependent),
* ``forward(params, x) -> (y, logdet)`` with ``logdet = log |det dy/dx|`` per example, ``[B]``,
* ``inverse(params, y) -> (x, logdet)`` with ``logdet = log |det dx/dy|`` (``= -`` the forward one),
* ``forward_split(params, x, linear_logdet=True) -> (y, logdet_nonlinear, logdet_linear)``: the
  log-determinant split into the part that depends on ``x`` and the part of "linear" layers,
  whose Jacobian does not depend on ``x`` (ActNorm, 1x1 convolutions, squeezes). EBFlow (Chao et
  al. 2023) trains with score matching, which never needs the linear part: with
  ``linear_logdet=False`` it is not computed at all (see :mod:`genflow.flows._flow`).

Vector data is ``[B, D]``; images are ``[B, H, W, C]`` (channels last). Layers act on the last
axis (channels); "spatial" size is the product of the axes between batch and channels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from genflow._checks import check_int, flat_batch, is_int
from genflow._precision import matmul, wide as _wide
from genflow.nets._common import activation

Array = jax.Array

__all__ = ["Layer", "ActNorm", "Invertible1x1Conv", "AffineCoupling", "AdditiveCoupling", "Squeeze", "Unsqueeze",
           "FactorOut", "Chain", "coupling_mask"]


def _spatial(x: Array) -> int:
    return math.prod(x.shape[1:-1])


def _zeros(x: Array) -> Array:
    return jnp.zeros((x.shape[0],), jnp.promote_types(x.dtype, jnp.float32))


def check_logdet(layer, logdet, x: Array, method: str):
    """``logdet``, refused unless it is one value per example, ``[B]`` (checked at trace time): a
    layer of one's own returning ``[B, 1]`` made ``log_prob`` ``[B, B]`` by broadcasting, silently;
    ``[B, D]`` failed as "Incompatible shapes for broadcasting" without naming the layer."""
    if getattr(logdet, "shape", None) != (x.shape[0],):
        raise ValueError(f"{type(layer).__name__}.{method} must return (y, logdet) with logdet of shape [B] = "
                         f"({x.shape[0]},), one log|det| per example (summed over the event axes); got "
                         f"{getattr(logdet, 'shape', type(logdet).__name__)}")
    return logdet


class Layer:
    """Base class of the invertible layers; a layer of one's own subclasses it.

    A layer is a frozen dataclass (``@dataclasses.dataclass(frozen=True)``): hashable, since the
    flow's programs are compiled once per bijector with the layers as static arguments, and its
    fields are hyper-parameters (parameters live in the ``params`` pytree). It defines:

    * ``forward(params, x) -> (y, logdet)``: ``x, y: [B, ...]``, ``logdet: [B]`` = ``log |det
      dy/dx|`` per example (summed over the event axes);
    * ``inverse(params, y) -> (x, logdet)`` with ``logdet = log |det dx/dy|``, the negative of the
      forward one at the same point;
    * ``init(key, x) -> params`` if it has parameters (``x``: an example batch; default ``{}``);
    * ``linear = True`` (class attribute) if its Jacobian does not depend on ``x`` (EBFlow's
      score-matching objectives then skip its log-determinant).

    ``map`` and ``forward_split`` follow from ``forward``."""

    linear: ClassVar[bool] = False

    def init(self, key: Array, x: Array):
        del key, x
        return {}

    def forward(self, params, x: Array) -> tuple[Array, Array]:
        raise NotImplementedError

    def inverse(self, params, y: Array) -> tuple[Array, Array]:
        raise NotImplementedError

    def map(self, params, x: Array) -> Array:
        """``forward`` without the log-determinant (linear layers skip computing it)."""
        return self.forward(params, x)[0]

    def forward_split(self, params, x: Array, linear_logdet: bool = True) -> tuple[Array, Array, Array]:
        """``(y, logdet of nonlinear layers, logdet of linear layers)``; with
        ``linear_logdet=False`` the linear layers' log-determinants are not computed (zeros)."""
        if self.linear and not linear_logdet:
            return self.map(params, x), _zeros(x), _zeros(x)
        y, ld = self.forward(params, x)
        zero = jnp.zeros_like(ld)
        return (y, zero, ld) if self.linear else (y, ld, zero)


@dataclasses.dataclass(frozen=True)
class ActNorm(Layer):
    """Per-channel affine map ``y = (x + b) * exp(s)`` (Kingma & Dhariwal 2018, Glow).

    Data-dependent init: ``b = -mean``, ``s = -log std`` over the example batch, so the output
    starts with zero mean and unit variance per channel. ``log|det| = spatial * sum(s)``.
    """

    linear: ClassVar[bool] = True
    eps: float = 1e-6

    def init(self, key, x):
        axes = tuple(range(x.ndim - 1))
        if math.prod(x.shape[:-1]) < 2:
            raise ValueError(f"ActNorm's data-dependent init needs at least 2 values per channel (batch x "
                             f"spatial); got an init batch of shape {tuple(x.shape)}")
        # (statistics and parameters in float32 or wider: initialised on bfloat16 data, bfloat16
        # parameters made the log-determinant bfloat16, off by 1-4 nats on a 16x16x3 glow)
        xw = _wide(x)
        mean, std = jnp.mean(xw, axes), jnp.std(xw, axes)
        return {"bias": -mean, "log_scale": -jnp.log(std + self.eps)}

    def forward(self, params, x):
        y = (x + params["bias"]) * jnp.exp(params["log_scale"])
        # (log-determinants in float32 or wider: a bfloat16 log-det lost ~1.4 nats on a 16x16x3 glow)
        return y, jnp.full((x.shape[0],), _spatial(x) * jnp.sum(_wide(params["log_scale"])), _wide(y).dtype)

    def inverse(self, params, y):
        x = y * jnp.exp(-params["log_scale"]) - params["bias"]
        return x, jnp.full((y.shape[0],), -_spatial(y) * jnp.sum(_wide(params["log_scale"])), _wide(x).dtype)


@dataclasses.dataclass(frozen=True)
class Invertible1x1Conv(Layer):
    """Invertible channel mixing ``y = W x`` at every position (Glow's 1x1 convolution; on
    ``[B, D]`` vectors a dense invertible linear layer).

    ``lu=True`` uses Glow's LU parametrization ``W = P L (U + diag(sign * exp(log_s)))`` with a
    fixed permutation ``P`` and signs (kept in ``params`` but not trained: gradients are
    stopped, and they are re-read as the nearest exact permutation and signs, so weight decay
    on them changes nothing), so ``log|det W| = sum(log_s)`` costs O(C). ``lu=False`` keeps a free matrix and
    pays ``slogdet`` (O(C^3)) for the log-determinant: the "linear layer" of EBFlow.
    ``log|det| = spatial * log|det W|``. Initialised at a random rotation.
    """

    linear: ClassVar[bool] = True
    lu: bool = True

    def init(self, key, x):
        c = x.shape[-1]
        # float32 or wider (QR / LU / slogdet have no bfloat16 or float16 kernels)
        w, _ = jnp.linalg.qr(jax.random.normal(key, (c, c), jnp.promote_types(x.dtype, jnp.float32)))
        if not self.lu:
            return {"w": w}
        p, lower, upper = jax.scipy.linalg.lu(w)
        s = jnp.diag(upper)
        return {"perm": p, "lower": jnp.tril(lower, -1), "upper": jnp.triu(upper, 1),
                "log_s": jnp.log(jnp.abs(s)), "sign": jnp.sign(s)}

    def weight(self, params, logdet: bool = True) -> tuple[Array, Array | None]:
        """``(W [C, C], log|det W|)`` (``None`` for the log-determinant when ``logdet=False``)."""
        if not self.lu:
            return params["w"], (jnp.linalg.slogdet(_wide(params["w"]))[1] if logdet else None)
        c = params["log_s"].shape[0]
        eye = jnp.eye(c, dtype=params["log_s"].dtype)
        lower = jnp.tril(params["lower"], -1) + eye
        # P and the signs are re-read as an exact permutation and exact signs: decoupled weight decay
        # (adamw) shrank them despite the stopped gradients, and the log-det sum(log_s) went wrong
        perm = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(params["perm"]), axis=1), c, dtype=eye.dtype)
        sign = jnp.sign(jax.lax.stop_gradient(params["sign"]))
        upper = jnp.triu(params["upper"], 1) + jnp.diag(sign * jnp.exp(params["log_s"]))
        # (full-precision products here and below: see genflow._precision)
        return matmul(matmul(perm, lower), upper), jnp.sum(_wide(params["log_s"]))

    def map(self, params, x):
        return matmul(x, self.weight(params, logdet=False)[0].T)

    def forward(self, params, x):
        w, logdet = self.weight(params)
        y = matmul(x, w.T)
        # (log-determinants in float32 or wider, as ActNorm's: bfloat16 parameters gave a bfloat16
        # log-det, 616.0 where float32 gives 615.31 on [2, 16, 16, 8])
        return y, jnp.full((x.shape[0],), _spatial(x) * logdet, _wide(y).dtype)

    def inverse(self, params, y):
        w, logdet = self.weight(params)
        x = matmul(y, jnp.linalg.inv(_wide(w)).astype(w.dtype).T)
        return x, jnp.full((y.shape[0],), -_spatial(y) * logdet, _wide(x).dtype)


def coupling_mask(shape: tuple[int, ...], kind: str = "half", parity: int = 0, dtype=jnp.float32) -> Array:
    """The binary mask of the conditioning half, broadcastable to ``[B, *shape]``.

    ``"half"``: the first ``C // 2`` channels (last axis); ``"checkerboard"``: alternating
    positions (spatial for images ``(H, W, C)``, features for vectors ``(D,)``). ``parity = 1``
    swaps the halves.
    """
    if kind == "half":
        c = shape[-1]
        m = jnp.arange(c) < c // 2
        m = m.reshape((1,) * (len(shape) - 1) + (c,))
    elif kind == "checkerboard":
        if len(shape) == 1:
            m = jnp.arange(shape[0]) % 2 == 0
        elif len(shape) == 2:  # sequences (L, C): alternating positions
            m = (jnp.arange(shape[0]) % 2 == 0)[:, None]
        else:  # (H, W, ..., C): alternating over every spatial axis (two only gave a mask of the wrong rank)
            spatial = shape[:-1]
            idx = sum(jnp.arange(n).reshape((-1,) + (1,) * (len(spatial) - 1 - i)) for i, n in enumerate(spatial))
            m = (idx % 2 == 0)[..., None]
    else:
        raise ValueError(f"unknown coupling mask {kind!r}; expected 'half' or 'checkerboard'")
    if not is_int(parity, 0):  # (0.5 was read as odd, a string failed in a format)
        raise ValueError(f"parity must be an int >= 0; got {parity!r}")
    m = m if parity % 2 == 0 else ~m
    return m.astype(dtype)


class CouplingNet(nn.Module):
    """Conditioner of a coupling layer: ``x_masked -> (shift, raw_scale)``, each shaped like ``x``.

    An MLP for ``[B, D]`` and a 3x3 / 1x1 / 3x3 CNN for ``[B, H, W, C]`` (3 / 1 / 3 on sequences
    ``[B, L, C]``); the last layer is
    zero-initialised (Glow), so that an additive coupling starts as the identity and an affine one
    as the fixed scaling ``sigmoid(2) ~ 0.881`` of its transformed half (log-det ``log sigmoid(2)`` per
    transformed entry).
    """

    hidden: int = 64
    depth: int = 2
    activation: str = "silu"

    @nn.compact
    def __call__(self, x):
        act = activation(self.activation)  # (a bare KeyError for an unknown name)
        c = x.shape[-1]
        h = x
        # parameters in float32 or wider, as ActNorm's and the 1x1 convolution's: with float64 data
        # the conditioner's stayed float32, rounded at every update (flax's default param_dtype)
        param_dtype = jnp.promote_types(x.dtype, jnp.float32)
        dense = functools.partial(nn.Dense, param_dtype=param_dtype)
        conv = functools.partial(nn.Conv, param_dtype=param_dtype)
        if x.ndim == 2:
            for _ in range(self.depth):
                h = act(dense(self.hidden)(h))
            out = dense(2 * c, kernel_init=nn.initializers.zeros)(h)
        else:
            # kernels over every axis between batch and channels ((3,) on [B, L, C], (3, 3) on
            # [B, H, W, C]): a (3, 3) kernel on [B, L, C] convolved over the batch axis and mixed samples
            k3, k1 = (3,) * (x.ndim - 2), (1,) * (x.ndim - 2)
            h = act(conv(self.hidden, k3)(h))
            for _ in range(self.depth - 1):
                h = act(conv(self.hidden, k1)(h))
            out = conv(2 * c, k3, kernel_init=nn.initializers.zeros)(h)
        return out[..., :c], out[..., c:]


@dataclasses.dataclass(frozen=True)
class AffineCoupling(Layer):
    """Affine coupling (Dinh et al. 2017, RealNVP; Glow's scale ``sigmoid(h + 2)``).

    With mask ``m`` (the conditioning half)::

        y = m x + (1 - m) (x * s + t),   (t, h) = NN(m x),  s = sigmoid(h + 2)
        log|det| = sum (1 - m) log s

    computed as ``log s = log_sigmoid(h + 2)`` with the masked positions selected (not multiplied
    by 0): a saturated scale (h below ~-104 in float32) gave ``0 * log 0 = NaN`` log-dets and
    inverses, and a ``-inf`` log-det with NaN gradients, where the true values are finite.

    ``mask``/``parity``: see :func:`coupling_mask`; ``hidden``/``depth``: the conditioner.
    """

    mask: str = "half"
    parity: int = 0
    hidden: int = 64
    depth: int = 2
    activation: str = "silu"
    affine: ClassVar[bool] = True

    @property
    def net(self) -> CouplingNet:
        return CouplingNet(self.hidden, self.depth, self.activation)

    def _mask(self, x):
        return coupling_mask(x.shape[1:], self.mask, self.parity, bool)

    def init(self, key, x):
        check_int("hidden", self.hidden)  # (the builders check it; a layer built directly failed as ZeroDivisionError)
        check_int("depth", self.depth)
        return self.net.init(key, jnp.where(self._mask(x), x, 0))

    def _log_scale_shift(self, params, x, m):
        """``(log s, t)`` from the conditioning half (``log s`` is None for additive couplings)."""
        shift, raw = self.net.apply(params, jnp.where(m, x, 0))
        if not self.affine:
            return None, shift
        return jax.nn.log_sigmoid(raw + 2.0), shift

    def _logdet(self, m, log_s):
        return jnp.sum(flat_batch(jnp.where(m, 0, log_s)), axis=-1)

    def forward(self, params, x):
        m = self._mask(x)
        log_s, t = self._log_scale_shift(params, x, m)
        if log_s is None:
            return jnp.where(m, x, x + t), _zeros(x)
        return jnp.where(m, x, x * jnp.exp(log_s) + t), self._logdet(m, log_s)

    def inverse(self, params, y):
        m = self._mask(y)
        log_s, t = self._log_scale_shift(params, y, m)
        if log_s is None:
            return jnp.where(m, y, y - t), _zeros(y)
        return jnp.where(m, y, (y - t) * jnp.exp(-log_s)), -self._logdet(m, log_s)


@dataclasses.dataclass(frozen=True)
class AdditiveCoupling(AffineCoupling):
    """Additive (volume-preserving) coupling of NICE (Dinh et al. 2015): ``y = x + (1 - m) t(m x)``,
    ``log|det| = 0``."""

    affine: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class Squeeze(Layer):
    """Space-to-depth ``[B, H, W, C] -> [B, H/2, W/2, 4C]`` (RealNVP); a permutation, ``log|det| = 0``."""

    linear: ClassVar[bool] = True

    def forward(self, params, x):
        if x.ndim != 4:
            raise ValueError(f"Squeeze needs images [B, H, W, C]; got x.shape={x.shape}")
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width; got x.shape={x.shape}")
        y = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)
        return y, _zeros(x)

    def inverse(self, params, y):
        if y.ndim != 4 or y.shape[-1] % 4:
            raise ValueError(f"the inverse of Squeeze (Unsqueeze) needs images [B, H, W, C] with C divisible by 4; "
                             f"got shape {y.shape}")
        b, h, w, c = y.shape
        x = y.reshape(b, h, w, 2, 2, c // 4).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c // 4)
        return x, _zeros(y)


@dataclasses.dataclass(frozen=True)
class Unsqueeze(Layer):
    """Depth-to-space, the inverse of :class:`Squeeze`."""

    linear: ClassVar[bool] = True

    def forward(self, params, x):
        return Squeeze().inverse(params, x)

    def inverse(self, params, y):
        return Squeeze().forward(params, y)


@dataclasses.dataclass(frozen=True)
class Chain(Layer):
    """Composition ``layers[-1] o ... o layers[0]``; ``params`` is a tuple, one entry per layer."""

    layers: tuple

    def __post_init__(self):  # (a list was accepted here and failed later as a non-hashable static argument)
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def linear(self) -> bool:  # type: ignore[override]
        return all(layer.linear for layer in self.layers)

    def _check_params(self, params):
        # (zip cut a params tuple of another length silently: forward used the first sets and
        # inverse the last, e.g. a checkpoint of a flow with more steps; static under jit)
        if not isinstance(params, (tuple, list)) or len(params) != len(self.layers):
            got = f"{len(params)} entries" if isinstance(params, (tuple, list)) else type(params).__name__
            raise ValueError(f"Chain has {len(self.layers)} layers but params has {got} (params of another flow, "
                             f"e.g. a different num_steps or levels?)")

    def init(self, key, x):
        params = []
        for layer, k in zip(self.layers, jax.random.split(key, len(self.layers))):
            p = layer.init(k, x)
            x, _ = layer.forward(p, x)
            params.append(p)
        return tuple(params)

    def forward(self, params, x):
        self._check_params(params)
        ld = _zeros(x)
        for layer, p in zip(self.layers, params):
            x_in = x
            x, l = layer.forward(p, x)
            ld = ld + check_logdet(layer, l, x_in, "forward")
        return x, ld

    def inverse(self, params, y):
        self._check_params(params)
        ld = _zeros(y)
        for layer, p in zip(reversed(self.layers), reversed(params)):
            y_in = y
            y, l = layer.inverse(p, y)
            ld = ld + check_logdet(layer, l, y_in, "inverse")
        return y, ld

    def forward_split(self, params, x, linear_logdet=True):
        self._check_params(params)
        nl, li = _zeros(x), _zeros(x)
        for layer, p in zip(self.layers, params):
            x_in = x
            x, a, b = layer.forward_split(p, x, linear_logdet)
            nl, li = nl + check_logdet(layer, a, x_in, "forward"), li + check_logdet(layer, b, x_in, "forward")
        return x, nl, li


@dataclasses.dataclass(frozen=True)
class FactorOut(Layer):
    """Multi-scale split (RealNVP, Glow): the last ``C - C//2`` channels leave the flow (they go
    to the base ``N(0, I)`` unchanged) and the first ``C//2`` continue through ``inner``, which
    must preserve their shape (e.g. ``Chain([Squeeze(), ..., Unsqueeze()])``).

    ``y = concat(inner(x[..., :C//2]), x[..., C//2:])``. (Glow also learns a conditional prior for
    the factored-out half; here it is the standard normal.)
    """

    inner: Layer

    @property
    def linear(self) -> bool:  # type: ignore[override]
        return self.inner.linear

    def _split(self, x):
        k = x.shape[-1] // 2
        return x[..., :k], x[..., k:]

    def init(self, key, x):
        return self.inner.init(key, self._split(x)[0])

    def forward(self, params, x):
        a, b = self._split(x)
        a, ld = self.inner.forward(params, a)
        return jnp.concatenate([a, b], -1), ld

    def inverse(self, params, y):
        a, b = self._split(y)
        a, ld = self.inner.inverse(params, a)
        return jnp.concatenate([a, b], -1), ld

    def forward_split(self, params, x, linear_logdet=True):
        a, b = self._split(x)
        a, nl, li = self.inner.forward_split(params, a, linear_logdet)
        return jnp.concatenate([a, b], -1), nl, li
