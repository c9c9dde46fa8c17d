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

from genflow._checks import concrete_real
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
    """Exact posterior ``(mean [D], cov [D, D])`` (float64) of the prior ``N(mean [D], cov [D, D])``
    given one example's measurements ``y: [m]`` of ``A: [m, D]`` with noise std ``noise_std >= 0``.
    ``y`` may also be one row ``[1, ...]`` of the samplers' ``y [B, ...]`` (flattened in C order, as
    :func:`operator_matrix`'s rows); for a batch, call it per row (the covariance is the same)."""
    mu, C, A, y = (np.asarray(v, np.float64) for v in (mean, cov, A, y))
    # (a y of shape [3, 1] broadcast into a [3, 3] "mean"; a wrong y length or cov size failed deep
    # inside NumPy; a negative noise_std was squared away)
    if mu.ndim != 1:
        raise ValueError(f"mean must be a vector [D]; got shape {mu.shape}")
    D = mu.shape[0]
    if C.shape != (D, D):
        raise ValueError(f"cov must be [D, D] = {(D, D)} for a mean of shape [D] = {mu.shape}; got shape {C.shape}")
    if A.ndim != 2 or A.shape[1] != D:
        raise ValueError(f"A must be a matrix [m, D] with D = {D} (the mean's size); got shape {A.shape}")
    m = A.shape[0]
    if y.ndim >= 2 and y.shape[0] == 1 and y.size == m:
        y = y.reshape(m)  # (one row [1, ...] of a batch)
    if y.shape != (m,):
        raise ValueError(f"y must be one example's measurements, [m] = ({m},) (A's rows) or one row [1, ...] of "
                         f"{m} entries; got shape {y.shape} (for a batch y [B, ...], call it per row)")
    s = concrete_real(noise_std) if np.ndim(noise_std) == 0 else None
    if s is None or not (s >= 0.0 and np.isfinite(s)):
        raise ValueError(f"noise_std must be a finite real >= 0 (one std for every measurement); got {noise_std!r}")
    if not all(np.all(np.isfinite(v)) for v in (mu, C, A, y)):
        raise ValueError("mean, cov, A and y must be finite (no NaN or inf)")
    noise_std = s
    C = 0.5 * (C + C.T)  # (a float32 covariance is symmetric only to ~1e-7: NumPy's samplers warn)
    S = A @ C @ A.T + noise_std**2 * np.eye(A.shape[0])
    # C A^T S^+: the pseudo-inverse covers sigma = 0 with a rank-deficient A (a mask's zero rows,
    # a blur's zero frequencies make S singular; y has no component outside its range)
    K = (np.linalg.pinv(S, hermitian=True) @ (A @ C)).T
    P = C - K @ A @ C
    return mu + K @ (y - A @ mu), 0.5 * (P + P.T)
