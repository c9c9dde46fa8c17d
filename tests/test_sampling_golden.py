"""genflow's samplers against golden outputs of k-diffusion and diffusers (``tests/fixtures/samplers``).

k-diffusion samples ``y = x0 + sigma eps`` on a Karras grid of noise levels. On any path the same
solver on the grid of times with ``sigma(t) / alpha(t)`` equal to those levels, from
``x1 = alpha(t_start) * y_start``, must give the same samples (the deterministic solvers here
work in ``rho = sigma / alpha`` and the data prediction, so they are path-invariant); the model
is the exact mixture denoiser converted to each path's prediction kind.

Peers from diffusers (``make_golden.py``): UniPC with ``solver_order=2`` and ``3`` (genflow:
``unipc`` with ``order=2``, its default, and ``order=3``), DPM-Solver++(2M) and (3M) (genflow:
``dpm++2m``, ``dpm++3m_ref``) on the four paths, and DEIS with ``solver_order=3`` (genflow:
``deis``), whose polynomial in ``log sigma`` is genflow's polynomial in t only on a ``ve`` path;
and DPM-Solver++(3S) (genflow: ``dpm++3s``), diffusers' single-step scheduler on the levels with
the stage points inserted, with the reference code's stage (see
:func:`test_dpmpp_3s_matches_diffusers_singlestep`).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf
from genflow.oracles import GaussianMixture

GOLDEN = np.load(pathlib.Path(__file__).parent / "fixtures" / "samplers" / "golden.npz")
PAIRS = {"ddim": "euler", "edm_heun": "heun", "dpm++2m": "dpmpp_2m", "dpm++2s": "dpmpp_2s"}
PATHS = {"edm": "x0", "vp_linear": "eps", "linear": "velocity", "vp_cosine": "v"}


def _run(path_name: str, kind: str, solver: str, **options):
    # (ve: sigma = 0.001 (10^5)^t; its t stays inside [0, 1] on the levels, which edm's clips: its
    # sigma_min = 0.002 is above the last level 0.00199999963)
    path = gf.paths.ve(0.001, 100.0) if path_name == "ve" else gf.paths.get(path_name)
    gm = GaussianMixture(*(jnp.asarray(GOLDEN[k]) for k in ("logits", "means", "vars")))
    rho = jnp.asarray(GOLDEN["sigmas"][:-1])  # (the last level, 0, is the final denoising)
    ts = path.t_from_log_snr(-2.0 * jnp.log(rho))
    x1 = path.alpha(ts[0]) * 80.0 * jnp.asarray(GOLDEN["z"])
    x, info = gf.sample(gm.model(path, kind), path, x1, prediction=kind, solver=solver, schedule=ts, denoise=True,
                        **options)
    return np.asarray(x), int(info.nfe)


@pytest.mark.parametrize("path_name", sorted(PATHS))
@pytest.mark.parametrize("solver", sorted(PAIRS))
def test_matches_k_diffusion(solver, path_name):
    with jax.enable_x64(True):
        x, nfe = _run(path_name, PATHS[path_name], solver)
    want = GOLDEN[f"out/{PAIRS[solver]}"]
    # (measured: 2e-15 to 1e-13 on the VP and linear paths, 7e-12 to 2.4e-8 on edm)
    np.testing.assert_allclose(x, want, rtol=1e-7, atol=1e-7)
    assert nfe == {"ddim": 8, "dpm++2m": 8, "edm_heun": 15, "dpm++2s": 15}[solver]


@pytest.mark.parametrize("path_name", sorted(PATHS))
@pytest.mark.parametrize("solver, options, golden, tol", [
    pytest.param("unipc", {}, "diffusers_unipc", 1e-6, id="unipc"),
    pytest.param("dpm++2m", {}, "diffusers_dpmpp_2m", 1e-5, id="dpm++2m"),
    pytest.param("unipc", {"order": 3}, "diffusers_unipc_3", 1e-6, id="unipc-order3"),
    pytest.param("dpm++3m_ref", {}, "diffusers_dpmpp_3m", 1e-5, id="dpm++3m_ref"),
])
def test_matches_diffusers(solver, options, golden, tol, path_name):
    """diffusers' UniPC (bh2, UniP-2 / UniP-3 with its corrector) and DPM-Solver++(2M) / (3M).

    Measured max differences: UniPC-2 <= 7e-14 and UniPC-3 <= 1e-12, but 2.5e-8 / 2.5e-7 on edm,
    whose grid ends at its sigma_min 0.002 instead of the level 0.00199999963; DPM-Solver++(2M)
    4.4e-7 and (3M) 1.2e-6 (diffusers rounds the sample to float32 in each step)."""
    with jax.enable_x64(True):
        x, nfe = _run(path_name, PATHS[path_name], solver, **options)
    np.testing.assert_allclose(x, GOLDEN[f"out/{golden}"], rtol=tol, atol=tol)
    assert nfe == 8


def test_deis_matches_diffusers_on_a_ve_path():
    """diffusers' DEIS (``solver_order=3``) extrapolates eps polynomially in ``log sigma``, genflow's
    ``deis`` in t: the same on a ``ve`` path (``log sigma`` affine in t), not on the four paths above
    (there 0.2 to 1.7 apart). diffusers integrates the polynomial exactly, genflow by 8-point
    Gauss-Legendre in ``log sigma``: measured 2e-14. (With the nodes in sigma itself, as before,
    the last step's weights, sigma 0.035 -> 0.002 next to the log singularity at 0, were off by a
    relative 6e-5: 3.4e-6 on the samples.)"""
    with jax.enable_x64(True):
        x, nfe = _run("ve", "eps", "deis")
    np.testing.assert_allclose(x, GOLDEN["out/diffusers_deis_3"], rtol=1e-10, atol=1e-10)
    assert nfe == 8


def _k_diffusion_3m(den, y, sigmas, warm_up: str):
    """k-diffusion's ``sample_dpmpp_3m_sde`` loop with ``eta = 0`` (transcribed in NumPy); its
    second step, the warm-up, is ``phi_2`` times the divided difference (``warm_up="phi2"``,
    k-diffusion) or DPM-Solver++(2M)'s ``(1 + 1/(2r)) D_i - 1/(2r) D_{i-1}`` (``"2m"``)."""
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        d = den(y, sigmas[i])
        if sigmas[i + 1] == 0:
            y = d
        else:
            h = np.log(sigmas[i]) - np.log(sigmas[i + 1])
            phi_2 = np.expm1(-h) / h + 1
            base = np.exp(-h) * y - np.expm1(-h) * d
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (d - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                y = base + phi_2 * d1 - (phi_2 / h - 0.5) * d2
            elif h_1 is not None:
                r = h_1 / h
                y = (base + phi_2 * (d - d_1) / r if warm_up == "phi2" else
                     np.exp(-h) * y - np.expm1(-h) * ((1 + 1 / (2 * r)) * d - d_1 / (2 * r)))
            else:
                y = base
            h_1, h_2 = h, h_1
        d_1, d_2 = d, d_1
    return y


def _den(y, s):
    """``E[x0 | x0 + s eps = y]`` of the stored mixture, in NumPy float64 (as make_golden.py)."""
    logits, means, vars_ = GOLDEN["logits"], GOLDEN["means"], GOLDEN["vars"]
    m = vars_[None] + s * s
    r = y[:, None, :] - means[None]
    logp = -0.5 * (r * r / m + np.log(m)).sum(-1) + logits
    w = np.exp(logp - logp.max(1, keepdims=True))
    return ((w / w.sum(1, keepdims=True))[..., None] * (means[None] + vars_[None] / m * r)).sum(1)


def test_dpmpp_3m_ref_is_k_diffusions_third_order_step_with_a_2m_warm_up():
    y0, sigmas = 80.0 * GOLDEN["z"], GOLDEN["sigmas"]
    # the transcription reproduces k-diffusion ...
    np.testing.assert_allclose(_k_diffusion_3m(_den, y0, sigmas, "phi2"), GOLDEN["out/dpmpp_3m"], rtol=1e-10, atol=1e-10)
    # ... and with the 2M warm-up it is genflow's dpm++3m_ref
    with jax.enable_x64(True):
        x, _ = _run("vp_linear", "eps", "dpm++3m_ref")
    np.testing.assert_allclose(x, _k_diffusion_3m(_den, y0, sigmas, "2m"), rtol=1e-7, atol=1e-7)
    assert np.abs(x - GOLDEN["out/dpmpp_3m"]).max() > 1e-4  # (the warm-ups differ: max 2.2e-2, mean 9e-4 here)


@pytest.mark.parametrize("path_name", sorted(PATHS))
def test_dpmpp_3s_matches_diffusers_singlestep(path_name):
    """genflow's ``dpm++3s`` on the 8 levels (stages at ``lambda_s + r (lambda_t - lambda_s)``,
    ``r = 1/3, 2/3``, ``lambda = -log rho``; 7 steps of 3 evaluations, then the denoising: nfe 22)
    against ``DPMSolverSinglestepScheduler(solver_order=3)`` on the levels ``rho_s^(1-r) rho_t^r``,
    r = 0, 1/3, 2/3 for each of the 7 steps, then ``rho_7`` and 0 (22 steps; its groups of orders 1,
    2, 3 are the single steps, and its last step, order 1 into 0, is the denoising), with
    ``solver_type="heun"`` in the order-2 steps: the reference code's stage ``x_s2``
    (``make_golden.py``). Measured max differences: 4e-15 (vp_linear), 9e-14 (vp_cosine), 1.1e-13
    (linear), 7e-11 on edm (its grid ends at sigma_min 0.002, not at the level 0.00199999963)."""
    with jax.enable_x64(True):
        x, nfe = _run(path_name, PATHS[path_name], "dpm++3s")
    np.testing.assert_allclose(x, GOLDEN["out/diffusers_dpmpp_3s_ref"], rtol=1e-9, atol=1e-9)
    assert nfe == 22


def _dpm_solver_3s(den, y, sigmas, stage: str = "dpmsolver", r1: float = 1.0 / 3.0, r2: float = 2.0 / 3.0):
    """DPM-Solver++(3S) as in the reference code (``dpm_solver_pytorch.py`` of LuChengTHU/dpm-solver,
    ``singlestep_dpm_solver_third_update`` with ``algorithm_type="dpmsolver++"``,
    ``solver_type="dpmsolver"``), transcribed in NumPy for ``y = x0 + sigma eps`` (``alpha = 1``,
    ``lambda = -log sigma``); a step into ``sigma = 0`` is the denoising. ``stage="midpoint"``:
    the stage ``x_s2`` as diffusers' default singlestep scheduler takes it (its second-order
    ``"midpoint"`` step), weight ``-(r2/r1) expm1(-r2 h) / 2`` on ``D_s1 - D_s`` where the reference
    has ``(r2/r1) (expm1(-r2 h) / (r2 h) + 1)``."""
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        m_s = den(y, s)
        if t == 0:
            y = m_s
            continue
        h = np.log(s) - np.log(t)
        s1, s2 = s * np.exp(-r1 * h), s * np.exp(-r2 * h)
        phi_11, phi_12, phi_1 = np.expm1(-r1 * h), np.expm1(-r2 * h), np.expm1(-h)
        phi_22 = phi_12 / (r2 * h) + 1.0
        phi_2 = phi_1 / h + 1.0
        m_s1 = den((s1 / s) * y - phi_11 * m_s, s1)
        c = r2 / r1 * (phi_22 if stage == "dpmsolver" else -0.5 * phi_12)
        m_s2 = den((s2 / s) * y - phi_12 * m_s + c * (m_s1 - m_s), s2)
        y = (t / s) * y - phi_1 * m_s + (1.0 / r2) * phi_2 * (m_s2 - m_s)
    return y


def test_dpmpp_3s_is_the_reference_third_order_singlestep_update():
    """The transcription reproduces both diffusers goldens (its default stage and the reference's;
    measured 2.2e-15 and 1.3e-15), and genflow's ``dpm++3s`` is the reference (measured 4e-15);
    the default diffusers stage is 4.3e-2 off it."""
    y0, sigmas = 80.0 * GOLDEN["z"], GOLDEN["sigmas"]
    ref = _dpm_solver_3s(_den, y0, sigmas)
    np.testing.assert_allclose(ref, GOLDEN["out/diffusers_dpmpp_3s_ref"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_dpm_solver_3s(_den, y0, sigmas, stage="midpoint"), GOLDEN["out/diffusers_dpmpp_3s"],
                               rtol=1e-12, atol=1e-12)
    with jax.enable_x64(True):
        x, nfe = _run("vp_linear", "eps", "dpm++3s")
    np.testing.assert_allclose(x, ref, rtol=1e-12, atol=1e-12)
    assert nfe == 22
    assert np.abs(x - GOLDEN["out/diffusers_dpmpp_3s"]).max() > 1e-2
