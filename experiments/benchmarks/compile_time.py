"""Compile time of each solver's sampler with a U-Net, against the compile time of the U-Net alone.

A sampler's compiled program holds one copy of the network per call site in its traced code: each
copy is compiled again, which with a large network is most of the time to a first sample (on a
GPU, seconds to minutes). genflow's own solvers aim at one copy: a step's stages share one (a scan
over them), and the multistep solvers, EDM Heun and Restart run the final denoising step as their
loop's last iteration (the adaptive tsit5 / dopri5 / dopri8 convert their last evaluation instead). This script reports, per solver, the copies (counted as a marker operation
added to the model, in the lowered program) and the seconds to trace, lower and compile
``jax.jit(lambda p, x1: gf.sample(Partial(net_fn, p), path, x1, ...))``, with their ratio to the
same for ``jax.jit(net.apply)`` measured in the same run (``ratio``: sampler / network, total).

    .venv/bin/python experiments/benchmarks/compile_time.py                  # every solver, ~3 min on 2 CPU cores
    .venv/bin/python experiments/benchmarks/compile_time.py --solvers dpm++2m edm_heun --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

import genflow as gf
from genflow.nets import UNet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import markdown_table, write_json  # noqa: E402

MARK = "bessel_i1e"  # an operation the U-Net does not use: its count is the network's copies


def _seconds(fun, *args) -> tuple[list[float], str]:
    """``[trace, lower, compile, total]`` seconds of ``jax.jit(fun)(*args)`` and its lowered text."""
    t0 = time.perf_counter()
    traced = jax.jit(fun).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2, t3 - t0], lowered.as_text()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solvers", nargs="+", default=None, help="default: every solver in gf.sampling.solvers()")
    ap.add_argument("--path", default="vp_linear", help="a gf.paths name (vp / ve / edm paths denoise at the end)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ch", type=int, default=64)
    ap.add_argument("--res", type=int, default=32, help="image side")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    solvers = a.solvers or list(gf.sampling.solvers())
    unknown = sorted(set(solvers) - set(gf.sampling.solvers()))
    if unknown:
        ap.error(f"unknown solvers {unknown}; expected names from {sorted(gf.sampling.solvers())}")
    path = gf.paths.get(a.path)
    net = UNet(ch=a.ch, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(a.res // 4,))
    x = jnp.zeros((a.batch, a.res, a.res, 3))
    params = jax.jit(net.init)(jax.random.key(0), x, jnp.zeros((a.batch,)))
    n_arrays = len(jax.tree.leaves(params))

    def marked(p, xx, t):
        return net.apply(p, xx, t) + 0.0 * jax.lax.bessel_i1e(xx)

    base, text = _seconds(marked, params, x, jnp.ones((a.batch,)))
    assert text.count(MARK) == 1, "the marker must appear once in one network call"
    rows = [["network alone", 1, *base, 1.0]]
    for s in solvers:
        key = jax.random.key(1) if gf.sampling.solvers()[s].stochastic else None

        def sample(p, x1, s=s, key=key):
            fn = jax.tree_util.Partial(marked, p)
            return gf.sample(fn, path, x1, prediction="eps", solver=s, steps=a.steps, key=key)[0]

        secs, text = _seconds(sample, params, x)
        rows.append([s, text.count(MARK), *secs, secs[3] / base[3]])
        print(f"{s:16s} copies {rows[-1][1]}  total {secs[3]:6.2f} s  ratio {rows[-1][-1]:.2f}", flush=True)
    header = ["solver", "copies of the network", "trace (s)", "lower (s)", "compile (s)", "total (s)", "ratio"]
    print(f"\nU-Net ch={a.ch} on [{a.batch}, {a.res}, {a.res}, 3] ({n_arrays} arrays), {a.path}, {a.steps} steps, "
          f"{jax.devices()[0].device_kind}; ratio: total / the network's own\n")
    print(markdown_table(header, rows))
    if a.json:
        write_json(a.json, {"config": vars(a), "arrays": n_arrays, "device": jax.devices()[0].device_kind,
                            "header": header, "rows": rows})


if __name__ == "__main__":
    main()
