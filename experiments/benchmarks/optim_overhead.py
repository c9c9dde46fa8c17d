"""Time per optimizer update on a ~10M-parameter pytree, relative to optax.adam in the same run.

    python experiments/benchmarks/optim_overhead.py                 # ~1-2 min on 2 CPU cores
    python experiments/benchmarks/optim_overhead.py --repeats 31 --out experiments/benchmarks/results/optim_overhead.json

Each contender is one jitted ``(grads, opt_state, params) -> (params, opt_state)`` (update and
apply_updates) with the state and parameter buffers donated, as in a train step. Contenders are
timed round-robin (interleaved), after warm-up, and compared by the ratio of medians measured in
this run (also of the minima, and of the process CPU time per update, which counts less of the
other jobs on a shared machine); compilation is timed separately. The pytree mimics a network: nine 1024x1024 weight
matrices with biases and one 560x1024 matrix (10.0M float32 parameters). Target from the
issue: Grams, FAdam and diffGrad at most 1.3x optax.adam.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import genflow as gf  # noqa: E402
from _timing import interleaved, markdown_table, write_json  # noqa: E402


def make_params(key, scale: float = 1.0) -> dict:
    n = max(1, round(1024 * scale))
    keys = jax.random.split(key, 10)
    params = {f"layer{i}": {"w": 0.02 * jax.random.normal(keys[i], (n, n)), "b": jnp.zeros((n,))} for i in range(9)}
    params["head"] = {"w": 0.02 * jax.random.normal(keys[9], (max(1, round(560 * scale)), n))}
    return params


def contenders() -> dict[str, optax.GradientTransformation]:
    return {
        "optax.adam": optax.adam(1e-3),
        "optax.adamw (wd 1e-4)": optax.adamw(1e-3, weight_decay=1e-4),
        "gf.optim.grams": gf.optim.grams(1e-3),
        "gf.optim.grams (wd 1e-4)": gf.optim.grams(1e-3, weight_decay=1e-4),
        "gf.optim.fadam (wd 0)": gf.optim.fadam(1e-3, weight_decay=0.0),
        "gf.optim.fadam (wd 0.1, default)": gf.optim.fadam(1e-3),
        "gf.optim.diffgrad": gf.optim.diffgrad(1e-3),
        "optax.contrib.momo_adam": optax.contrib.momo_adam(1e-2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="matrix side / 1024 (1.0: 10.0M parameters)")
    p.add_argument("--out", default="experiments/benchmarks/results/optim_overhead.json")
    args = p.parse_args(argv)

    params0 = make_params(jax.random.key(0), args.scale)
    grads = jax.tree.map(lambda x: 1e-3 * jax.random.normal(jax.random.key(1), x.shape), params0)
    n_params = sum(x.size for x in jax.tree.leaves(params0))
    value = jnp.float32(1.0)

    runs, compile_s, cpu = {}, {}, {}
    for name, opt in contenders().items():
        tx = optax.with_extra_args_support(opt)

        def update(g, state, params, tx=tx):
            u, state = tx.update(g, state, params, value=value)
            return optax.apply_updates(params, u), state

        params = jax.tree.map(jnp.copy, params0)
        state = opt.init(params)
        t0 = time.perf_counter()
        fn = jax.jit(update, donate_argnums=(1, 2)).lower(grads, state, params).compile()
        compile_s[name] = time.perf_counter() - t0
        carry = {"params": params, "state": state}
        cpu[name] = []

        def call(fn=fn, carry=carry, cpu_runs=cpu[name]):
            c0 = time.process_time()
            carry["params"], carry["state"] = fn(grads, carry["state"], carry["params"])
            jax.block_until_ready(carry["params"])
            cpu_runs.append(time.process_time() - c0)
            return carry["params"]

        runs[name] = call

    res = interleaved(runs, repeats=args.repeats, warmup=args.warmup, block=jax.block_until_ready)
    base = res["optax.adam"]["median"]
    # CPU time of the process (all XLA threads) per update: less sensitive than wall time to
    # other jobs on a shared machine (it does not count time spent waiting for a core)
    cpu_med = {k: float(np.median(v[-args.repeats:])) for k, v in cpu.items()}
    rows = []
    for name, r in res.items():
        rows.append([name, 1e3 * r["median"], 1e3 * r["min"], 1e3 * r["max"], r["median"] / base,
                     r["min"] / res["optax.adam"]["min"], 1e3 * cpu_med[name], cpu_med[name] / cpu_med["optax.adam"],
                     compile_s[name]])
    targets = {k: res[k]["median"] / base for k in ("gf.optim.grams", "gf.optim.fadam (wd 0)",
                                                     "gf.optim.fadam (wd 0.1, default)", "gf.optim.diffgrad")}
    text = "\n".join([
        f"{n_params / 1e6:.2f}M float32 parameters, {len(jax.tree.leaves(params0))} leaves, {args.repeats} interleaved "
        f"repeats, {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end", "",
        markdown_table(["update", "median ms", "min ms", "max ms", "x adam (median)", "x adam (min)", "CPU ms (median)",
                        "x adam (CPU)", "compile s"], rows), "",
        "target <= 1.3x optax.adam: " + ", ".join(f"{k} {v:.2f}x {'met' if v <= 1.3 else 'MISSED'}"
                                                  for k, v in targets.items())])
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        write_json(out, {"n_params": int(n_params), "repeats": args.repeats, "results": {
            k: {"median_s": v["median"], "min_s": v["min"], "max_s": v["max"], "ratio_to_adam": v["median"] / base,
                "min_ratio_to_adam": v["min"] / res["optax.adam"]["min"], "cpu_median_s": cpu_med[k],
                "cpu_ratio_to_adam": cpu_med[k] / cpu_med["optax.adam"], "compile_s": compile_s[k]}
            for k, v in res.items()}})
        out.with_suffix(".md").write_text(text + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
