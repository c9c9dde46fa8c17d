"""Measurement operators ``y = A(x) + noise`` for inverse problems.

Operators are pytrees (their arrays are traced) with

* ``forward(x)``: ``A x``, ``x: [B, ...]`` -> ``y: [B, ...]``,
* ``adjoint(y)``: ``A^T y`` (exact: ``<A x, y> = <x, A^T y>``),
* ``pinv(y)``: the Moore-Penrose pseudo-inverse ``A^+ y``,
* ``norm_sq()``: ``||A||^2``, the largest squared singular value (used by ``flowdps`` only),

all batched over the leading axis. Images are ``[B, H, W, C]``; vectors ``[B, D]``.
Noise models add measurement noise and give the data-fidelity term the posterior samplers use.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from genflow._checks import check_int, concrete_real, flat_batch
from genflow._precision import matmul, wide as _wide

Array = jax.Array

__all__ = [
    "Operator", "Mask", "AvgPool", "Blur", "Matrix", "Identity",
    "random_inpainting", "box_inpainting", "super_resolution", "gaussian_blur", "kernel_blur", "motion_blur",
    "compressed_sensing", "denoising",
    "GaussianNoise", "PoissonNoise",
]


def _static():
    return dataclasses.field(metadata=dict(static=True))


def _checked_pytree(cls):
    """Register the frozen dataclass ``cls`` as a pytree (fields with ``static=True`` metadata are
    static) whose unflatten does not run ``__init__``: its ``__post_init__`` checks the values a
    user passes, not the leaves JAX rebuilds it with (gradients, ``zeros_like``, ``vmap`` axis
    specs, equinox filter specs: ``jax.grad`` of ``GaussianNoise.nll`` in ``sigma`` was refused as
    a negative sigma)."""
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if not f.metadata.get("static")]
    meta = [f.name for f in fields if f.metadata.get("static")]

    def flatten(obj):
        return [getattr(obj, n) for n in data], tuple(getattr(obj, n) for n in meta)

    def flatten_with_keys(obj):
        children, aux = flatten(obj)
        return [(jax.tree_util.GetAttrKey(n), c) for n, c in zip(data, children)], aux

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for n, v in zip(data, children):
            object.__setattr__(obj, n, v)
        for n, v in zip(meta, aux):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


def _out_dtype(x):
    """The dtype of an operator's output for input ``x``: ``x``'s if floating (bfloat16 stays
    bfloat16), else float32 (an integer input was truncated)."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def _shape_arg(name: str, shape, expected: str) -> tuple:
    """``tuple(shape)``, or a ``TypeError`` naming ``name`` and ``expected`` for an int or anything else
    that is not a sequence (an int 8 failed as "'int' object is not iterable")."""
    if isinstance(shape, (str, bytes)) or not np.iterable(shape):
        raise TypeError(f"{name} must be a tuple {expected}; got {shape!r}")
    return tuple(shape)


class Operator:
    """Base class: a linear measurement operator with forward, adjoint and pseudo-inverse.

    To write your own, make it a frozen dataclass registered as a pytree, as the built-in
    :class:`Mask` and :class:`Matrix` are, so that its arrays are traced leaves (a new array reuses
    the compiled program, and is seen) and its other fields static::

        @jax.tree_util.register_dataclass
        @dataclasses.dataclass(frozen=True)
        class MyMatrix(gf.inverse.Operator):
            M: jax.Array
            name: str = dataclasses.field(default="my_matrix", metadata=dict(static=True))
            def forward(self, x): return x @ self.M.T
            def adjoint(self, y): return y @ self.M
            def pinv(self, y): return y @ jnp.linalg.pinv(self.M).T

    An operator that is not a pytree is a static argument of the compiled samplers, hashed and
    compared: :func:`~genflow.inverse.posterior_sample` and :func:`~genflow.inverse.posterior_model`
    refuse (``TypeError``) one that holds JAX or NumPy arrays in its attributes (a plain class's
    arrays would be compiled in as constants, a later ``op.M = M2`` silently ignored; an
    unregistered frozen dataclass's are unhashable) or that is unhashable.
    """

    name = "operator"

    def _missing(self, method: str, why: str):
        return NotImplementedError(f"{type(self).__name__} must implement {method} ({why})")

    def forward(self, x: Array) -> Array:
        raise self._missing("forward(x)", "A x")

    def adjoint(self, y: Array) -> Array:
        raise self._missing("adjoint(y)", "A^T y")

    def pinv(self, y: Array) -> Array:
        raise self._missing("pinv(y)", "A^+ y")

    def norm_sq(self) -> Array:
        """``||A||^2`` (largest squared singular value): gradient steps on ``||y - A x||^2 / 2``
        are stable for step sizes below ``2 / ||A||^2``. Needed by ``flowdps`` only."""
        # (an empty NotImplementedError was all flowdps said for an operator without it)
        raise self._missing("norm_sq()", "||A||^2, which sets flowdps's step size")

    def range_projection(self, y: Array) -> Array:
        """The orthogonal projection of ``y`` onto the range of ``A`` (``A A^+ y`` with the exact
        pseudo-inverse; ``A^T`` annihilates what it removes). The default ``forward(pinv(y))``
        is exact where ``pinv`` is; operators with a truncated ``pinv`` override it."""
        return self.forward(self.pinv(y))

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def project(self, x: Array, y: Array) -> Array:
        """``A^+ y + (I - A^+ A) x``: the point closest to ``x`` consistent with ``y`` (range-null
        space decomposition of DDNM, Wang et al. 2023)."""
        return x + self.pinv(y - self.forward(x))


# -- inpainting ------------------------------------------------------------------------------------
@_checked_pytree
@dataclasses.dataclass(frozen=True)
class Mask(Operator):
    """Inpainting: ``A x = m * x`` with a 0/1 mask ``m`` of the shape of one example.

    ``A`` is an orthogonal projection, so ``A^T = A^+ = A``.
    """

    mask: Array
    name: str = dataclasses.field(default="inpainting", metadata=dict(static=True))

    def __post_init__(self):
        # (the user's constructor only: JAX unflattens without it) a soft mask is no projection:
        # pinv / norm_sq / the range projections were silently wrong (A A+ A != A)
        # (a list skipped the 0/1 check, a tuple failed in astype; ints stay: vmap axis specs)
        if isinstance(self.mask, (list, tuple)):
            object.__setattr__(self, "mask", jnp.asarray(self.mask, jnp.float32))
        if isinstance(self.mask, (np.ndarray, jax.Array)) and not isinstance(self.mask, jax.core.Tracer):
            m = np.asarray(self.mask)
            if not np.all((m == 0) | (m == 1)):
                raise ValueError("Mask: mask must hold only 0 and 1 (inpainting keeps or drops pixels); got values "
                                 f"in [{m.min()}, {m.max()}]")

    def _check(self, x):
        # (a [4, 4, 3] mask on [B, 4, 4, 1] x returned [B, 4, 4, 3]; an [H, W] mask on [B, H, W, C]
        # broadcast against the channels: silently wrong shapes / pixels)
        m = jnp.shape(self.mask)
        ok = len(m) == x.ndim - 1 and all(a in (1, b) for a, b in zip(m, x.shape[1:]))
        if not ok:
            raise ValueError(f"Mask of shape {m} must match one example of x [B, ...] (or broadcast to it, "
                             f"axis by axis); got x of shape {tuple(x.shape)}")

    def _apply(self, x):
        # (the 0/1 mask is exact in any float dtype: a float32 mask promoted bfloat16 x to float32)
        self._check(x)
        # ([None]: an explicit batch axis, so it also runs under jax_numpy_rank_promotion='raise')
        return x * self.mask.astype(_out_dtype(x))[None]  # (an integer x times a float32 mask: float32)

    def forward(self, x):
        return self._apply(x)

    def adjoint(self, y):
        return self._apply(y)

    def pinv(self, y):
        return self._apply(y)  # (checked: an [H, W] mask broadcast over the wrong axes of [B, H, W, C])

    def norm_sq(self):
        # (a bool mask gave True)
        return jnp.max(self.mask).astype(jnp.promote_types(jnp.result_type(self.mask), jnp.float32))


def random_inpainting(key: Array, shape: tuple[int, ...], keep: float = 0.3, per_channel: bool = False) -> Mask:
    """Keep a random fraction ``keep`` of the pixels of examples shaped ``shape`` (``[H, W, C]``).

    The same pixels are dropped in every channel unless ``per_channel``. Channels last: a shape
    given channels first, ``(C, H, W)``, is read as ``H = C`` rows of ``W = H`` columns with ``W``
    channels, and drops whole rows instead of pixels."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must lie in (0, 1]; got {keep}")
    shape = _shape_arg("shape", shape, "(H, W, C) (one example's shape; or (H, W), or (D,) for vectors)")
    shape = tuple(check_int("shape entries", v) for v in shape)  # ((4.5, 4) failed inside jax.random.uniform)
    mshape = shape if per_channel or len(shape) < 3 else shape[:-1] + (1,)
    m = (jax.random.uniform(key, mshape) < keep).astype(jnp.float32)
    return Mask(jnp.broadcast_to(m, shape))


def box_inpainting(shape: tuple[int, int, int], top: int, left: int, height: int, width: int) -> Mask:
    """Drop the box ``[top:top+height, left:left+width]`` of ``[H, W, C]`` images."""
    top, left = check_int("top", top, 0), check_int("left", left, 0)
    height, width = check_int("height", height), check_int("width", width)
    shape = _shape_arg("shape", shape, "(H, W, C) (one image's shape)")
    if len(shape) != 3:  # ((4,) failed as "tuple index out of range")
        raise ValueError(f"shape must be (H, W, C) of one image; got {shape}")
    H, W = shape[0], shape[1]
    if not (0 <= top and 0 <= left and top + height <= H and left + width <= W and height > 0 and width > 0):
        raise ValueError(f"box ({top}, {left}, {height}, {width}) does not fit in images of shape {shape}")
    m = np.ones(shape, np.float32)
    m[top:top + height, left:left + width] = 0.0
    return Mask(jnp.asarray(m), name="box_inpainting")


# -- super-resolution --------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AvgPool(Operator):
    """Super-resolution by ``factor x factor`` average pooling of ``[B, H, W, C]`` images.

    ``A A^T = I / factor^2``, so ``A^+ = factor^2 A^T`` is nearest-neighbour upsampling."""

    factor: int = _static()
    name: str = dataclasses.field(default="super_resolution", metadata=dict(static=True))

    def __post_init__(self):  # (static, so this also holds when JAX unflattens; AvgPool(0) divided by zero)
        object.__setattr__(self, "factor", check_int("factor", self.factor))

    def _check_y(self, y):
        if y.ndim != 4:
            raise ValueError(f"AvgPool's adjoint / pinv need measurements y [B, H / factor, W / factor, C]; got shape "
                             f"{tuple(y.shape)}")

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"AvgPool needs images x [B, H, W, C]; got shape {x.shape}")
        B, H, W, C = x.shape
        f = self.factor
        if H % f or W % f:
            raise ValueError(f"image size {(H, W)} is not divisible by the pooling factor {f}")
        return x.reshape(B, H // f, f, W // f, f, C).mean(axis=(2, 4))

    def _up(self, y):
        self._check_y(y)
        f = self.factor
        return jnp.repeat(jnp.repeat(y, f, axis=1), f, axis=2)

    def adjoint(self, y):
        return self._up(y) / (self.factor**2)

    def pinv(self, y):
        return self._up(y)

    def norm_sq(self):
        return jnp.float32(1.0 / self.factor**2)


def super_resolution(factor: int = 2) -> AvgPool:
    """``factor``-times super-resolution by average pooling of ``[B, H, W, C]`` images (channels
    last: ``[B, C, H, W]`` latents would be pooled over C and H, with W read as the channels --
    refused only where C or H is not a multiple of ``factor``)."""
    return AvgPool(check_int("factor", factor))


# -- blur (circular convolution) -----------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Blur(Operator):
    """Circular convolution of ``[B, H, W, C]`` images with a kernel, in the Fourier domain.

    ``kernel_fft: [H, W]`` is the 2-D DFT of the zero-padded, centred kernel. Circular
    boundaries make ``A`` diagonal in Fourier space, so the adjoint (conjugate transfer
    function) is exact and the pseudo-inverse is the truncated one: ``1/K`` where
    ``|K| > max(rcond, 100 eps) * max|K|``, else 0 (below ``100 eps`` of the transfer function's
    precision a frequency is blocked up to rounding, as in :meth:`range_projection`; ``rcond`` trades exactness of ``A A^+ A = A`` on weak
    frequencies for stability under measurement noise, as a truncated SVD does). ``kernel_fft`` is
    complex128 if the operator is built under ``jax_enable_x64`` (for float64 work), else
    complex64."""

    kernel_fft: Array
    rcond: float = dataclasses.field(default=0.05, metadata=dict(static=True))
    name: str = dataclasses.field(default="blur", metadata=dict(static=True))

    def __post_init__(self):
        # (rcond is static, so this also holds when JAX unflattens the pytree) rcond >= 1 or NaN kept
        # no frequency and a negative one every frequency: pinv silently 0, or 1/K on K ~ 0
        r = concrete_real(self.rcond)  # (None for a bool: np.True_ ran as 1.0)
        if r is None or not 0.0 <= r < 1.0:
            raise ValueError(f"{self.name}: rcond must be a float in [0, 1); got {self.rcond!r}")
        object.__setattr__(self, "rcond", r)  # (a concrete JAX / NumPy scalar as a Python float: static, hashable)

    def _apply(self, x, transfer):
        if x.ndim != 4 or x.shape[1:3] != transfer.shape:
            raise ValueError(f"Blur acts on images [B, H, W, C] with (H, W) = {tuple(transfer.shape)}; "
                             f"got x of shape {tuple(x.shape)}")
        X = jnp.fft.fft2(x, axes=(1, 2))
        transfer = transfer.astype(X.dtype)
        return jnp.real(jnp.fft.ifft2(X * transfer[None, :, :, None], axes=(1, 2))).astype(_out_dtype(x))

    def forward(self, x):
        return self._apply(x, self.kernel_fft)

    def adjoint(self, y):
        return self._apply(y, jnp.conj(self.kernel_fft))

    def pinv(self, y):
        k = self.kernel_fft
        mag2 = jnp.real(k * jnp.conj(k))
        # (a floor, as range_projection's: with rcond = 0 a frequency that is zero up to the FFT's
        # rounding, 5.6e-17 for a 2-tap kernel on an even image, was inverted to 1e16)
        keep = mag2 > jnp.maximum(self.rcond**2, _zero_frequency(k)) * jnp.max(mag2)
        inv = jnp.where(keep, jnp.conj(k) / jnp.where(keep, mag2, 1.0), 0.0)
        return self._apply(y, inv)

    def norm_sq(self):
        return jnp.max(jnp.real(self.kernel_fft * jnp.conj(self.kernel_fft)))

    def range_projection(self, y):
        """Keeps every frequency the kernel passes (``|K| > 100 eps max|K|``, zero up to rounding
        below), not only those ``pinv`` keeps."""
        mag2 = jnp.real(self.kernel_fft * jnp.conj(self.kernel_fft))
        blocked = mag2 > _zero_frequency(self.kernel_fft) * jnp.max(mag2)
        return self._apply(y, blocked.astype(self.kernel_fft.dtype))


def _zero_frequency(kernel_fft: Array) -> float:
    """``|K|^2 / max|K|^2`` below which a frequency counts as blocked: ``|K| < 100 eps max|K|`` in
    the transfer function's precision (1.2e-5 in complex64, 2.2e-14 in complex128: a fixed 1e-5
    dropped real frequencies of float64 work)."""
    return float(100.0 * jnp.finfo(kernel_fft.dtype).eps) ** 2


def _kernel_to_fft(kernel: np.ndarray, image_shape, normalize: bool = True) -> Array:
    image_shape = _shape_arg("image_shape", image_shape, "(H, W) (the image size)")
    if len(image_shape) != 2:
        raise ValueError(f"image_shape must be (H, W); got {image_shape}")
    H, W = (check_int("image_shape entries", v) for v in image_shape)  # ((4.5, 4) was truncated to (4, 4))
    kh, kw = kernel.shape
    if kh > H or kw > W:
        raise ValueError(f"kernel of shape {kernel.shape} is larger than the image {(H, W)}")
    pad = np.zeros((H, W), np.float64)
    pad[:kh, :kw] = kernel / kernel.sum() if normalize else kernel
    pad = np.roll(pad, (-(kh // 2), -(kw // 2)), axis=(0, 1))  # centre the kernel at (0, 0)
    # complex128 when built under jax_enable_x64 (complex64 capped float64 checks at ~2e-8; a blur
    # built outside x64 keeps complex64: build it under x64 for float64 work); each use casts it to
    # the image's own complex width
    return jnp.asarray(np.fft.fft2(pad), jnp.complex128 if jax.config.jax_enable_x64 else jnp.complex64)


def kernel_blur(image_shape: tuple[int, int], kernel, rcond: float = 0.05, normalize: bool = True) -> Blur:
    """Circular convolution with a kernel of your own (a measured point-spread function, say).

    ``kernel: [kh, kw]`` (at most the image size ``(H, W)``) is centred at ``(kh // 2, kw // 2)``:
    ``(A x)[i, j] = sum_{m, n} k[m, n] x[i - m + kh // 2, j - n + kw // 2]`` with indices modulo
    ``(H, W)`` -- a convolution, not a correlation, which differ for a kernel that is not
    point-symmetric. ``normalize`` divides the kernel by its sum (a blur keeps the mean
    brightness); pass ``False`` for a kernel summing to 0 (a derivative filter)."""
    k = np.asarray(kernel, np.float64)
    if k.ndim != 2 or 0 in k.shape:
        raise ValueError(f"kernel must be a non-empty 2-D array [kh, kw]; got shape {k.shape}")
    if not np.all(np.isfinite(k)):
        raise ValueError("kernel must be finite")
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"normalize must be a bool; got {type(normalize).__name__}")
    if not np.any(k):
        raise ValueError("kernel is all zeros: it observes nothing")
    if normalize and not abs(k.sum()) > 0:
        raise ValueError("kernel sums to 0: it cannot be normalized; pass normalize=False")
    return Blur(_kernel_to_fft(k, image_shape, normalize=normalize), rcond=rcond, name="kernel_blur")


def gaussian_blur(image_shape: tuple[int, int], sigma: float = 1.0, size: int | None = None,
                  rcond: float = 0.05) -> Blur:
    """Gaussian blur of std ``sigma`` pixels on ``[H, W]`` images (kernel ``size`` x ``size``, ``size``
    odd: an even kernel has no centre pixel)."""
    if not sigma > 0 or not np.isfinite(sigma):  # (NaN passed `sigma <= 0`: a NaN operator)
        raise ValueError(f"sigma must be a finite float > 0; got {sigma}")
    # (size=0 fell back to the default, -1 built the zero operator and 2.5 became 3)
    size = int(2 * np.ceil(2 * sigma) + 1) if size is None else check_int("size", size)
    if size % 2 == 0:  # (size 4 cut the kernel on one side: a blur shifted by 0.12 pixel, not symmetric)
        raise ValueError(f"size must be odd (the kernel is centred on a pixel); got {size}")
    r = np.arange(size) - size // 2
    k = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / sigma**2)
    return Blur(_kernel_to_fft(k, image_shape), rcond=rcond, name="gaussian_blur")


def motion_blur(image_shape: tuple[int, int], length: int = 3, angle: float = 0.0, rcond: float = 0.05) -> Blur:
    """Linear motion blur along a line at ``angle`` degrees, anti-aliased: ``8 length`` points spaced
    evenly from ``-(length - 1) / 2`` to ``(length - 1) / 2`` pixels about the centre, each splatted
    bilinearly. The end centres are ``length - 1`` pixels apart and the end pixels get about half
    weight: horizontally, ``length=3`` is close to the ``[1, 2, 1] / 4`` filter (std 0.72 pixel, a
    3-pixel box's is 0.82), and ``length=2`` blurs little (std 0.52)."""
    length = check_int("length", length)
    if concrete_real(angle) is None or not np.isfinite(concrete_real(angle)):
        raise ValueError(f"angle must be a finite real (degrees); got {angle!r}")
    size = length if length % 2 else length + 1
    k = np.zeros((size, size))
    c = size // 2
    th = np.deg2rad(angle)
    for s in np.linspace(-(length - 1) / 2, (length - 1) / 2, 8 * length):
        x, y = c + s * np.cos(th), c - s * np.sin(th)
        i0, j0 = int(np.floor(y)), int(np.floor(x))
        for di in (0, 1):
            for dj in (0, 1):
                i, j = i0 + di, j0 + dj
                if 0 <= i < size and 0 <= j < size:
                    k[i, j] += (1 - abs(y - i)) * (1 - abs(x - j))
    return Blur(_kernel_to_fft(k, image_shape), rcond=rcond, name="motion_blur")


# -- compressed sensing ----------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Matrix(Operator):
    """``y = M vec(x)`` with a dense ``M: [m, D]`` (compressed sensing); ``x: [B, *x_shape]``
    with ``prod(x_shape) = D``, ``y: [B, m]``. ``matrix_pinv: [D, m]`` is precomputed by SVD."""

    matrix: Array
    matrix_pinv: Array
    x_shape: tuple = _static()
    sq_norm: Array | float | None = None  # ||M||_2^2; None: computed from M (1.0 made flowdps diverge)
    name: str = dataclasses.field(default="compressed_sensing", metadata=dict(static=True))

    def __post_init__(self):  # (a list x_shape passed forward, then failed in adjoint / pinv: tuple + list)
        shape = (self.x_shape,) if isinstance(self.x_shape, (int, np.integer)) else tuple(self.x_shape)
        object.__setattr__(self, "x_shape", shape)
        if isinstance(self.sq_norm, (int, float)) and not isinstance(self.sq_norm, bool):
            # an array leaf: a Python float is static under eqx.filter_jit, so each new matrix
            # compiled the posterior samplers anew (~3.5 s each on a CPU)
            object.__setattr__(self, "sq_norm", jnp.asarray(self.sq_norm, jnp.result_type(float)))
        m, mp = (getattr(a, "shape", None) for a in (self.matrix, self.matrix_pinv))
        if m is not None and mp is not None and len(m) == 2:  # (unflattened pytrees may hold other leaves)
            d = int(np.prod(shape))
            if m[1] != d or tuple(mp) != (m[1], m[0]):  # (a mismatch failed later, in a dot_general)
                raise ValueError(f"Matrix needs matrix [m, D], matrix_pinv [D, m] and prod(x_shape) = D; got "
                                 f"{tuple(m)}, {tuple(mp)} and x_shape {shape}")

    def forward(self, x):
        if tuple(x.shape[1:]) != tuple(self.x_shape):  # (a flat x of the same size passed, and A^T
            # then returned [B, *x_shape]: broadcasting / scan-carry errors deep in the samplers)
            raise ValueError(f"Matrix acts on x [B, *x_shape] with x_shape={tuple(self.x_shape)}; got x of shape "
                             f"{tuple(x.shape)}")
        # (full-precision products: an exact operator; see genflow._precision)
        return matmul(flat_batch(x), self.matrix.T).astype(_out_dtype(x))  # (bfloat16 stays bfloat16)

    def _check_y(self, y):
        m = self.matrix.shape[0]
        if y.ndim != 2 or y.shape[1] != m:
            raise ValueError(f"Matrix's adjoint / pinv need measurements y [B, {m}]; got shape {tuple(y.shape)}")

    def adjoint(self, y):
        self._check_y(y)
        return matmul(y, self.matrix).reshape((y.shape[0],) + self.x_shape).astype(_out_dtype(y))

    def pinv(self, y):
        self._check_y(y)
        return matmul(y, self.matrix_pinv.T).reshape((y.shape[0],) + self.x_shape).astype(_out_dtype(y))

    def norm_sq(self):
        dt = jnp.promote_types(self.matrix.dtype, jnp.float32)  # (float64 under x64: float32 capped checks at 1e-6)
        if self.sq_norm is None:
            return (jnp.linalg.norm(self.matrix.astype(dt), 2) ** 2).astype(dt)
        return jnp.asarray(self.sq_norm, dt)


def compressed_sensing(key: Array, x_shape: tuple[int, ...], num_measurements: int) -> Matrix:
    """A Gaussian sensing matrix ``[num_measurements, prod(x_shape)]`` with entries ``N(0, 1/m)``."""
    num_measurements = check_int("num_measurements", num_measurements)
    x_shape = tuple(check_int("x_shape entries", d) for d in ((x_shape,) if isinstance(x_shape, int) else x_shape))
    dim = int(np.prod(x_shape))
    M = np.asarray(jax.random.normal(key, (num_measurements, dim)), np.float64) / np.sqrt(num_measurements)
    dt = jnp.result_type(float)  # (float64 under jax_enable_x64, as Blur's transfer functions)
    return Matrix(jnp.asarray(M, dt), jnp.asarray(np.linalg.pinv(M), dt), x_shape,
                  jnp.asarray(np.linalg.norm(M, 2) ** 2, dt))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Identity(Operator):
    """Denoising: ``A = I``."""

    name: str = dataclasses.field(default="denoising", metadata=dict(static=True))

    def forward(self, x):
        return x

    def adjoint(self, y):
        return y

    def pinv(self, y):
        return y

    def norm_sq(self):
        return jnp.float32(1.0)


def denoising() -> Identity:
    """The identity operator ``y = x + noise`` (denoising as an inverse problem)."""
    return Identity()


# -- noise models --------------------------------------------------------------------------------------
def _levels_ok(value, low: float, strict: bool = False) -> bool:
    """Whether a concrete noise level (a scalar or every entry of an array) is real, finite and
    above ``low`` (``>=``, or ``>`` if ``strict``); traced values pass. (An array or a complex value
    skipped the check: PoissonNoise([5, -1]) sampled all-ones measurements in its second column.)"""
    if isinstance(value, jax.core.Tracer):
        return True
    try:
        v = np.asarray(value)
    except (TypeError, ValueError):
        return True  # (other leaves of an unflattened pytree)
    if v.dtype == object:
        return True
    # (JAX's dtype lattice: NumPy's does not know bfloat16 / float8, which were then refused)
    if not (jnp.issubdtype(v.dtype, jnp.floating) or jnp.issubdtype(v.dtype, jnp.integer)):
        return False  # (complex, bool)
    v = v.astype(np.float64)
    return bool(np.all(np.isfinite(v) & ((v > low) if strict else (v >= low)) ))


@_checked_pytree
@dataclasses.dataclass(frozen=True)
class GaussianNoise:
    """``y = A x + sigma n``, ``n ~ N(0, I)``; ``-log p(y | x) = ||y - A x||^2 / (2 sigma^2) + c``."""

    sigma: Array | float

    def __post_init__(self):
        # (the user's constructor only: JAX unflattens without it) a NaN or negative sigma sampled
        # garbage measurements and a NaN data term without a word
        if not _levels_ok(self.sigma, 0.0):
            raise ValueError(f"GaussianNoise: sigma must be a finite real >= 0; got {self.sigma!r}")

    def sample(self, key: Array, clean: Array) -> Array:
        dt = _out_dtype(clean)  # (an integer clean failed inside jax.random.normal)
        return clean.astype(dt) + self.sigma * jax.random.normal(key, clean.shape, dt)

    def residual_norm(self, y: Array, pred: Array) -> Array:
        """``||y - A x0||`` per example: the distance DPS steps on. Returns ``[B]`` (in at least float32)."""
        r = flat_batch(_wide(y) - _wide(pred))
        return jnp.sqrt(jnp.sum(r * r, axis=-1) + 1e-12)

    def nll(self, y: Array, pred: Array) -> Array:
        """``||y - A x0||^2 / (2 sigma^2)`` per example (needs ``sigma > 0``: inf / NaN at 0). ``[B]``
        (in at least float32)."""
        r = flat_batch(_wide(y) - _wide(pred))
        return 0.5 * jnp.sum(r * r, axis=-1) / (self.sigma**2)

    def curvature(self):
        """Largest second derivative of ``residual_norm^2 / 2`` in ``pred``: 1."""
        return 1.0


_NORMAL_COUNTS = 1e4  # PoissonNoise draws counts of at least this mean from the normal limit


@_checked_pytree
@dataclasses.dataclass(frozen=True)
class PoissonNoise:
    """Shot noise on images in [-1, 1]: counts ``k ~ Poisson(rate * (A x + 1) / 2)``, reported
    as ``y = 2 k / rate - 1``. DPS (Chung et al. 2023, eq. 20) steps on the Gaussian
    approximation ``||y - A x||_Lambda`` with ``Lambda_ii = 1 / (2 y_i)`` on the [0, 1] scale.

    Known limitation at high rates: a dark pixel (``y_i <= 1 / rate``) has the weight ``rate / 2``,
    so on mostly dark images (digits) DPS's gradient, and so its step, grows like
    ``sqrt(rate / 2)``, and FlowDPS's step (set by that largest weight) barely moves the bright
    pixels. Measured on the inverse notebook's 8x8 digits prior (denoising, 100 steps, default
    ``scale``): DPS 18.0 dB at rate 100 against 24.7 dB with ``GaussianNoise(0.1)`` on the same
    ``y``, and diverging samples (9.3 dB) at rate 1000; dividing ``scale`` by ``sqrt(rate / 2)``
    gave 15.2 dB there. Tune ``scale`` with the rate.

    Counts of mean ``lam >= 1e4`` are drawn from the Poisson's normal limit, ``round(N(lam, lam))``
    (its skewness there is ``1 / sqrt(lam) <= 0.01``): ``jax.random.poisson`` draws int32 counts
    without ``jax_enable_x64``, which saturated past ``2**31 - 1`` (rate 2.5e9 sampled 0.718 for
    a clean 0.9), and computes large ones in float32, with a spread right to 0.1% up to counts of
    ``1e5``, 1% too wide at ``1e6`` and 5-30% off from ``3e6`` up (measured with JAX 0.10; the mean
    stays right). Any finite rate > 0 works; ``GaussianNoise(0.0)`` is the noise-free limit."""

    rate: Array | float

    def __post_init__(self):
        # (as GaussianNoise's) rate = -1 sampled all-ones measurements, rate = 0 NaN
        if not _levels_ok(self.rate, 0.0, strict=True):
            raise ValueError(f"PoissonNoise: rate must be a finite real > 0; got {self.rate!r}")

    def sample(self, key: Array, clean: Array) -> Array:
        lam = self.rate * jnp.clip((_wide(clean) + 1.0) / 2.0, 0.0, None)
        large = lam >= _NORMAL_COUNTS
        small = jax.random.poisson(key, jnp.where(large, 0.0, lam)).astype(lam.dtype)  # (key itself: as before)
        z = jax.random.normal(jax.random.fold_in(key, 1), lam.shape, lam.dtype)
        normal = jnp.maximum(jnp.round(lam + jnp.sqrt(lam) * z), 0.0)
        # (an integer clean gives a float measurement, as GaussianNoise's)
        return (2.0 * jnp.where(large, normal, small) / self.rate - 1.0).astype(_out_dtype(clean))

    def residual_norm(self, y: Array, pred: Array) -> Array:
        y01, p01 = (_wide(y) + 1.0) / 2.0, (_wide(pred) + 1.0) / 2.0
        w = 1.0 / (2.0 * jnp.maximum(y01, 1.0 / self.rate))
        r = flat_batch((y01 - p01) ** 2 * w)
        return jnp.sqrt(jnp.sum(r, axis=-1) + 1e-12)

    def curvature(self):
        """Largest second derivative of ``residual_norm^2 / 2`` in ``pred``: ``w / 4`` with the
        largest weight ``w = rate / 2`` (a dark pixel, ``y01 <= 1 / rate``)."""
        return self.rate / 8.0

    def nll(self, y: Array, pred: Array) -> Array:
        """Poisson negative log-likelihood of the counts ``k = rate * (y + 1) / 2`` given the means
        ``lam = rate * (A x0 + 1) / 2`` (``pred = A x0``), summed per example, without the constant
        ``sum log k!``: ``sum_i lam_i - k_i log lam_i``, ``lam`` floored at ``1e-6 rate`` (a pixel
        predicted at or below -1 would give ``log 0``). ``y, pred: [B, ...]`` -> ``[B]`` (in at least float32)."""
        lam = self.rate * jnp.clip((_wide(pred) + 1.0) / 2.0, 1e-6, None)
        k = self.rate * (_wide(y) + 1.0) / 2.0
        return jnp.sum(flat_batch(lam - k * jnp.log(lam)), axis=-1)
