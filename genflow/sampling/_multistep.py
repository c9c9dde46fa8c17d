"""Multistep exponential integrators: one network evaluation per step.

* DDIM with ``eta`` (Song et al. 2021, "Denoising Diffusion Implicit Models").
* DPM-Solver++ 2M / 3M (Lu et al. 2022b, "DPM-Solver++", Alg. 2 and its third-order analogue).
* DPM-Solver++ 2M with heavy-ball momentum (Wizadwongsa et al. 2023, "Diffusion Sampling with
  Momentum for Mitigating Divergence Artifacts").
* DEIS tAB (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"):
  polynomial extrapolation in t of the noise or the data prediction.
* UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), B(h) = e^h - 1
  ("bh2") or h ("bh1").

Times: ``ts`` decreasing; ``lambda = log(alpha / sigma)``; ``h = lambda_t - lambda_s > 0``; ``D``
the data prediction ``x0_hat``. Every step is ``x_t = c_x x_s + sum_j c_j D_j`` with scalar
coefficients computed from the grid before the loop. Steps out of pure noise and into clean
data follow :mod:`genflow.sampling._exp`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from genflow.sampling._driver import Stepper
from genflow.sampling._exp import (
    GL_W, GL_X, combine, ddim_coefs, extrapolation_order, extrapolation_weights, finite_or, lagrange_basis, nonzero,
    order_at, phi, select_order, sqrt0,
)

Array = jax.Array


def _pad(vals, n: int) -> Array:
    vals = [jnp.asarray(v) for v in vals]
    return jnp.stack(vals + [jnp.zeros((), vals[0].dtype)] * (n - len(vals)))


def _history_lambdas(g, i, n: int) -> list[Array]:
    """``lambda(g.t[i - j])`` for ``j = 1..n`` (clamped at ``g.t[0]``)."""
    return [g.at(jnp.maximum(i - j, 0))[2] for j in range(1, n + 1)]


def _u_nodes(i, lams: list[Array]) -> list[Array]:
    """``u = sigma^2 / alpha^2`` at ``lams = [lambda_i, lambda_{i-1}, ...]``. Nodes that do not exist
    yet or lie at ``lambda = -inf`` get distinct negative dummies (they are never used; this keeps
    the unused candidates and their gradients finite)."""
    us = []
    for j, l in enumerate(lams):
        ok = (i - j >= 0) & jnp.isfinite(l)
        us.append(jnp.where(ok, jnp.exp(-2.0 * jnp.where(ok, l, 0.0)), -(j + 1.0)))
    return us


def _to_zero(a_t, i, lams: list[Array], order, max_order) -> Array:
    """Weights ``alpha_t w_j`` of a last step into ``sigma_t = 0``: polynomial extrapolation of the
    data predictions at ``lams = [lambda_i, lambda_{i-1}, ...]`` to ``u = sigma^2 / alpha^2 = 0``
    (:func:`extrapolation_weights`, which lowers the order where closely spaced nodes would
    amplify rounding more than the higher order gains)."""
    return a_t * extrapolation_weights(_u_nodes(i, lams), order, max_order)


def _start_inf(g) -> Array:
    return g.a[0] == 0


def _noise_fix(g, i) -> Array:
    """Weight ``k`` of the correction ``x_1 <- x_1 + k (D_1 - D_0)`` of the first step out of pure
    noise, applied at step ``i = 1`` (zero elsewhere and from a finite start).

    Out of ``alpha_0 = 0`` the first step is DDIM, ``x_1 = (sigma_1/sigma_0) x_0 + alpha_1 D_0``:
    Euler in ``kappa = alpha / sigma`` from ``kappa = 0`` to ``1 / sigma_max``, a step whose size does
    not shrink with the step count, so its ``O(Var[x0] / sigma_max)`` error would remain at any NFE.
    The evaluation ``D_1`` that the second step makes anyway turns it into the trapezoidal rule
    ``x_1 = (sigma_1/sigma_0) x_0 + alpha_1 (D_0 + D_1) / 2`` (UniC-1's limit there): no extra NFE,
    local error ``O(kappa_1^3)``. ``D_1`` is evaluated at the uncorrected ``x_1``, which changes it by
    ``O(alpha_1 kappa_1)`` only."""
    return jnp.where((i == 1) & _start_inf(g), 0.5 * g.a[1], 0.0)


# History as a ring: prediction D_j lives in slot j % m of an [m, ...] array (m = the number of
# predictions a step combines, the new one included). A step first writes its new prediction in
# place, then combines the slots with coefficients permuted to them before the loop. Shifting
# the history through the scan carry instead makes XLA copy every carried state array per step,
# which is most of a step's cost when the network is cheap.
def _ring_init(model, ts, x, *, order: int = 2, **_):
    # (stacked zeros_like: the buffer inherits x's sharding and, under shard_map, its varying
    # axes -- jnp.zeros did neither, and the scan refused the carry)
    return {"x": x, "H": jnp.stack([jnp.zeros_like(x)] * order)}


def _ring_coefs(c: Array, i) -> Array:
    """Coefficients ``c[k]`` of ``D_{i-k}`` (``k = 0..m-1``) placed at their ring slots ``(i - k) % m``."""
    m = c.shape[0]
    return jnp.zeros_like(c).at[(i - jnp.arange(m)) % m].add(c)


def _ring_push(h: Array, d: Array, i) -> Array:
    """``h`` with ``D_i = d`` written in place at slot ``i % m``."""
    return jax.lax.dynamic_update_index_in_dim(h, d.astype(h.dtype), i % h.shape[0], 0)


def _slots(h: Array) -> tuple[Array, ...]:
    return tuple(h[j] for j in range(h.shape[0]))


def _take_new(m: int, i) -> Array:
    """Ring coefficients that take the new prediction ``D_i`` alone (a denoising row's output)."""
    return _ring_coefs(jnp.zeros((m,), jnp.float32).at[0].set(1.0), i)


# Denoising rows (Stepper.denoise_row): the final Tweedie step x0_hat(x, t_end) is a step whose
# combination keeps the new data prediction alone (0 * x + 1 * D_i + 0 * ...: D_i exactly).


# -- DDIM ---------------------------------------------------------------------------------------
def _ddim_init(model, ts, x, *, eta: float = 0.0, **_):
    return _ring_init(model, ts, x, order=2) if eta == 0.0 else {"x": x}


def _ddim_scalars(g, st, i, *, eta: float = 0.0, **_):
    """``x_t = alpha_t x0_hat + sqrt(sigma_t^2 - c^2) eps_hat + c z``, ``c = eta sigma_t sqrt(1 - e^(-2h))``
    (Song et al. 2021, eq. 12, written for any Gaussian path). Deterministic DDIM out of pure
    noise corrects its first step at the second (:func:`_noise_fix`); ``x_s + k (D_s - D_0)`` has
    ``eps_hat + k (D_s - D_0) / sigma_s``, hence the weights ``+-(sigma_t / sigma_s) k``."""
    a_s, s_s, _ = g.at(i)
    a_t, s_t, _ = g.at(i + 1)
    if eta == 0.0:
        kk = ddim_coefs(a_s, s_s, a_t, s_t)[0] * _noise_fix(g, i)
        return {"s": g.t[i], "i": i, "w": jnp.concatenate([s_t[None], _ring_coefs(jnp.stack([a_t + kk, -kk]), i)])}
    ratio = jnp.where(a_t > 0, (a_s * s_t) / (s_s * a_t), 0.0)  # e^-h
    c = eta * s_t * sqrt0(jnp.minimum(1.0 - ratio**2, 1.0))
    return {"s": g.t[i], "w": jnp.stack([a_t, sqrt0(s_t**2 - c**2), c])}


def _ddim_step(model, carry, c, key, *, eta: float = 0.0):
    x = carry["x"]
    d, e = model.x0_eps(x, c["s"])
    if eta == 0.0:
        h = _ring_push(carry["H"], d, c["i"])
        return {"x": combine(jnp.float32(0.0), x, c["w"], (e,) + _slots(h)), "H": h}, 1
    if key is None:
        raise ValueError("DDIM with eta > 0 is stochastic: pass key=jax.random.key(...)")
    z = jax.random.normal(key, x.shape, x.dtype)
    return {"x": combine(jnp.float32(0.0), x, c["w"], (d, e, z))}, 1


def _ddim_denoise(row, t, a, s, i, *, eta: float = 0.0, **_):
    if eta == 0.0:
        return {"s": t, "i": i, "w": jnp.concatenate([jnp.zeros((1,)), _take_new(2, i)])}
    return {"s": t, "w": jnp.array([1.0, 0.0, 0.0])}


ddim = Stepper(_ddim_init, _ddim_scalars, _ddim_step, denoise_row=_ddim_denoise)


# -- DPM-Solver++ multistep -------------------------------------------------------------------
def _dpm_combined(c1, h, r0, r1, a_t, order: int, d2_weight: float = 2.0) -> Array:
    """Coefficients on ``(D_i, D_{i-1}, D_{i-2})`` of DPM-Solver++ of the given order (regular step).

    2M: ``x_t = (sigma_t/sigma_s) x - alpha_t (e^-h - 1) ((1 + 1/(2 r0)) D_i - D_{i-1} / (2 r0))``.
    3M: ``... - alpha_t phi_1 D_i + alpha_t phi_2 D1 - 2 alpha_t phi_3 D2`` with the divided
    differences ``D1 ~ h D'``, ``D2 ~ h^2 D''/2`` of Lu et al. (2022b), ``phi_2 = h phi_2(-h)``,
    ``phi_3 = -h phi_3(-h)``. The factor 2 is the exact Taylor weight of the ``D''`` term,
    ``alpha_t int_0^h e^(v-h) v^2/2 dv D'' = alpha_t h^3 phi_3(-h) D''``; the reference code
    (``dpm_solver_pytorch.py``, k-diffusion's ``sample_dpmpp_3m_sde``, diffusers) weights it by
    ``phi_3`` alone (``d2_weight = 1``, solver ``dpm++3m_ref``), which leaves an ``O(h^3)`` local
    error: second order overall, but better damped at large steps.
    """
    if order == 1:
        return jnp.stack([c1])
    if order == 2:
        return jnp.stack([c1 * (1.0 + 0.5 / r0), -c1 * 0.5 / r0])
    a = jnp.stack([1.0 / r0, -1.0 / r0, jnp.zeros_like(r0)])
    b = jnp.stack([jnp.zeros_like(r1), 1.0 / r1, -1.0 / r1])
    q = r0 / (r0 + r1)
    d1 = (1.0 + q) * a - q * b
    d2 = (a - b) / (r0 + r1)
    p2, p3 = h * phi(-h, 2), -h * phi(-h, 3)
    return jnp.stack([c1, 0.0 * c1, 0.0 * c1]) + a_t * p2 * d1 - d2_weight * a_t * p3 * d2


def _dpm_coefs(g, i, order: int, d2_weight: float = 2.0, fix: bool = True):
    """``(c_x, c_d[order], m)`` of one DPM-Solver++ multistep step from ``g.t[i]`` to ``g.t[i + 1]``
    (with ``fix``, out of pure noise the step from ``x_1 + k (D_1 - D_0)``: :func:`_noise_fix`)."""
    a_s, s_s, l_s = g.at(i)
    a_t, s_t, l_t = g.at(i + 1)
    c_x, c1 = ddim_coefs(a_s, s_s, a_t, s_t)
    m = order_at(i, order, _start_inf(g))
    lams = _history_lambdas(g, i, order - 1)
    h = nonzero(l_t - l_s)
    r0 = nonzero(l_s - lams[0]) / h if order >= 2 else None
    r1 = nonzero(lams[0] - lams[1]) / h if order >= 3 else None
    cands = [_pad(list(_dpm_combined(c1, h, r0, r1, a_t, k, d2_weight)), order) for k in range(1, order + 1)]
    c_d = select_order(m, cands)
    end = s_t == 0
    c_d = jnp.where(end, _to_zero(a_t, i, [l_s] + lams, m, order), c_d)
    c_x = jnp.where(end, 0.0, c_x)
    if fix and order >= 2:
        kk = c_x * _noise_fix(g, i)
        c_d = c_d.at[0].add(kk).at[1].add(-kk)
    return c_x, c_d, m


def _dpm_scalars(g, st, i, *, order: int = 2, d2_weight: float = 2.0, **_):
    c_x, c_d, _ = _dpm_coefs(g, i, order, d2_weight)
    return {"s": g.t[i], "i": i, "c_x": c_x, "c_d": _ring_coefs(c_d, i)}


def _dpm_step(model, carry, c, key, **_):
    del key
    x = carry["x"]
    h = _ring_push(carry["H"], model.x0_eps(x, c["s"])[0], c["i"])
    return {"x": combine(c["c_x"], x, c["c_d"], _slots(h)), "H": h}, 1


def _dpm_denoise(row, t, a, s, i, **_):
    return {"s": t, "i": i, "c_x": 0.0, "c_d": _take_new(row["c_d"].shape[0], i)}


def dpm_multistep(order: int) -> Stepper:
    return Stepper(functools.partial(_ring_init, order=order), functools.partial(_dpm_scalars, order=order),
                   _dpm_step, denoise_row=_dpm_denoise)


# -- DPM-Solver++ 2M with heavy-ball momentum -------------------------------------------------
def _hb_scalars(g, st, i, **_):
    c_x, c_d, m = _dpm_coefs(g, i, 2, fix=False)
    a_s, s_s, _ = g.at(i)
    a_t, s_t, _ = g.at(i + 1)
    scale = jnp.where(s_t == 0, a_t, ddim_coefs(a_s, s_s, a_t, s_t)[1])
    kk = c_x * _noise_fix(g, i)
    return {"s": g.t[i], "i": i, "c_x": c_x, "dir": _ring_coefs(c_d / nonzero(scale), i),
            "w": jnp.concatenate([scale[None], _ring_coefs(jnp.stack([kk, -kk]), i)]), "first": m == 1}


def _hb_step(model, carry, c, key, *, beta: float = 0.8):
    """HB on DPM-Solver++(2M): ``v <- (1 - beta) v + beta (D_i + (D_i - D_{i-1}) / (2 r))``,
    ``x_t = (sigma_t/sigma_s) x + alpha_t (1 - e^-h) v`` (first order for ``beta < 1``; ``beta = 1``
    is DPM-Solver++(2M)). The first step is DDIM and starts the velocity; into ``sigma = 0`` the
    direction is the extrapolated data prediction. Out of pure noise the second step starts from
    the corrected ``x_1 + k (D_1 - D_0)`` (:func:`_noise_fix`), which does not enter the velocity."""
    del key
    x = carry["x"]
    h = _ring_push(carry["H"], model.x0_eps(x, c["s"])[0], c["i"])
    diff = combine(jnp.float32(0.0), x, c["dir"], _slots(h))
    b = jnp.where(c["first"], 1.0, beta)
    v = (1.0 - b) * carry["v"] + b * diff
    return {"x": combine(c["c_x"], x, c["w"], (v,) + _slots(h)), "H": h, "v": v}, 1


def _hb_denoise(row, t, a, s, i, **_):
    return {"s": t, "i": i, "c_x": 0.0, "dir": jnp.zeros((2,)), "w": jnp.concatenate([jnp.zeros((1,)), _take_new(2, i)]),
            "first": True}


hb = Stepper(lambda model, ts, x, **_: {**_ring_init(model, ts, x, order=2), "v": jnp.zeros_like(x)}, _hb_scalars,
             _hb_step, denoise_row=_hb_denoise)


# -- DEIS (tAB) -------------------------------------------------------------------------------
def _deis_nodes(g, i, form: str):
    """Gauss-Legendre nodes ``[8]`` in rho (eps form) or kappa (x0 form) over the step, and their
    weights ``[8]`` (``sum_k w_k f(node_k) ~ int f``).

    The nodes are placed in ``log rho`` (``log kappa``) where both ends are positive: ``t(rho)`` has
    a singularity at ``rho = 0`` (a log on ``ve``, a fractional power on ``edm``), next to which
    nodes in rho itself lost up to 6e-5 of a weight (``ve``, last step 0.035 -> 0.002: 3.4e-6 on the
    samples against diffusers' closed form); in rho where an end is 0 (the step into ``sigma = 0``)."""
    a_s, s_s, _ = g.at(i)
    a_t, s_t, _ = g.at(i + 1)
    if form == "eps":
        lo, hi = finite_or(s_s / a_s, 1.0), s_t / a_t
    else:
        lo, hi = a_s / s_s, finite_or(a_t / s_t, 1.0)
    x, w = jnp.asarray(GL_X, hi.dtype), jnp.asarray(GL_W, hi.dtype)
    pos = (lo > 0) & (hi > 0)
    ulo, uhi = jnp.log(jnp.where(pos, lo, 1.0)), jnp.log(jnp.where(pos, hi, 2.0))
    in_log = jnp.exp(0.5 * (uhi - ulo) * x + 0.5 * (uhi + ulo))
    in_rho = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
    return (jnp.where(pos, in_log, in_rho),
            jnp.where(pos, 0.5 * (uhi - ulo) * w * in_log, 0.5 * (hi - lo) * w))


def _check_form(form: str) -> str:
    if form not in ("eps", "x0"):
        raise ValueError(f"deis: form must be 'eps' or 'x0' (the extrapolated prediction); got {form!r}")
    return form


def _deis_stages(g, i, *, form: str = "eps", **_):
    nodes, _ = _deis_nodes(g, i, _check_form(form))
    return -jnp.log(nodes) if form == "eps" else jnp.log(nodes)


def _deis_scalars(g, st, i, *, order: int = 3, form: str = "eps", **_):
    """tAB-DEIS: the prediction ``form`` (``eps`` or ``x0``) is a Lagrange polynomial in t through the last
    ``order`` evaluations, integrated exactly against the exponential-integrator kernel:

    eps: ``x_t = (alpha_t/alpha_s) x_s + alpha_t sum_j eps_j int_{rho_s}^{rho_t} l_j(t(rho)) d rho``, ``rho = sigma/alpha``
    x0:  ``x_t = (sigma_t/sigma_s) x_s + sigma_t sum_j x0_j int_{kappa_s}^{kappa_t} l_j(t(kappa)) d kappa``, ``kappa = alpha/sigma``

    (8-point Gauss-Legendre in log rho / log kappa, see :func:`_deis_nodes`; ``st.t`` are the times
    of the nodes). The eps form starts from pure noise with a DDIM step, corrected at the second
    step (:func:`_noise_fix`); the x0 form ends at ``sigma = 0`` with ``x_0 = alpha_t P(t_end)``.

    On grids packed tight in t next to long steps (a Karras grid on ``vp_cosine`` is geometric in
    ``1 - t`` near pure noise) the weights in t reach ~25 times a step's own, and the eps form
    amplifies float32 rounding (12 steps: 8.6e-2 from the exact flow map against 5.8e-2 in float64;
    a 16-sample batch and one of its samples alone 2.9e-2 apart). Measured alternatives (stop 45,
    8-d Gaussian oracle): a polynomial in ``lambda = log(alpha/sigma)`` (diffusers' ``logrho``) is
    stable and more accurate on Karras grids (2.1e-2 there) but cannot use the point at pure noise
    and loses the order on grids uniform in t (``linear``, 12 uniform steps: 9.2e-3 against
    4.1e-4); switching to it only on steps whose weights in t exceed ~8 times their sum is stable
    but no more accurate in float32 and 3x worse at 6 steps. Neither is used. ``form="x0"`` does
    better on that grid at 12 steps (4.2e-2, batch spread 5.8e-5) but spreads as much at 6 (2.2e-2).

    Where many of the first times crowd next to ``t = 1`` the eps form is unstable in float32: each
    such step multiplies the rounding of the older states (which reach ``eps_j`` as ``dx / sigma``)
    by ~10 to a few thousand and the errors compound from step to step. 2-d Gaussian oracle, eps model,
    64 samples, largest error from the exact flow map, float32 against float64:
    ``vp_cosine(logsnr_min=-20)``, 10 steps: 28.9 against 0.237 (karras), 7.5 against 0.173
    (logsnr); ``linear`` from ``t_start = 1 - 1e-6`` to ``1e-3``, 20 logsnr steps: 164 against
    5.9e-2 (10 karras steps: 1.6e5 against 0.48). It is the states' rounding, not the
    coefficients': float32 states under x64 (float64 grid and coefficients) give 25.0, 0.95 and 142.
    ``order=2`` (0.56, 0.32, 0.14) and ``form="x0"`` (0.16, 0.12, 0.14) stay accurate there. No
    per-step test of the weights singles those steps out without also changing default grids: the
    largest ``sum |w| / |sum w|`` of a step is 539 on ``vp_cosine()``'s 5-step karras grid (accurate
    in float32: 0.44 against 0.56) but 16 on each of the linear case's first ~12 steps; it is the
    product over consecutive steps that grows.
    """
    _check_form(form)
    a_s, s_s, _ = g.at(i)
    a_t, s_t, _ = g.at(i + 1)
    # history nodes in t; those before t[0] (unused at this step) get distinct dummy values
    nodes = [jnp.where(i - j >= 0, g.t[jnp.maximum(i - j, 0)], g.t[0] + j) for j in range(order)]
    m = jnp.minimum(i + 1, order)
    # into sigma = 0 the polynomial is extrapolated to t = 0; its order is chosen as for the data
    # predictions' extrapolation in u (extrapolation_order)
    m = jnp.where(s_t == 0, extrapolation_order(_u_nodes(i, [g.l[i]] + _history_lambdas(g, i, order - 1)), m, order), m)
    _, w_q = _deis_nodes(g, i, form)

    def weights(k):
        integ = jnp.sum(lagrange_basis(nodes[:k], st.t) * w_q, axis=-1)
        if form == "eps":
            return a_t * integ
        return jnp.where(s_t == 0, a_t * lagrange_basis(nodes[:k], g.t[i + 1]), s_t * integ)

    c_f = select_order(m, [_pad(list(weights(k)), order) for k in range(1, order + 1)])
    ddx, ddd = ddim_coefs(a_s, s_s, a_t, s_t)
    # weights on (D_i, D_{i-1}): the DDIM step out of pure noise (eps form) and the correction
    # x <- x + k (D_i - D_{i-1}) of that step at the next one, which enters through c_x
    if form == "x0":  # the f ring is the D ring (at least two slots)
        c_x = jnp.where(s_t == 0, 0.0, ddx)
        kk = c_x * _noise_fix(g, i)
        c_f = jnp.concatenate([c_f, jnp.zeros((max(0, 2 - order),), c_f.dtype)]).at[:2].add(jnp.stack([kk, -kk]))
        return {"s": g.t[i], "i": i, "c_x": c_x, "c": _ring_coefs(c_f, i)}
    start = a_s == 0
    c_x = jnp.where(start, ddx, a_t / nonzero(a_s))
    kk = c_x * _noise_fix(g, i)
    c_dd = jnp.stack([jnp.where(start, ddd, 0.0) + kk, -kk])
    return {"s": g.t[i], "i": i, "c_x": c_x,
            "c": jnp.concatenate([_ring_coefs(jnp.where(start, 0.0, c_f), i), _ring_coefs(c_dd, i)])}


def _deis_init(model, ts, x, *, order: int = 3, form: str = "eps", **_):
    carry = _ring_init(model, ts, x, order=max(order, 2) if form == "x0" else order)
    return carry if form == "x0" else {**carry, "Dr": jnp.stack([jnp.zeros_like(x)] * 2)}


def _deis_step(model, carry, c, key, *, form: str = "eps", **_):
    del key
    x = carry["x"]
    d, e = model.x0_eps(x, c["s"])
    if form == "x0":
        h = _ring_push(carry["H"], d, c["i"])
        return {"x": combine(c["c_x"], x, c["c"], _slots(h)), "H": h}, 1
    h, dr = _ring_push(carry["H"], e, c["i"]), _ring_push(carry["Dr"], d, c["i"])
    return {"x": combine(c["c_x"], x, c["c"], _slots(h) + _slots(dr)), "H": h, "Dr": dr}, 1


def _deis_denoise(row, t, a, s, i, *, order: int = 3, form: str = "eps", **_):
    """The x0 form's data-prediction ring, or the eps form's second ring (of data predictions)."""
    m = row["c"].shape[0]
    c = _take_new(m, i) if form == "x0" else jnp.concatenate([jnp.zeros((m - 2,)), _take_new(2, i)])
    return {"s": t, "i": i, "c_x": 0.0, "c": c}


def deis(order: int = 3, form: str = "eps") -> Stepper:
    return Stepper(functools.partial(_deis_init, order=order, form=form),
                   functools.partial(_deis_scalars, order=order, form=form),
                   functools.partial(_deis_step, form=form),
                   stages=functools.partial(_deis_stages, form=form),
                   denoise_row=functools.partial(_deis_denoise, order=order, form=form))


# -- UniPC --------------------------------------------------------------------------------------
def _solve_small(a: Array, b: Array) -> Array:
    """Solve ``a x = b`` for ``n <= 3`` by Cramer's rule (cheaper to compile than LU)."""
    n = b.shape[0]
    if n == 1:
        return b / a[0, 0]
    def d(m):
        if n == 2:
            return m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
        return (m[0, 0] * (m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1]) - m[0, 1] * (m[1, 0] * m[2, 2] - m[1, 2] * m[2, 0])
                + m[0, 2] * (m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0]))

    full = d(a)
    # (a singular system -- repeated nodes, in the candidates of orders whose history does not
    # exist yet, which select_order then discards -- gives 0/0; a finite stand-in keeps their
    # gradients finite: NaN times the zero cotangent of an unused candidate is NaN, and the grid
    # gradients of UniPC order 3 were NaN, so optimize_schedule never moved its grid)
    full = jnp.where(full == 0, 1.0, full)
    return jnp.stack([d(a.at[:, j].set(b)) for j in range(n)]) / full


def _unipc_weights(l_s0, l_t, l_hist: list[Array], m: int, corrector: bool, variant: str):
    """UniP-m (``corrector=False``) / UniC-m weights for the data prediction.

    ``x_t = (sigma_t/sigma_s0) x - alpha_t (e^-h - 1) m0 - alpha_t B(-h) (sum_k rho_k D1_k [+ rho_m (m_t - m0)])``
    with ``D1_k = (m_k - m0) / r_k``, ``r_k = (lambda_k - lambda_s0) / h``, and ``rho`` solving
    ``R rho = b``, ``R[l, k] = r_k^l``, ``b_l = l! (-h) phi_{l+1}(-h) / B(-h)``, ``B(-h) = e^-h - 1`` (bh2)
    or ``-h`` (bh1) (Zhao et al. 2023, Alg. 2-3, data prediction;
    order 2 predictor and order 1 corrector use ``rho = 1/2``). Returns ``(w_hist [m-1], w_new)``
    with the combination ``-alpha_t B(-h) (sum_k w_hist_k (m_k - m0) + w_new (m_t - m0))``.
    """
    h = nonzero(l_t - l_s0)
    hh = -h
    bh = jnp.expm1(hh) if variant == "bh2" else hh
    rks = [nonzero(l - l_s0, -(j + 1.0) * h) / h for j, l in enumerate(l_hist[: m - 1])] + [jnp.ones_like(h)]
    n = m if corrector else m - 1
    if n == 0:
        return jnp.zeros((0,), jnp.float32), jnp.zeros((), jnp.float32)
    if (not corrector and m == 2) or (corrector and m == 1):
        rho = jnp.full((n,), 0.5, jnp.float32)
    else:
        b = jnp.stack([hh * phi(hh, l + 1) * math.factorial(l) / bh for l in range(1, n + 1)])
        rr = jnp.stack(rks[:n])
        rho = _solve_small(jnp.stack([rr**l for l in range(n)]), b)
    w_hist = rho[: m - 1] / jnp.stack(rks[: m - 1]) if m > 1 else jnp.zeros((0,), jnp.float32)
    w_new = rho[-1] if corrector else jnp.zeros((), jnp.float32)
    return w_hist, w_new


def _unipc_coefs(g, i_s0, i_t, l_hist, m_max: int, m, corrector: bool, variant: str):
    """``(c_x, c[m_max + 1])`` of one UniP / UniC update from ``g.t[i_s0]`` to ``g.t[i_t]`` on
    ``(x, m0, hist_1..hist_{m_max-1}, m_t)``, order ``m`` (traced, <= m_max).

    Out of pure noise (``h = inf``, only order 1 is used there) ``-alpha_t B(h) -> alpha_t`` (the
    bh2 limit), which makes UniC-1 the trapezoidal rule in ``kappa = alpha / sigma``."""
    a_s, s_s, l_s0 = g.at(i_s0)
    a_t, s_t, l_t = g.at(i_t)
    c_x, c1 = ddim_coefs(a_s, s_s, a_t, s_t)
    h = nonzero(l_t - l_s0)
    bh = jnp.expm1(-h) if variant == "bh2" else -h
    scale = jnp.where(jnp.isfinite(l_t - l_s0), -a_t * bh, a_t)
    cands = []
    for k in range(1, m_max + 1):
        w_hist, w_new = _unipc_weights(l_s0, l_t, l_hist, k, corrector, variant)
        c_hist, c_new = scale * w_hist, scale * w_new
        pad = [jnp.zeros_like(c1)] * (m_max - k)
        cands.append(jnp.stack([c1 - jnp.sum(c_hist) - c_new, *c_hist, *pad, c_new]))
    return c_x, select_order(m, cands)


def _unipc_scalars(g, st, i, *, order: int = 2, variant: str = "bh2", **_):
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc: variant must be 'bh1' or 'bh2'; got {variant!r}")
    start_inf = _start_inf(g)
    ip = jnp.maximum(i - 1, 0)
    # corrector of step i-1 -> i, with the order its predictor used
    cx_c, c_c = _unipc_coefs(g, ip, i, _history_lambdas(g, ip, order - 1), order,
                             order_at(ip, order, start_inf), True, variant)
    m = order_at(i, order, start_inf)
    l_hist = _history_lambdas(g, i, order - 1)
    cx_p, c_p = _unipc_coefs(g, i, i + 1, l_hist, order, m, False, variant)
    a_t, s_t, _ = g.at(i + 1)
    end = s_t == 0
    w_end = _to_zero(a_t, i, [g.l[i]] + l_hist, m, order)
    c_p = jnp.where(end, jnp.concatenate([w_end, jnp.zeros((1,), jnp.float32)]), c_p)
    # on the ring D_i, D_{i-1}, ..., D_{i-order}; the corrector also weights x itself (1 at the first
    # step, which is not corrected)
    correct = i > 0
    c_c = jnp.where(correct, jnp.concatenate([c_c[-1:], c_c[:-1]]), 0.0)
    c_c = jnp.concatenate([jnp.where(correct, 0.0, 1.0)[None], _ring_coefs(c_c, i)])
    c_p = _ring_coefs(c_p.at[-1].set(0.0), i)
    return {"s": g.t[i], "i": i, "cx_c": jnp.where(correct, cx_c, 0.0), "c_c": c_c,
            "cx_p": jnp.where(end, 0.0, cx_p), "c_p": c_p}


def _unipc_step(model, carry, c, key, **_):
    """UniC corrects ``x_i`` with the new evaluation, then UniP predicts ``x_{i+1}``; the final
    prediction is not corrected, so each step costs one evaluation."""
    del key
    x = carry["x"]
    h = _ring_push(carry["H"], model.x0_eps(x, c["s"])[0], c["i"])
    xc = combine(c["cx_c"], carry["x_prev"], c["c_c"], (x,) + _slots(h))
    return {"x": combine(c["cx_p"], xc, c["c_p"], _slots(h)), "x_prev": xc, "H": h}, 1


def _unipc_init(model, ts, x, *, order: int = 2, **_):
    return {**_ring_init(model, ts, x, order=order + 1), "x_prev": x}


def _unipc_force(carry, x_prev_ref, x_ref):
    return {**carry, "x": x_ref, "x_prev": x_prev_ref}


def _unipc_denoise(row, t, a, s, i, **_):
    """No correction (``x_c = x``), then the new data prediction alone."""
    m = row["c_p"].shape[0]
    return {"s": t, "i": i, "cx_c": 0.0, "c_c": jnp.zeros((m + 1,)).at[0].set(1.0), "cx_p": 0.0,
            "c_p": _take_new(m, i)}


def unipc(order: int = 2, variant: str = "bh2") -> Stepper:
    return Stepper(functools.partial(_unipc_init, order=order),
                   functools.partial(_unipc_scalars, order=order, variant=variant),
                   _unipc_step, _unipc_force, denoise_row=_unipc_denoise)
