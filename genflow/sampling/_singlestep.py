"""Single-step solvers: several network evaluations per step, no history.

* DPM-Solver++ 2S / 3S (Lu et al. 2022, "DPM-Solver++", the single-step solvers of "DPM-Solver"
  Alg. 1-2 in data-prediction form, as in the reference code: ``tests/test_sampling_golden.py``;
  intermediate points at fractions ``r = 1/2`` and ``r = 1/3, 2/3`` of the step in lambda).
* EDM's Heun sampler with stochastic churn (Karras et al. 2022, "Elucidating the Design Space",
  Alg. 2), written for any path in the noise level ``rho = sigma / alpha`` and ``y = x / alpha``.
* Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"): EDM
  Heun steps, and at the grid's noise level nearest ``restart_interval[0]`` the state is
  re-noised to ``restart_interval[1]`` by the forward process and integrated back,
  ``restart_times`` times.

A step's network evaluations run in a ``lax.scan`` over its stages (:func:`stage_evals`), so a
network of many layers is traced and compiled once per step rule, not once per stage (as Diffrax
does for its Runge-Kutta stages): DPM-Solver++(3S)'s program held 3 copies of it, 2S's and EDM's
Heun's 2 (each compiled again). Restart keeps two, the regular step's and its restart loop's. A
network of few arrays is called stage after stage instead (:func:`genflow.sampling._driver.scan_stages`).

Endpoints (see :mod:`genflow.sampling._exp`): a step out of pure noise places its stages at
fractions of ``kappa = alpha / sigma`` and combines them with the Runge-Kutta rule of the same
order in kappa (midpoint; Heun's third-order rule), and EDM's trapezoid is taken in kappa; a
step into ``sigma = 0`` places its stages at fractions of ``u = sigma^2 / alpha^2`` and
extrapolates the data predictions to ``u = 0`` (EDM's sampler takes an Euler step there).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from genflow.sampling._driver import Stepper, scan_stages, x_init
from genflow.sampling._exp import combine, ddim_coefs, finite_or, lagrange_at_zero, nonzero, phi, sqrt0

Array = jax.Array


def stage_evals(model, x: Array, ts: Array, c_in: Array, *, eps: bool = False,
                active: Array | None = None) -> tuple[tuple[Array, ...], ...]:
    """The model's predictions at the ``K`` stages of one step: in one ``lax.scan`` over the stages
    (the network traced once, however many stages) for a network of many arrays
    (:func:`genflow.sampling._driver.scan_stages`), else stage after stage.

    Stage ``k`` evaluates ``model.x0_eps`` at time ``ts[k]`` on the state
    ``combine(c_in[k, 0], x, c_in[k, 1:], (D_0, ..., D_{K-1}[, E_0, ..., E_{K-1}]))``, where ``D_j`` /
    ``E_j`` are stage ``j``'s data / noise predictions (the ``E_j`` only with ``eps=True``). The
    weights of stages ``j >= k`` must be 0: the scan's buffers hold zeros until computed, so its sum
    is the one written with the earlier stages alone (adding exact zeros), which the stage-by-stage
    evaluation computes.

    Args:
      x: ``[B, ...]`` the state at the step's start.
      ts: ``[K]`` the stages' times.
      c_in: ``[K, 1 + K]`` (``[K, 1 + 2K]`` with ``eps=True``) the stages' input weights.
      active: ``[K]`` bool, or None (all): an inactive stage is skipped (``lax.cond``; its
        predictions are zero).
    Returns:
      ``(D_0, ..., D_{K-1})``, and with ``eps=True`` ``((D_0, ...), (E_0, ...))``; each ``[B, ...]``.
    """
    k, parts = ts.shape[0], 2 if eps else 1
    on = jnp.ones((k,), bool) if active is None else active
    # (zeros_like(x): inherits x's sharding and, under shard_map, its varying axes -- jnp.zeros has
    # neither, and the scan or the cond refused them)
    none = (jnp.zeros_like(x),) * parts

    def stage(xin, t, a):
        evaluate = lambda xin, t: model.x0_eps(xin, t)[:parts]  # noqa: E731
        if active is None:
            return evaluate(xin, t)
        return jax.lax.cond(a, evaluate, lambda xin, t: none, xin, t)

    if scan_stages(model):
        def body(buf, inp):
            j, t, c, a = inp
            xin = combine(c[0], x, c[1:], tuple(buf.reshape((parts * k,) + x.shape)))
            return jax.lax.dynamic_update_index_in_dim(buf, jnp.stack(stage(xin, t, a)), j, axis=1), None

        buf, _ = jax.lax.scan(body, jnp.stack([jnp.stack(none)] * k, axis=1), (jnp.arange(k), ts, c_in, on))
        out = tuple(tuple(buf[p, j] for j in range(k)) for p in range(parts))
    else:  # stage after stage, each combining the earlier ones only
        out = tuple([] for _ in range(parts))
        for j in range(k):
            cols = [1 + m + p * k for p in range(parts) for m in range(j)]
            xin = combine(c_in[j, 0], x, c_in[j, jnp.array(cols, int)] if cols else None,
                          [out[p][m] for p in range(parts) for m in range(j)])
            for p, v in enumerate(stage(xin, ts[j], on[j])):
                out[p].append(v)
        out = tuple(tuple(o) for o in out)
    return out if eps else out[0]


# -- DPM-Solver++ 2S / 3S ---------------------------------------------------------------------
def _fractions(order: int) -> tuple[float, ...]:
    return (0.5,) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)


def _single_stages(g, i, *, order: int = 2, **_):
    """Log-SNRs of the intermediate points at fractions ``r`` of the step: in lambda (regular), in
    ``kappa`` out of pure noise (``kappa = r kappa_t``), in ``u`` into clean data (``u = (1-r) u_s``)."""
    a_s, _, l_s = g.at(i)
    _, s_t, l_t = g.at(i + 1)
    start, end = a_s == 0, s_t == 0
    out = []
    for r in _fractions(order):
        out.append(jnp.where(start, finite_or(l_t, 0.0) + math.log(r),
                             jnp.where(end, finite_or(l_s, 0.0) - 0.5 * math.log(1.0 - r),
                                       l_s + r * nonzero(l_t - l_s))))
    return jnp.stack(out)


def _u(lam, fill):
    return finite_or(jnp.exp(-2.0 * lam), fill)


def _single_scalars(g, st, i, *, order: int = 2, **_):
    """Regular step (Lu et al. 2022, data prediction, ``solver_type='dpmsolver'``):
    2S: ``x_t = (sigma_t/sigma_s) x + alpha_t (1 - e^-h) D(x_s1)`` with ``x_s1`` the DDIM step to the
    log-SNR midpoint; 3S: ``x_t = DDIM_t(D_0) + (alpha_t h phi_2(-h) / r2) (D_2 - D_0)`` with the stage
    ``x_s2 = DDIM_s2(D_0) + alpha_s2 h2^2 phi_2(-h2) (D_1 - D_0) / (lambda_1 - lambda_s)``."""
    a_s, s_s, l_s = g.at(i)
    a_t, s_t, l_t = g.at(i + 1)
    start, end = a_s == 0, s_t == 0
    a1, s1, l1 = st.at(0)
    c_x, c1 = ddim_coefs(a_s, s_s, a_t, s_t)
    zero = jnp.zeros_like(c1)
    one = jnp.ones_like(c1)
    # stage inputs (stage_evals): x; the DDIM step to the first stage point; (3S) the second's
    rows = [jnp.stack([one] + [zero] * order), jnp.stack(list(ddim_coefs(a_s, s_s, a1, s1)) + [zero] * (order - 1))]
    times = [g.t[i], st.t[0]]
    if order == 2:
        c_d = jnp.where(end, a_t * lagrange_at_zero([_u(l_s, 2.0), _u(l1, 1.0)]), jnp.stack([zero, c1]))
    else:
        a2, s2, l2 = st.at(1)
        h2 = nonzero(l2 - l_s)
        c2 = jnp.where(start, a2, a2 * h2 * h2 * phi(-h2, 2) / nonzero(l1 - l_s))
        c2x, c2d = ddim_coefs(a_s, s_s, a2, s2)
        h = nonzero(l_t - l_s)
        # from pure noise: Heun's third-order rule in kappa, w_t = w_s + kappa_t (k1 + 3 k3) / 4
        c_f = jnp.where(start, 0.75 * a_t, a_t * h * phi(-h, 2) / _fractions(3)[1])
        us = [_u(l, 3.0 - j) for j, l in enumerate((l_s, l1, l2))]
        c_d = jnp.where(end, a_t * lagrange_at_zero(us), jnp.stack([c1 - c_f, zero, c_f]))
        rows.append(jnp.stack([c2x, c2d - c2, c2, zero]))
        times.append(st.t[1])
    # one step from pure noise straight to clean data: x = alpha_t D(x_s)
    c_d = jnp.where(start & end, jnp.zeros_like(c_d).at[0].set(a_t), c_d)
    return {"ts": jnp.stack(times), "c_in": jnp.stack(rows), "c_x": jnp.where(end, 0.0, c_x), "c_d": c_d}


def _single_step(model, carry, c, key, *, order: int = 2):
    del key
    x = carry["x"]
    return {"x": combine(c["c_x"], x, c["c_d"], stage_evals(model, x, c["ts"], c["c_in"]))}, order


def dpm_singlestep(order: int) -> Stepper:
    return Stepper(x_init, functools.partial(_single_scalars, order=order),
                   functools.partial(_single_step, order=order), stages=functools.partial(_single_stages, order=order))


# -- EDM Heun ---------------------------------------------------------------------------------
def _heun_coefs(t_hat, a_h, s_h, t, a_t, s_t) -> dict:
    """Heun step from ``t_hat`` to ``t`` (Karras et al. 2022, Alg. 1 lines 4-8), in ``y = x / alpha``
    and ``rho = sigma / alpha``: Euler ``x_e = alpha_t D_1 + sigma_t eps_1`` (= DDIM), then
    ``y_t = y + (rho_t - rho) (eps_1 + eps_2) / 2``; from pure noise the same trapezoid in
    ``w = x / sigma`` and ``kappa = alpha / sigma``; into ``sigma = 0`` the Euler step alone."""
    noise = a_h == 0
    c_rho = 0.5 * (s_t - a_t * s_h / nonzero(a_h))
    c_kap = 0.5 * (a_t - s_t * a_h / s_h)
    zero = jnp.zeros_like(c_rho)
    one = jnp.ones_like(c_rho)
    # stage inputs over (x; D_1, D_2, E_1, E_2): x, then the Euler step x_e = alpha_t D_1 + sigma_t E_1
    c_in = jnp.stack([jnp.stack([one, zero, zero, zero, zero]), jnp.stack([zero, a_t, zero, s_t, zero])])
    return {"ts": jnp.stack([t_hat, t]), "c_in": c_in, "correct": s_t > 0,
            "c_x": jnp.where(noise, s_t / s_h, a_t / nonzero(a_h)),
            "c": jnp.where(noise, jnp.stack([c_kap, c_kap, zero, zero]), jnp.stack([zero, zero, c_rho, c_rho]))}


def _heun_apply(model, x, hc):
    """Returns ``(x_t, nfe)``; the second evaluation is skipped (``lax.cond`` in :func:`stage_evals`)
    into ``sigma = 0``, where the step is the Euler step."""
    (d1, d2), (e1, e2) = stage_evals(model, x, hc["ts"], hc["c_in"], eps=True,
                                     active=jnp.stack([jnp.asarray(True), hc["correct"]]))
    x_euler = combine(hc["c_in"][1, 0], x, hc["c_in"][1, 1::2], (d1, e1))  # (stage 2's input)
    x_new = jnp.where(hc["correct"], combine(hc["c_x"], x, hc["c"], (d1, d2, e1, e2)), x_euler)
    return x_new, 1 + hc["correct"].astype(jnp.int32)


def _gamma(g, i, churn, s_tmin, s_tmax):
    a_s, _, l_s = g.at(i)
    rho = jnp.exp(-l_s)
    return jnp.where((a_s > 0) & (rho >= s_tmin) & (rho <= s_tmax), jnp.minimum(churn / g.n, math.sqrt(2.0) - 1.0), 0.0)


def _edm_stages(g, i, *, churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), **_):
    """``lambda_hat = lambda_s - log(1 + gamma)`` (noise level ``(1 + gamma) rho``), at most the start's."""
    gamma = _gamma(g, i, churn, s_tmin, s_tmax)
    return jnp.maximum(finite_or(g.l[i], 0.0) - jnp.log1p(gamma), g.l[0])[None]


def _edm_scalars(g, st, i, *, churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0, **_):
    """Churn (Alg. 2, lines 5-6): ``gamma = min(churn / N, sqrt(2) - 1)`` where ``s_tmin <= rho <= s_tmax``,
    ``rho_hat = (1 + gamma) rho``, ``y_hat = y + sqrt(rho_hat^2 - rho^2) S_noise z``."""
    a_s, s_s, l_s = g.at(i)
    up = _gamma(g, i, churn, s_tmin, s_tmax) > 0
    t_hat = jnp.where(up, st.t[0], g.t[i])
    a_h, s_h = jnp.where(up, st.a[0], a_s), jnp.where(up, st.s[0], s_s)
    rho = finite_or(jnp.exp(-l_s), 0.0)
    l_hat = _edm_stages(g, i, churn=churn, s_tmin=s_tmin, s_tmax=s_tmax)[0]  # (not the stage grid's: rounded)
    std = rho * sqrt0(jnp.expm1(2.0 * (finite_or(l_s, 0.0) - l_hat))) * s_noise
    noise = jnp.where(up, jnp.stack([a_h / nonzero(a_s), a_h * std]), jnp.stack([1.0, 0.0]))
    return {"churn": noise, "heun": _heun_coefs(t_hat, a_h, s_h, g.t[i + 1], *g.at(i + 1)[:2])}


def _edm_step(model, carry, c, key, *, churn: float = 0.0, **_):
    x = carry["x"]
    if churn > 0:
        if key is None:
            raise ValueError("EDM's Heun sampler with churn > 0 is stochastic: pass key=jax.random.key(...)")
        z = jax.random.normal(key, x.shape, x.dtype)
        x = combine(c["churn"][0], x, c["churn"][1:], (z,))
    x, nfe = _heun_apply(model, x, c["heun"])
    return {"x": x}, nfe


def _heun_denoise(t, a, s) -> dict:
    """Heun coefficients of a denoising step at ``t``: the Euler step into ``alpha = 1, sigma = 0``,
    ``x_e = 1 D_1 + 0 eps_1``, alone (the second evaluation skipped)."""
    return _heun_coefs(t, a, s, t, jnp.ones_like(a), jnp.zeros_like(s))


def _edm_denoise(row, t, a, s, i, **_):
    return {"churn": jnp.array([1.0, 0.0]), "heun": _heun_denoise(t, a, s)}


edm_heun = Stepper(x_init, _edm_scalars, _edm_step, stages=_edm_stages, denoise_row=_edm_denoise)


# -- Restart sampling -------------------------------------------------------------------------
# Defaults: the paper's CIFAR-10 (VP) setting, two restarts from 0.06 to 0.30 with three Heun steps
# back (Xu et al. 2023, released hyperparameters). On a 2-D Gaussian (vp_linear, 40 log-SNR steps,
# 93 NFE) the whitened sample covariance is off by at most 0.03; the earlier wide interval (0.1, 2)
# with four steps back and one restart (89 NFE) left 0.13, more than the plain ODE solve.
RESTART_INTERVAL, RESTART_STEPS, RESTART_TIMES = (0.06, 0.30), 3, 2


def _restart_stages(g, i, *, restart_interval=RESTART_INTERVAL, restart_steps: int = RESTART_STEPS, rho: float = 7.0,
                    **_):
    """The restart sub-grid: ``restart_steps + 1`` Karras levels from ``rho_hi`` down to ``rho_t``."""
    lo, hi = restart_interval
    if not 0.0 < lo < hi:
        raise ValueError(f"restart: restart_interval must be (lo, hi) with 0 < lo < hi; got {restart_interval}")
    l_hi = jnp.maximum(jnp.asarray(-math.log(hi), g.l.dtype), g.l[0])
    r_hi, r_t = jnp.exp(-l_hi), jnp.maximum(jnp.exp(-g.l[i + 1]), 1e-12)
    u = jnp.linspace(0.0, 1.0, restart_steps + 1)
    lev = (r_hi ** (1 / rho) + u * (r_t ** (1 / rho) - r_hi ** (1 / rho))) ** rho
    return (-jnp.log(lev)).at[0].set(l_hi)


def _restart_level(g, lo, hi) -> Array:
    """Index of the grid level where Restart restarts: of the levels after the start with
    ``0 < rho < hi``, the one nearest ``lo`` in ``log rho`` (the reference code takes the grid's
    nearest noise level too), or ``-1`` if there is none or the grid starts at or below ``lo``.
    A coarse grid that jumps from above ``lo`` straight to clean data still restarts, at its last
    positive level."""
    j = jnp.arange(g.l.shape[0])
    log_rho = -g.l  # log(sigma / alpha)
    ok = (j >= 1) & (j <= g.n) & (g.s > 0) & (log_rho < math.log(hi))
    dist = jnp.where(ok, jnp.abs(jnp.where(ok, log_rho, 0.0) - math.log(lo)), jnp.inf)
    passes = jnp.any(ok) & (log_rho[0] > math.log(lo))  # a grid that starts below lo has no restart
    return jnp.where(passes, jnp.argmin(dist), -1)


def _restart_scalars(g, st, i, *, restart_interval=RESTART_INTERVAL, **_):
    """A Heun step; on reaching the grid level nearest ``restart_interval[0]``
    (:func:`_restart_level`, in ``rho = sigma / alpha``): ``y <- y + sqrt(rho_hi^2 - rho_t^2) z``
    (the forward process up to ``rho_hi = restart_interval[1]``) and ``restart_steps`` Heun steps
    back on a Karras sub-grid (Xu et al. 2023, Alg. 1)."""
    lo, hi = restart_interval
    a_t, s_t, l_t = g.at(i + 1)
    rho_t = jnp.exp(-l_t)
    t_hi, a_hi, s_hi = st.t[0], st.a[0], st.s[0]
    r_hi = s_hi / nonzero(a_hi)
    do = (i + 1 == _restart_level(g, lo, hi)) & (t_hi > g.t[i + 1])
    # sub-grid: stage points, ending exactly on the grid point
    t_sub = st.t.at[-1].set(g.t[i + 1])
    a_sub, s_sub = st.a.at[-1].set(a_t), st.s.at[-1].set(s_t)
    sub = jax.vmap(_heun_coefs)(t_sub[:-1], a_sub[:-1], s_sub[:-1], t_sub[1:], a_sub[1:], s_sub[1:])
    noise = jnp.stack([a_hi / nonzero(a_t), a_hi * sqrt0(r_hi**2 - rho_t**2)])
    return {"heun": _heun_coefs(g.t[i], *g.at(i)[:2], g.t[i + 1], a_t, s_t), "do": do, "noise": noise, "sub": sub}


def _restart_step(model, carry, c, key, *, restart_times: int = RESTART_TIMES, **_):
    if key is None:
        raise ValueError("Restart sampling is stochastic: pass key=jax.random.key(...)")
    x, nfe = _heun_apply(model, carry["x"], c["heun"])

    def restart(x):
        def once(x, k):
            x = combine(c["noise"][0], x, c["noise"][1:], (jax.random.normal(k, x.shape, x.dtype),))
            x, ns = jax.lax.scan(lambda x, hc: _heun_apply(model, x, hc), x, c["sub"])
            return x, jnp.sum(ns).astype(jnp.int32)  # int32 under x64 too (the cond's other branch)

        x, ns = jax.lax.scan(once, x, jax.random.split(key, restart_times))
        return x, jnp.sum(ns).astype(jnp.int32)

    x, extra = jax.lax.cond(c["do"], restart, lambda x: (x, jnp.int32(0)), x)
    return {"x": x}, nfe + extra


def _restart_denoise(row, t, a, s, i, **_):
    return {**row, "heun": _heun_denoise(t, a, s), "do": False}


restart = Stepper(x_init, _restart_scalars, _restart_step, stages=_restart_stages, denoise_row=_restart_denoise)
