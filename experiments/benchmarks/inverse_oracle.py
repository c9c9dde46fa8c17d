"""Posterior samplers against the linear-Gaussian oracle.

A 16-dimensional Gaussian prior (4x4 images, non-diagonal covariance) with its exact model,
each operator, Gaussian measurement noise (std 0.1): the posterior is closed form. For each
method and task: the empirical posterior-mean error relative to the prior-mean error
(``|mean - mu_post| / |mu - mu_post|``), the covariance error (``|cov - C_post|_F / |C_post|_F``),
NFE, network VJPs / JVPs and the time per call (after compilation). ``pigdm`` uses the prior's
mean variance as ``data_var`` (its isotropic approximation of the prior covariance); ``tmpd``
uses the model's Jacobian (exact for this prior). The ``+ode`` rows sample the same likelihoods
through ``gf.inverse.posterior_model`` with a deterministic DPM-Solver++(2M) (20 steps). The
``exact`` row of each task is the Monte-Carlo floor of these errors at the same sample count:
``n`` exact posterior samples, median (and range) over ``FLOOR_DRAWS`` draws; differences between
methods below that floor's range are not resolved.

    python experiments/benchmarks/inverse_oracle.py [--n 2000] [--steps 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import genflow as gf
from genflow import inverse as inv

sys.path.insert(0, os.path.dirname(__file__))
from _timing import markdown_table, write_json  # noqa: E402

S, D = (4, 4, 1), 16
METHODS = {  # method: (path, prediction kind, hyper-parameters)
    "dps": ("vp_cosine", "eps", dict(scale=0.3)),
    "mcg": ("vp_cosine", "eps", dict(scale=0.3)),
    "ddnm": ("vp_cosine", "eps", {}),
    "flowdps": ("linear", "velocity", dict(scale=1.0)),
    "pigdm": ("vp_cosine", "eps", {}),  # data_var: the prior's mean variance, set in main
    "tmpd": ("vp_cosine", "eps", {}),
}


ODE_SOLVER, ODE_STEPS = "dpm++2m", 20
FLOOR_DRAWS = 20


def errors(x, m_post, c_post, prior_err):
    """``(mean err / prior err, cov rel err)`` of samples ``x: [n, D]``."""
    return (np.linalg.norm(x.mean(0) - m_post) / prior_err,
            np.linalg.norm(np.cov(x.T) - c_post) / np.linalg.norm(c_post))


def exact_floor(rows, out, task, n, m_post, c_post, prior_err):
    """The errors of ``n`` exact posterior samples: median and range over FLOOR_DRAWS draws."""
    chol = np.linalg.cholesky(c_post + 1e-12 * np.eye(D))
    rng = np.random.default_rng(0)
    e = np.array([errors(m_post + rng.standard_normal((n, D)) @ chol.T, m_post, c_post, prior_err)
                  for _ in range(FLOOR_DRAWS)])
    med, lo, hi = np.median(e, 0), e.min(0), e.max(0)
    rows.append([task, f"exact (floor: median of {FLOOR_DRAWS} draws [range])", "-",
                 f"{med[0]:.4g} [{lo[0]:.2g}, {hi[0]:.2g}]", f"{med[1]:.4g} [{lo[1]:.2g}, {hi[1]:.2g}]", 0, 0, 0, 0.0])
    out.append(dict(task=task, method="exact", mean_rel_err=float(med[0]), cov_rel_err=float(med[1]),
                    mean_rel_err_range=[float(lo[0]), float(hi[0])], cov_rel_err_range=[float(lo[1]), float(hi[1])],
                    draws=FLOOR_DRAWS, nfe=0, vjp=0, jvp=0, seconds=0.0))


def timed(call):
    """``(x: [n, D], info, seconds)`` of ``call()`` after one warm-up call (compilation excluded)."""
    jax.block_until_ready(call())
    t0 = time.perf_counter()
    x, info = call()
    x = np.asarray(jax.block_until_ready(x))
    return x.reshape(x.shape[0], D), info, time.perf_counter() - t0


def record(rows, out, task, method, pname, kind, x, counts, dt, m_post, c_post, prior_err, **extra):
    """One table row and one JSON entry: the posterior mean / covariance errors of ``x``;
    ``counts = (nfe, vjp, jvp)``."""
    mean_rel, cov_rel = errors(x, m_post, c_post, prior_err)
    nfe, vjp, jvp = (int(c) for c in counts)
    rows.append([task, method, f"{pname}/{kind}", mean_rel, cov_rel, nfe, vjp, jvp, dt])
    out.append(dict(task=task, method=method, path=pname, prediction=kind, mean_rel_err=float(mean_rel),
                    cov_rel_err=float(cov_rel), nfe=nfe, vjp=vjp, jvp=jvp, seconds=dt, **extra))


def ode_run(method, kind, prior, path, x1, y, op, a, hp):
    """``posterior_model`` of ``method`` sampled by ``gf.sample`` with a deterministic solver:
    ``(x, (nfe, vjp, jvp), seconds)``."""
    pm = inv.posterior_model(prior.model(path, kind), path, y, op, prediction=kind, method=method,
                             noise=inv.GaussianNoise(a.noise), **hp)
    x, info, dt = timed(lambda: gf.sample(pm, path, x1, prediction="x0", solver=ODE_SOLVER, steps=ODE_STEPS,
                                          schedule="logsnr", t_start=0.999))
    nfe = int(info.nfe)
    cg = inv.DEFAULTS[method]["cg_iters"] if method == "tmpd" else 0
    return x, (nfe, nfe * (1 + cg), nfe * cg), dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--out", default="experiments/benchmarks/results/inverse_oracle.json")
    a = p.parse_args(argv)
    L = jax.random.normal(jax.random.key(1), (D, D)) * 0.3
    cov = L @ L.T + 0.1 * jnp.eye(D)
    mu = jax.random.normal(jax.random.key(2), (D,)) * 0.5
    prior = gf.oracles.Gaussian.full(mu, cov)
    x_true = prior.sample(jax.random.key(3), 1).reshape((1,) + S)
    methods = dict(METHODS, pigdm=("vp_cosine", "eps", dict(data_var=float(jnp.trace(cov)) / D)))
    ops = {"box_inpainting": inv.box_inpainting(S, 1, 1, 2, 2), "super_resolution": inv.super_resolution(2),
           "gaussian_blur": inv.gaussian_blur((4, 4), 0.8, size=3), "compressed_sensing": inv.compressed_sensing(jax.random.key(4), S, 6),
           "denoising": inv.denoising()}
    rows, out = [], []
    for task, op in ops.items():
        y1 = inv.GaussianNoise(a.noise).sample(jax.random.key(5), op(x_true))
        m_post, c_post = inv.linear_gaussian_posterior(mu, cov, inv.operator_matrix(op, S), np.asarray(y1).reshape(-1), a.noise)
        prior_err = np.linalg.norm(np.asarray(mu) - m_post)
        y = jnp.broadcast_to(y1, (a.n,) + y1.shape[1:])
        exact_floor(rows, out, task, a.n, m_post, c_post, prior_err)
        for method, (pname, kind, hp) in methods.items():
            path = gf.paths.get(pname)
            x1 = path.prior_sample(jax.random.key(6), (a.n,) + S)
            args = dict(prediction=kind, method=method, steps=a.steps, key=jax.random.key(7),
                        noise=inv.GaussianNoise(a.noise), **hp)
            x, info, dt = timed(lambda: inv.posterior_sample(prior.model(path, kind), path, x1, y, op, **args))
            post = (m_post, c_post, prior_err)
            record(rows, out, task, method, pname, kind, x, (info.nfe, info.vjp, info.jvp), dt, *post)
            if method in ("pigdm", "tmpd"):  # the same likelihood as an x0 model for a high-order ODE solver
                x, counts, dt = ode_run(method, kind, prior, path, x1, y, op, a, hp)
                record(rows, out, task, f"{method}+ode", pname, kind, x, counts, dt, *post, solver=ODE_SOLVER)
    print(f"linear-Gaussian oracle: D={D}, noise std {a.noise}, {a.n} samples, {a.steps} steps "
          f"(method+ode: gf.inverse.posterior_model with gf.sample's {ODE_SOLVER}, {ODE_STEPS} log-SNR steps "
          f"from t = 0.999)")
    print(markdown_table(["task", "method", "path/kind", "mean err / prior err", "cov rel err", "NFE", "VJP", "JVP",
                          "s/call"], rows))
    write_json(a.out, out)


if __name__ == "__main__":
    main()
