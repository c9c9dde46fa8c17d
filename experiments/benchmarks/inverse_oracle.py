"""Posterior samplers against the linear-Gaussian oracle.

A 16-dimensional Gaussian prior (4x4 images, non-diagonal covariance) with its exact model,
each operator, Gaussian measurement noise (std 0.1): the posterior is closed form. For each
method and task: the empirical posterior-mean error relative to the prior-mean error
(``|mean - mu_post| / |mu - mu_post|``), the covariance error (``|cov - C_post|_F / |C_post|_F``),
NFE, network VJPs / JVPs and the time per call (after compilation). ``pigdm`` uses the prior's
mean variance as ``data_var`` (its isotropic approximation of the prior covariance); ``tmpd``
uses the model's Jacobian (exact for this prior). The ``+ode`` rows sample the same likelihoods
through ``gf.inverse.posterior_model`` with a deterministic DPM-Solver++(2M) (20 steps).

    python experiments/benchmarks/inverse_oracle.py [--n 2000] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import genflow as gf
from genflow import inverse as inv

sys.path.insert(0, os.path.dirname(__file__))
from _timing import markdown_table  # noqa: E402

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


def ode_row(rows, out, task, method, pname, kind, prior, path, x1, y, op, a, hp, m_post, c_post, prior_err):
    """``posterior_model`` of ``method`` sampled by ``gf.sample`` with a deterministic solver."""
    pm = inv.posterior_model(prior.model(path, kind), path, y, op, prediction=kind, method=method,
                             noise=inv.GaussianNoise(a.noise), **hp)
    args = dict(prediction="x0", solver=ODE_SOLVER, steps=ODE_STEPS, schedule="logsnr", t_start=0.999)
    jax.block_until_ready(gf.sample(pm, path, x1, **args))
    t0 = time.perf_counter()
    x, info = gf.sample(pm, path, x1, **args)
    x = np.asarray(jax.block_until_ready(x)).reshape(a.n, D)
    dt = time.perf_counter() - t0
    nfe = int(info.nfe)
    cg = inv.DEFAULTS[method]["cg_iters"] if method == "tmpd" else 0
    mean_rel = np.linalg.norm(x.mean(0) - m_post) / prior_err
    cov_rel = np.linalg.norm(np.cov(x.T) - c_post) / np.linalg.norm(c_post)
    rows.append([task, f"{method}+ode", f"{pname}/{kind}", mean_rel, cov_rel, nfe, nfe * (1 + cg), nfe * cg, dt])
    out.append(dict(task=task, method=f"{method}+ode", solver=ODE_SOLVER, path=pname, prediction=kind,
                    mean_rel_err=float(mean_rel), cov_rel_err=float(cov_rel), nfe=nfe, vjp=nfe * (1 + cg),
                    jvp=nfe * cg, seconds=dt))


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
        for method, (pname, kind, hp) in methods.items():
            path = gf.paths.get(pname)
            x1 = path.prior_sample(jax.random.key(6), (a.n,) + S)
            args = dict(prediction=kind, method=method, steps=a.steps, key=jax.random.key(7),
                        noise=inv.GaussianNoise(a.noise), **hp)
            jax.block_until_ready(inv.posterior_sample(prior.model(path, kind), path, x1, y, op, **args))
            t0 = time.perf_counter()
            x, info = inv.posterior_sample(prior.model(path, kind), path, x1, y, op, **args)
            x = np.asarray(jax.block_until_ready(x)).reshape(a.n, D)
            dt = time.perf_counter() - t0
            mean_rel = np.linalg.norm(x.mean(0) - m_post) / prior_err
            cov_rel = np.linalg.norm(np.cov(x.T) - c_post) / np.linalg.norm(c_post)
            rows.append([task, method, f"{pname}/{kind}", mean_rel, cov_rel, int(info.nfe), int(info.vjp),
                         int(info.jvp), dt])
            out.append(dict(task=task, method=method, path=pname, prediction=kind, mean_rel_err=float(mean_rel),
                            cov_rel_err=float(cov_rel), nfe=int(info.nfe), vjp=int(info.vjp), jvp=int(info.jvp),
                            seconds=dt))
            if method in ("pigdm", "tmpd"):  # the same likelihood as an x0 model for a high-order ODE solver
                ode_row(rows, out, task, method, pname, kind, prior, path, x1, y, op, a, hp, m_post, c_post, prior_err)
    print(f"linear-Gaussian oracle: D={D}, noise std {a.noise}, {a.n} samples, {a.steps} steps "
          f"(method+ode: gf.inverse.posterior_model with gf.sample's {ODE_SOLVER}, {ODE_STEPS} log-SNR steps "
          f"from t = 0.999)")
    print(markdown_table(["task", "method", "path/kind", "mean err / prior err", "cov rel err", "NFE", "VJP", "JVP",
                          "s/call"], rows))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
