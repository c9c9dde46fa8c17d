"""The linear-Gaussian oracle: exact posterior of ``x ~ N(mu, C)`` given ``y = A x + sigma n``.

``Sigma_post = (C^-1 + A^T A / sigma^2)^-1``, ``mu_post = Sigma_post (C^-1 mu + A^T y / sigma^2)``,
computed in the stable form ``mu_post = mu + C A^T (A C A^T + sigma^2 I)^-1 (y - A mu)``,
``Sigma_post = C - C A^T (A C A^T + sigma^2 I)^-1 A C`` (no inverse of ``C``, works for
``sigma = 0``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from genflow.inverse.operators import Operator

Array = jax.Array

__all__ = ["linear_gaussian_posterior", "operator_matrix"]


def operator_matrix(op: Operator, x_shape: tuple[int, ...]) -> np.ndarray:
    """The dense matrix ``[m, D]`` of a linear operator acting on examples of shape ``x_shape``
    (by applying it to the standard basis; for small problems and tests)."""
    d = int(np.prod(x_shape))
    # (in the default float: a float32 basis capped float64 checks at ~1e-8, 1/9 read 0.1111111119)
    basis = jnp.eye(d, dtype=jnp.result_type(float)).reshape((d,) + tuple(x_shape))
    cols = np.asarray(op.forward(basis), np.float64).reshape(d, -1)
    return cols.T


def linear_gaussian_posterior(mean, cov, A, y, noise_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior ``(mean [D], cov [D, D])`` (float64) for ``y: [m]`` and ``A: [m, D]``."""
    mu, C, A, y = (np.asarray(v, np.float64) for v in (mean, cov, A, y))
    C = 0.5 * (C + C.T)  # (a float32 covariance is symmetric only to ~1e-7: NumPy's samplers warn)
    S = A @ C @ A.T + noise_std**2 * np.eye(A.shape[0])
    # C A^T S^+: the pseudo-inverse covers sigma = 0 with a rank-deficient A (a mask's zero rows,
    # a blur's zero frequencies make S singular; y has no component outside its range)
    K = (np.linalg.pinv(S, hermitian=True) @ (A @ C)).T
    P = C - K @ A @ C
    return mu + K @ (y - A @ mu), 0.5 * (P + P.T)
