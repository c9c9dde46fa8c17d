"""Empirical convergence order of the fixed-step ODE solvers on the Gaussian oracle.

For every path in ``gf.paths.names()``, the exact model of a 2-D Gaussian with a non-diagonal
covariance (``gf.oracles.Gaussian.full``) is integrated from t = 1 to ``path.t_min`` with
``euler``, ``heun`` and ``midpoint`` at several step counts; the error is the rms relative
error against the closed-form probability-flow map ``oracle.flow_map`` (no final denoising
step, uniform time grid, float32): ``rms(x - ref) / rms(ref)``, relative to the map's own rms,
not to its spread about the data mean as in ``samplers.py`` and :func:`measure_many_steps` (on
this oracle the errors here are 1.6x smaller than on that scale; the fitted orders are the same).
The order is the least-squares slope of log(error) vs log(steps) over the errors above the
float32 round-off floor (``FLOOR`` = 1e-6: below it the error stops falling), next to the local
slopes between consecutive step counts; the last local slope is the asymptotic order.

    python experiments/benchmarks/solver_order.py            # prints a Markdown table
    python experiments/benchmarks/solver_order.py --json experiments/benchmarks/results/solver_order.json
    python experiments/benchmarks/solver_order.py --many-steps   # float32 Karras grids up to 800 steps into sigma = 0
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import genflow as gf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import markdown_table, write_json  # noqa: E402

SOLVERS = ("euler", "heun", "midpoint")
STEPS = (8, 16, 32, 64, 128)
FLOOR = 1e-6  # float32 round-off of the solution (relative): errors below it are not fitted
# the natural prediction kind of each path (every kind gives the same exact ODE for the oracle)
KIND = {"linear": "velocity", "vp_linear": "eps", "vp_cosine": "v", "ve": "eps", "edm": "x0"}


def oracle() -> gf.oracles.Gaussian:
    return gf.oracles.Gaussian.full(jnp.array([0.7, -1.2]), jnp.array([[0.8, 0.3], [0.3, 0.5]]))


def fit_orders(errs, steps, floor: float) -> tuple[float, list[float]]:
    """Least-squares order over the errors above ``floor`` and the local orders between
    consecutive step counts (those ending above ``floor``)."""
    le, ls = np.log(errs), np.log(np.asarray(steps, float))
    keep = np.asarray(errs) > floor
    slope = float(-np.polyfit(ls[keep], le[keep], 1)[0]) if keep.sum() >= 2 else float("nan")
    local = [float(-(le[i + 1] - le[i]) / (ls[i + 1] - ls[i])) for i in range(len(steps) - 1) if errs[i + 1] > floor]
    return slope, local


def measure(name: str, n: int = 512, steps=STEPS, solvers=SOLVERS, seed: int = 0) -> dict:
    """Errors and fitted orders of each solver on path ``name``."""
    path, g = gf.paths.get(name), oracle()
    kind = KIND.get(name, "velocity")
    x1 = g.prior_sample(jax.random.key(seed), n, path, 1.0)
    t_end = max(path.t_min, 0.0)
    ref = g.flow_map(x1, 1.0, t_end, path)
    fn = g.model(path, kind)
    out = {"path": name, "prediction": kind, "t_end": float(t_end), "steps": list(steps), "solvers": {}}
    for solver in solvers:
        errs = []
        for s in steps:
            x, info = gf.sample(fn, path, x1, prediction=kind, solver=solver, steps=s, denoise=False)
            errs.append(float(jnp.sqrt(jnp.mean((x - ref) ** 2)) / jnp.sqrt(jnp.mean(ref**2))))
        slope, local = fit_orders(errs, steps, FLOOR)
        nfe = int(info.nfe) // steps[-1]
        out["solvers"][solver] = {"errors": errs, "order": slope, "local_orders": local, "nfe_per_step": nfe}
    return out


def measure_all_fixed_step(name: str, n: int = 64, steps=(16, 32, 64, 128)) -> dict:
    """Float64 errors and fitted orders of every fixed-step flow-map solver (the dedicated
    diffusion solvers included) on path ``name``, on grids uniform in log-SNR (as in
    tests/test_sampling_orders.py, which asserts these slopes)."""
    with jax.enable_x64(True):
        path = gf.paths.get(name)
        g0 = oracle()
        g = gf.oracles.Gaussian(*(jnp.asarray(a, jnp.float64) for a in (g0.mean, g0.var, g0.basis)))
        kind = KIND.get(name, "velocity")
        x1 = g.prior_sample(jax.random.key(0), n, path, 1.0)
        ref = g.flow_map(x1, 1.0, path.t_min, path)
        fn = g.model(path, kind)
        out = {"path": name, "prediction": kind, "steps": list(steps), "solvers": {}}
        for solver, spec in gf.sampling.solvers().items():
            if spec.target != "flow_map" or spec.adaptive:
                continue
            errs = []
            for s in steps:
                x, _ = gf.sample(fn, path, x1, prediction=kind, solver=solver, steps=s, schedule="logsnr", denoise=False)
                errs.append(float(jnp.sqrt(jnp.mean((x - ref) ** 2)) / jnp.sqrt(jnp.mean(ref**2))))
            slope, local = fit_orders(errs, steps, 1e-13)
            out["solvers"][solver] = {"errors": errs, "order": slope, "local_orders": local,
                                      "theoretical": spec.order}
    return out


def measure_many_steps(n: int = 512, steps=(50, 100, 200, 400, 800)) -> dict:
    """Float32 errors of every deterministic scan solver with an x0 model on the linear path, from
    noise level 80 into clean data (``sigma = 0``) on Karras grids (sigma_min 0.002) of up to 800
    steps: where the error stops falling, float32 round-off (or an amplification of it) sets the floor."""
    path = gf.paths.linear()
    g = oracle()
    t0 = 80.0 / 81.0
    x1 = g.prior_sample(jax.random.key(0), n, path, t0)
    ref = g.flow_map(x1, t0, 0.0, path)
    scale = jnp.sqrt(jnp.mean((ref - g.mean) ** 2))
    fn = g.model(path, "x0")
    out = {"steps": list(steps), "solvers": {}}
    for solver, spec in gf.sampling.solvers().items():
        if spec.target != "flow_map" or spec.adaptive or spec.nfe_per_step != 1:
            continue
        errs = []
        for s in steps:
            x, _ = gf.sample(fn, path, x1, prediction="x0", solver=solver,
                             schedule=gf.sampling.time_grid(path, s, "karras", t_start=t0))
            errs.append(float(jnp.sqrt(jnp.mean((x - ref) ** 2)) / scale))
        out["solvers"][solver] = errs
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="number of trajectories")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--all-fixed-step", action="store_true",
                   help="every fixed-step solver (DDIM, DPM-Solver++, DEIS, UniPC, EDM Heun, ...), float64, "
                        "log-SNR grids of 16..128 steps")
    p.add_argument("--many-steps", action="store_true",
                   help="float32, x0 model, Karras grids of 50..800 steps from noise level 80 into sigma = 0")
    args = p.parse_args(argv)
    if args.many_steps:
        r = measure_many_steps(args.n)
        print(f"Relative error vs the closed-form flow map (float32, x0 model, linear path, noise level 80 -> 0 "
              f"on Karras grids, sigma_min 0.002; {args.n} trajectories, 2-D Gaussian oracle)\n")
        print(markdown_table(["solver"] + [f"{s} steps" for s in r["steps"]],
                             [[k] + [f"{e:.2e}" for e in v] for k, v in r["solvers"].items()]))
        if args.json:
            write_json(args.json, r, indent=1)
        return 0
    if args.all_fixed_step:
        results = [measure_all_fixed_step(name) for name in gf.paths.names()]
        solvers = list(results[0]["solvers"])
        print("Fitted convergence order (least squares over 16, 32, 64, 128 log-SNR steps; float64, 64 "
              "trajectories, 2-D Gaussian oracle; last local order in brackets)\n")
        rows = [[s, results[0]["solvers"][s]["theoretical"]]
                + [f"{r['solvers'][s]['order']:.2f} ({r['solvers'][s]['local_orders'][-1]:.2f})" for r in results]
                for s in solvers]
        print(markdown_table(["solver", "order"] + [f"{r['path']} ({r['prediction']})" for r in results], rows))
        if args.json:
            write_json(args.json, {"results": results}, indent=1)
        return 0
    results = [measure(name, args.n) for name in gf.paths.names()]
    header = ["path", "prediction", "solver"] + [f"err@{s}" for s in STEPS] + ["fitted order", "local orders", "last local"]
    rows = []
    for r in results:
        for solver, v in r["solvers"].items():
            rows.append([r["path"], r["prediction"], solver] + [f"{e:.2e}" for e in v["errors"]]
                        + [f"{v['order']:.3f}", " ".join(f"{o:.2f}" for o in v["local_orders"]),
                           f"{v['local_orders'][-1]:.2f}"])
    print(f"Convergence order on the Gaussian oracle (2-D, non-diagonal covariance; rms relative error "
          f"vs the closed-form flow map, {args.n} trajectories, t = 1 -> t_min, float32;\n"
          f"fitted order = least-squares slope over the errors above {FLOOR:g}; local orders between "
          f"consecutive step counts)\n")
    print(markdown_table(header, rows))
    if args.json:
        write_json(args.json, {"device": jax.devices()[0].device_kind, "results": results}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
