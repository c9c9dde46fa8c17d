"""Predictor-corrector sampling with a Langevin corrector (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", Alg. 2-5).

At each grid time ``s`` the corrector runs ``corrector_steps`` Langevin steps on ``p_s``,

    x <- x + e score(x, s) + sqrt(2 e) z,    e = 2 a (snr ||z|| / ||score||)^2,

with the signal-to-noise step rule (``a = alpha_s^2 / alpha_t^2``, which is score_sde's
``alpha_i = 1 - beta_i`` for VP paths and 1 for VE), then the predictor takes one Euler-Maruyama
step of the reverse SDE ``dx = [f x - g^2 score] dt + g dW`` to the next time ``t``; the last
predictor step returns its mean (score_sde's ``noise_removal``). As in score_sde, the norms are
per-sample norms averaged over the batch: per-sample ratios ``||z|| / ||score||`` are heavy-tailed
in low dimensions (the step diverges for samples with a small score).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from genflow._checks import check_int, flat_batch, real_or_traced
from genflow.sampling._driver import Stepper, scan_stages, x_init
from genflow.sampling._exp import finite_or, sqrt0

Array = jax.Array


def _norm(v: Array) -> Array:
    return jnp.sqrt(jnp.sum(flat_batch(v) ** 2, axis=-1)).reshape((-1,) + (1,) * (v.ndim - 1))


def langevin_correct(model, x: Array, t, key: Array, *, snr: float = 0.16, steps: int = 1,
                     alpha_ratio=1.0) -> Array:
    """``steps`` Langevin corrector steps at time ``t`` with the SNR step rule; ``x: [B, ...]``.

    ``x <- x + e score + sqrt(2 e) z`` with ``e = 2 alpha_ratio (snr mean||z|| / mean||score||)^2``
    (Song et al. 2021, Alg. 4-5; means over the batch). ``model``: a
    :class:`genflow.sampling.Model` (``gf.sampling.Model(fn, path, prediction)``). ``snr`` and
    ``alpha_ratio`` are reals >= 0 (traced values pass unchecked); ``alpha_ratio`` scales the
    step: Song et al.'s ``alpha_i`` of VP SDEs, which the ``pc`` solver passes as
    ``(alpha(s) / alpha(t))^2`` of the step just taken (1 for VE)."""
    from genflow.sampling._model import Model

    if not isinstance(model, Model):  # (a plain function or an oracle model failed as an AttributeError)
        raise TypeError(f"model must be a gf.sampling.Model(fn, path, prediction); got {type(model).__name__}")
    steps = check_int("steps", steps, 0)  # (-1 failed in MLIR, 2.5 as a bare TypeError)
    for name, value in (("snr", snr), ("alpha_ratio", alpha_ratio)):  # (-1 / NaN gave all-NaN samples silently)
        v = real_or_traced(name, value, "a finite real >= 0")  # (None for a traced value: it passes, as a jax.Array)
        if v is not None and not (math.isfinite(v) and v >= 0.0) or v is None and not isinstance(value, jax.Array):
            raise ValueError(f"{name} must be a finite real >= 0; got {value!r}")

    def body(x, k):
        return _langevin_update(x, model.predict(x, t, "score"), jax.random.normal(k, x.shape, x.dtype), snr,
                                alpha_ratio), None

    x, _ = jax.lax.scan(body, x, jax.random.split(key, steps))
    return x


def _langevin_update(x: Array, score: Array, z: Array, snr, alpha_ratio) -> Array:
    """One Langevin step ``x + e score + sqrt(2 e) z`` with the SNR step rule (:func:`langevin_correct`)."""
    step = 2.0 * alpha_ratio * (snr * jnp.mean(_norm(z)) / jnp.maximum(jnp.mean(_norm(score)), 1e-12)) ** 2
    return (x + step * score + jnp.sqrt(2.0 * step) * z).astype(x.dtype)


def _pc_scalars(g, st, i, **_):
    dt = g.t[i] - g.t[i + 1]
    return {"s": g.t[i], "ratio": (g.a[i] / g.a[i + 1]) ** 2, "dt": dt, "last": i == g.n - 1,
            "g": sqrt0(finite_or(g.g2[i], 0.0) * dt)}  # (g2 = inf at sigma = 0: a padded dt = 0 gave inf * 0)


def _pc_step(model, carry, c, key, *, snr: float = 0.16, corrector_steps: int = 1):
    if key is None:
        raise ValueError("the predictor-corrector sampler is stochastic: pass key=jax.random.key(...)")
    kc, kp = jax.random.split(key)
    x = carry["x"]

    def predict(x, drift, z):  # the reverse-SDE step to t, its mean at the last step
        mean = x - drift * c["dt"]
        return jnp.where(c["last"], mean, mean + c["g"] * z).astype(x.dtype)

    if not scan_stages(model):  # a small network: the corrector's scan, then the predictor's call
        if corrector_steps > 0:
            x = langevin_correct(model, x, c["s"], kc, snr=snr, steps=corrector_steps, alpha_ratio=c["ratio"])
        return {"x": predict(x, model.reverse_drift(x, c["s"]), jax.random.normal(kp, x.shape, x.dtype))}, \
            1 + corrector_steps
    # corrector_steps Langevin steps, then the predictor, in one scan over the evaluations (the
    # network traced once): each evaluation's output gives the corrector its score, the predictor
    # its reverse drift (as langevin_correct and Model.reverse_drift, with the same keys)
    keys = jnp.concatenate([jax.random.split(kc, corrector_steps), kp[None]])
    last = jnp.arange(corrector_steps + 1) == corrector_steps

    def one(x, inp):
        k, pred = inp
        score, drift = model.score_and_reverse_drift(x, c["s"])
        z = jax.random.normal(k, x.shape, x.dtype)
        return jnp.where(pred, predict(x, drift, z), _langevin_update(x, score, z, snr, c["ratio"])), None

    x, _ = jax.lax.scan(one, x, (keys, last))
    return {"x": x}, 1 + corrector_steps


pc = Stepper(x_init, _pc_scalars, _pc_step)
