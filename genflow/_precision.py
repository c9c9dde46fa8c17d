"""Matrix products at full float32 precision on every backend.

XLA's default precision for a float32 ``dot_general`` is TF32 on NVIDIA Ampere / Hopper GPUs (a
10-bit mantissa: ~5e-4 relative error per product) and bfloat16 passes on TPUs. That is the
right trade for network layers, and wrong for the few products genflow treats as exact: the
oracles' closed forms, the exact dense operators of inverse problems, invertible 1x1
convolutions (their inverse and log-determinant) and Gram-form distances. Emulated TF32 (operands
truncated to 10 mantissa bits on a CPU) gave: a Glow 1x1 convolution's round trip off by 0.19
relative at condition number 7e4, the Gaussian oracle's score off by 8e-3 and its log-density
by 0.09 nats, ``A x_hat = y`` after DDNM's projection off by 2e-3, and ``mmd`` of near-duplicate
sets off by 28% (a precision audit). These products are small next to a network's, so asking
for full precision costs little. (On a CPU every float32 product is full precision anyway.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def wide(a) -> jax.Array:
    """``a`` in float32 or wider (float64 stays): for the sums, reductions and factorizations that
    bfloat16 / float16 cannot hold -- a bfloat16 ELBO of ~3e4 nats has a spacing of 128, a float16
    per-example noise model's sum over a 256 x 256 x 3 image overflows, and ``inv`` / ``slogdet`` /
    QR / LU have no half-precision kernels."""
    a = jnp.asarray(a)
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))
