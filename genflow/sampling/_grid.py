"""Time discretizations: decreasing grids ``t_0 = t_start > ... > t_N = t_end``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from genflow.paths import Path

Array = jax.Array

SCHEDULES = ("uniform", "quadratic", "logsnr", "karras")


def time_grid(path: Path, steps: int, schedule="uniform", t_start: float = 1.0, t_end: float | None = None,
              rho: float = 7.0) -> Array:
    """A decreasing grid of ``steps + 1`` times from ``t_start`` to ``t_end``.

    Args:
      path: the path (for log-SNR-based schedules and its default ``t_min``).
      steps: number of intervals (static).
      schedule: ``"uniform"`` (uniform in t), ``"quadratic"`` (uniform in sqrt(t): denser near
        data), ``"logsnr"`` (uniform in the log-SNR lambda), ``"karras"`` (uniform in
        ``sigma^(1/rho)`` with ``sigma = exp(-lambda/2)``, Karras et al. 2022), or an explicit
        array ``[steps + 1]`` (then ``steps``, ``t_start`` and ``t_end`` are checked against it).
      t_start, t_end: the endpoints (``t_end`` defaults to ``path.t_min``).
    Returns:
      ``[steps + 1]`` float32 times, ``ts[0] = t_start``, ``ts[-1] = t_end``.
    """
    t_end = path.t_min if t_end is None else t_end
    if not isinstance(schedule, str):
        ts = jnp.asarray(schedule, jnp.float32)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"an explicit schedule must be a 1-D array of at least 2 times; got shape {ts.shape}")
        try:
            tn = np.asarray(ts)
        except jax.errors.TracerArrayConversionError:
            return ts
        if not (np.all(np.diff(tn) < 0) and tn[0] <= 1.0 and tn[-1] >= 0.0):
            raise ValueError(f"an explicit schedule must be strictly decreasing within [0, 1]; got {tn}")
        return ts
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    if not 0.0 <= t_end < t_start <= 1.0:
        raise ValueError(f"expected 0 <= t_end < t_start <= 1; got t_start={t_start}, t_end={t_end}")
    u = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
    if schedule == "uniform":
        return t_start + (t_end - t_start) * u
    if schedule == "quadratic":
        a, b = np.sqrt(t_start), np.sqrt(t_end)
        return (a + (b - a) * u) ** 2
    if schedule in ("logsnr", "karras"):
        lam0, lam1 = path.log_snr(jnp.float32(t_start)), path.log_snr(jnp.float32(t_end))
        lam0 = jnp.maximum(lam0, -30.0)
        lam1 = jnp.minimum(lam1, 30.0)
        if schedule == "logsnr":
            lam = lam0 + (lam1 - lam0) * u
        else:
            s0, s1 = jnp.exp(-lam0 / (2 * rho)), jnp.exp(-lam1 / (2 * rho))
            lam = -2.0 * rho * jnp.log(s0 + (s1 - s0) * u)
        ts = path.t_from_log_snr(lam)
        return ts.at[0].set(t_start).at[-1].set(t_end)
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {list(SCHEDULES)} or an array of times")
