"""Likelihood benchmark: gf.log_prob vs Meta's flow_matching ODESolver.compute_likelihood.

Gaussian data N(mu, C) with a dense covariance in d = 16, 256 points, float64, the CondOT /
linear path and the exact velocity field from the oracle (for the peer: a torch port of the same
closed form, in its own time convention, data at t = 1). Both are compared with the closed-form
log-density: error in nats per dimension, and wall time after compilation (timed round-robin,
median of repeats; genflow's compile time is reported separately).

    python experiments/benchmarks/likelihood.py            # ~1-2 min on 2 CPU cores
    python experiments/benchmarks/likelihood.py --repeats 3

Also prints the exact-trace error on every path (solver error and the prior-mismatch term that
alpha(1) > 0 leaves on VP paths) and the variance of the Hutchinson estimator.
Writes experiments/benchmarks/results/likelihood.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import genflow as gf  # noqa: E402
from experiments.benchmarks._timing import interleaved, markdown_table, write_json  # noqa: E402

D, N = 16, 256
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def problem(seed: int = 0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.normal(k1, (D, D), jnp.float64) / math.sqrt(D)
    g = gf.oracles.Gaussian.full(jax.random.normal(k2, (D,), jnp.float64), a @ a.T + 0.3 * jnp.eye(D))
    return g, g.sample(k3, N)


# -- the peer: Meta's flow_matching on a torch port of the oracle velocity -------------------------
def peer_setup(g):
    import torch
    from flow_matching.solver import ODESolver

    torch.set_default_dtype(torch.float64)
    # One intra-op thread: on this shared 2-core box torch's 2-thread OpenMP pool measured 5-18 s per
    # call (spin-waiting against other jobs) vs 0.43 s with one thread, the figure quoted in the issue.
    torch.set_num_threads(1)
    mean = torch.tensor(np.asarray(g.mean))
    var = torch.tensor(np.asarray(g.var))
    basis = torch.tensor(np.asarray(g.basis))

    class OracleVelocity(torch.nn.Module):
        """u(x, s) for the CondOT path in flow_matching's convention x_s = s x_data + (1 - s) x_noise:
        u = mu + U diag((s v - (1 - s)) / (s^2 v + (1 - s)^2)) U^T (x - s mu)  (our v(x, 1 - s), negated)."""

        def forward(self, x, t):
            s = t.reshape(-1, 1) if torch.is_tensor(t) and t.ndim > 0 else torch.as_tensor(t, dtype=x.dtype)
            r = (x - s * mean) @ basis
            coef = (s * var - (1 - s)) / (s * s * var + (1 - s) ** 2)
            return mean + (coef * r) @ basis.T

    solver = ODESolver(velocity_model=OracleVelocity())

    def log_p0(z):
        return -0.5 * (z * z).sum(-1) - 0.5 * D * math.log(2 * math.pi)

    def run(x, method, step_size=None, exact=True, seed=0):
        torch.manual_seed(seed)
        grid = torch.tensor([1.0, 0.0])
        _, lp = solver.compute_likelihood(x_1=x, log_p0=log_p0, step_size=step_size, method=method, atol=1e-7,
                                          rtol=1e-7, time_grid=grid, exact_divergence=exact)
        return lp

    return torch, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-peer", action="store_true", help="skip flow_matching (torch)")
    args = p.parse_args(argv)

    g, x = problem()
    path = gf.paths.linear()
    fn = g.model(path, "velocity")
    exact = np.asarray(g.log_prob(x, 0.0, path))

    ours = {
        "genflow exact tsit5 1e-7": dict(solver="tsit5", rtol=1e-7, atol=1e-7),
        "genflow exact dopri5 1e-7": dict(solver="dopri5", rtol=1e-7, atol=1e-7),
        "genflow exact dopri5 3e-8": dict(solver="dopri5", rtol=3e-8, atol=3e-8),
        "genflow exact dopri8 1e-7": dict(solver="dopri8", rtol=1e-7, atol=1e-7),
        "genflow exact midpoint h=0.01": dict(solver="midpoint", steps=100),
        "genflow hutchinson dopri5 1e-7": dict(solver="dopri5", rtol=1e-7, atol=1e-7, trace="hutchinson",
                                               key=jax.random.key(1)),
    }
    contenders, errors, nfe, compile_s = {}, {}, {}, {}
    for name, kw in ours.items():
        call = lambda kw=kw: gf.log_prob(fn, path, x, prediction="velocity", **kw)  # noqa: E731
        t0 = time.perf_counter()
        lp, info = call()
        lp.block_until_ready()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        call()[0].block_until_ready()
        compile_s[name] = first - (time.perf_counter() - t0)
        errors[name] = np.abs(np.asarray(lp) - exact) / D
        nfe[name] = int(info.nfe)
        contenders[name] = lambda call=call: call()[0]

    if not args.no_peer:
        torch, peer = peer_setup(g)
        xt = torch.tensor(np.asarray(x))
        peers = {"flow_matching exact dopri5 1e-7": dict(method="dopri5"),
                 "flow_matching exact midpoint h=0.01": dict(method="midpoint", step_size=0.01),
                 "flow_matching hutchinson dopri5 1e-7": dict(method="dopri5", exact=False)}
        for name, kw in peers.items():
            lp = peer(xt, **kw)
            errors[name] = np.abs(lp.numpy() - exact) / D
            nfe[name] = "-"
            contenders[name] = lambda kw=kw: peer(xt, **kw)

    timing = interleaved(contenders, repeats=args.repeats, warmup=1)
    def peer_time(name):  # the flow_matching row with the same trace estimator and solver family
        key = ("flow_matching hutchinson dopri5 1e-7" if "hutchinson" in name else
               "flow_matching exact midpoint h=0.01" if "midpoint" in name else "flow_matching exact dopri5 1e-7")
        return timing.get(key, {}).get("median")

    rows = []
    for name in contenders:
        t, ref = timing[name], peer_time(name)
        rows.append([name, float(errors[name].mean()), float(errors[name].max()), nfe[name], t["median"], t["min"],
                     t["max"], ref / t["median"] if ref and name.startswith("genflow") else "-",
                     compile_s.get(name, "-")])
    header = ["method", "mean |err| nats/dim", "max |err| nats/dim", "NFE", "median s", "min s", "max s",
              "speed-up vs the matching flow_matching row (same trace estimator; midpoint vs midpoint, "
              "adaptive vs dopri5 1e-7)", "compile s"]
    table1 = markdown_table(header, rows)
    print(f"## log-likelihood of {N} points in d={D} (float64, CondOT path, exact oracle velocity; torch with one "
          f"intra-op thread, XLA with its default threads on {os.cpu_count()} cores)\n")
    print(table1)

    # every path: exact trace, rtol = atol = 1e-7; the error splits into solver error + prior mismatch
    rows2 = []
    for pname in gf.paths.names():
        pth = gf.paths.get(pname)
        lp, info = gf.log_prob(g.model(pth, "velocity"), pth, x, prediction="velocity", rtol=1e-7, atol=1e-7)
        ex = g.log_prob(x, pth.t_min, pth)
        mismatch = info.prior_logp - g.log_prob(info.z, 1.0, pth)
        rows2.append([pname, float(jnp.mean(jnp.abs(lp - ex))) / D, float(jnp.mean(jnp.abs(lp - mismatch - ex))) / D,
                      float(jnp.mean(jnp.abs(mismatch))) / D, float(pth.alpha(1.0)), int(info.nfe)])
    table2 = markdown_table(["path", "|err| nats/dim (default prior)", "solver |err| nats/dim",
                             "|prior mismatch| nats/dim", "alpha(1)", "NFE"], rows2)
    print("\n## exact trace on every path, rtol = atol = 1e-7 (error = solver error + prior mismatch)\n")
    print(table2)

    # tolerance sweep on the linear path
    rows3 = []
    for tol in (1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9):
        lp, info = gf.log_prob(fn, path, x, prediction="velocity", rtol=tol, atol=tol)
        rows3.append([tol, float(np.mean(np.abs(np.asarray(lp) - exact))) / D, int(info.nfe)])
    table3 = markdown_table(["rtol = atol", "mean |err| nats/dim", "NFE"], rows3)
    print("\n## error vs tolerance (linear path, tsit5)\n")
    print(table3)

    # Hutchinson variance: 64 probe draws for 16 points
    rows4 = []
    xs = jnp.repeat(x[:16], 64, axis=0)
    for probe, k in (("rademacher", 1), ("gaussian", 1), ("rademacher", 4)):
        lp, _ = gf.log_prob(fn, path, xs, prediction="velocity", trace="hutchinson", probe=probe, num_probes=k,
                            key=jax.random.key(7), rtol=1e-6, atol=1e-6)
        est = np.asarray(lp).reshape(16, 64)
        bias = est.mean(1) - exact[:16]
        se = est.std(1) / math.sqrt(64)
        rows4.append([probe, k, float(est.var(1).mean()), float(np.abs(bias / se).mean()),
                      int(np.sum(np.abs(bias) < 3 * se))])
    table4 = markdown_table(["probe", "probes / eval", "variance of log p (nats^2, mean over points)",
                             "mean |bias| / SE", "points within 3 SE (of 16)"], rows4)
    print("\n## Hutchinson estimator on the rotated Gaussian (d=16)\n")
    print(table4)

    os.makedirs(RESULTS, exist_ok=True)
    out = {"timing": {k: {kk: vv for kk, vv in v.items()} for k, v in timing.items()},
           "errors_mean_nats_per_dim": {k: float(v.mean()) for k, v in errors.items()},
           "nfe": nfe, "compile_s": compile_s, "paths": rows2, "tolerance_sweep": rows3, "hutchinson": rows4}
    write_json(os.path.join(RESULTS, "likelihood.json"), out, default=str)
    with open(os.path.join(RESULTS, "likelihood.md"), "w") as f:
        f.write("\n\n".join([f"log-likelihood of {N} points in d={D}; torch with one intra-op thread, XLA with "
                               f"its default threads on {os.cpu_count()} cores", table1, table2, table3, table4]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
