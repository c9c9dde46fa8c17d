"""Training throughput of the image networks: steps/s, examples/s, model FLOPs and MFU.

U-Net and DiT at two sizes each, one full train step (flow-matching loss, forward + backward,
Adam update, EMA) on 32x32x3 images. Contenders are timed round-robin after warm-up
(``_timing.interleaved``); compilation is reported separately. Model FLOPs per step come from
XLA's cost analysis of the compiled step; MFU = FLOPs / step time / peak FLOP/s of the device
(bf16 dense peak, looked up by ``device_kind``; not reported on CPU, where GFLOP/s are shown).

    python experiments/benchmarks/train_throughput.py                 # CPU: float32, batch 16
    python experiments/benchmarks/train_throughput.py --dtype bfloat16 --batch 256   # GPU/TPU

Writes a Markdown table to stdout and JSON to experiments/benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import genflow as gf  # noqa: E402
from _timing import interleaved, markdown_table, write_json  # noqa: E402

# Dense bf16 peak FLOP/s per chip (vendor data sheets).
PEAK_FLOPS = {"H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L4": 121e12,
              "L40S": 362e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6": 918e12}


def peak_flops(device) -> float | None:
    """The longest name of PEAK_FLOPS found in ``device.device_kind`` as whole words (a substring
    match read an L40S as an L4, and an H100 PCIe as the SXM part)."""
    kind = device.device_kind
    hits = [name for name in PEAK_FLOPS if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", kind, re.IGNORECASE)]
    return PEAK_FLOPS[max(hits, key=len)] if hits else None


def models(dtype):
    return {
        "UNet ch32 (1,2,2)x1": gf.nets.UNet(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dtype=dtype),
        "UNet ch64 (1,2,2)x2": gf.nets.UNet(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                                            dtype=dtype),
        "DiT-Ti/4": gf.nets.dit("Ti/4", dtype=dtype),
        "DiT-S/2": gf.nets.dit("S/2", dtype=dtype),
    }


def build(net, batch: int, key):
    x = jax.random.uniform(key, (batch, 32, 32, 3), minval=-1, maxval=1)
    params = jax.jit(net.init)(key, x[:1], jnp.zeros((1,)))
    opt = gf.train.make_optimizer(1e-4, name="adam", clip_norm=1.0)
    state = gf.train.init_state(params, opt, key, ema_decays=(0.9999,))
    loss = gf.train.diffusion_objective(net.apply, gf.paths.linear(), prediction="velocity")
    step = jax.jit(gf.train.make_train_step(loss, opt), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    holder = {"state": state}

    def run(n: int):
        def go():
            for _ in range(n):
                holder["state"], m = compiled(holder["state"], x)
            return m["loss"]
        return go

    return run, compile_s, flops, n_params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default="", help="';'-separated model names (default: all; the names contain commas)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    dev = jax.devices()[0]
    peak = peak_flops(dev)
    nets = models(dtype)
    if args.only:
        wanted = [s.strip() for s in args.only.split(";") if s.strip()]
        if set(wanted) - set(nets):
            p.error(f"unknown model(s) {sorted(set(wanted) - set(nets))}; choose from {list(nets)}")
        nets = {k: v for k, v in nets.items() if k in wanted}
    built, info = {}, {}
    for i, (name, net) in enumerate(nets.items()):
        run, compile_s, flops, n_params = build(net, args.batch, jax.random.key(i))
        built[name] = run(args.steps)
        info[name] = {"compile_s": compile_s, "flops_per_step": flops, "params": n_params}
        print(f"built {name}: compile {compile_s:.1f} s, {flops / 1e9:.1f} GFLOP/step", flush=True)
    times = interleaved(built, repeats=args.repeats, warmup=1)
    rows, results = [], {}
    for name in nets:
        t = times[name]
        per_step = t["median"] / args.steps
        flops = info[name]["flops_per_step"]
        achieved = flops / per_step
        mfu = achieved / peak if peak else None
        results[name] = dict(info[name], step_s_median=per_step, step_s_min=t["min"] / args.steps,
                             step_s_max=t["max"] / args.steps, steps_per_s=1.0 / per_step,
                             examples_per_s=args.batch / per_step, achieved_flops=achieved, mfu=mfu)
        rows.append([name, f"{info[name]['params'] / 1e6:.2f}M", 1.0 / per_step, args.batch / per_step,
                     f"{per_step * 1e3:.0f} ({t['min'] / args.steps * 1e3:.0f}-{t['max'] / args.steps * 1e3:.0f})",
                     flops / 1e9, achieved / 1e9, "n/a" if mfu is None else f"{100 * mfu:.1f}%",
                     info[name]["compile_s"]])
    header = ["model", "params", "steps/s", "examples/s", "ms/step median (min-max)", "GFLOP/step (XLA)",
              "achieved GFLOP/s", "MFU", "compile s"]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), {jax.device_count()} device(s); batch {args.batch}, "
          f"{args.dtype}, 32x32x3, flow-matching step with Adam + EMA; {args.repeats} interleaved repeats of "
          f"{args.steps} steps")
    print(markdown_table(header, rows))
    os.makedirs(args.out, exist_ok=True)
    # (a partial run must not replace the full run's results)
    fname = os.path.join(args.out, f"train_throughput_{jax.default_backend()}_{args.dtype}"
                                   f"{'_partial' if args.only else ''}.json")
    write_json(fname, {"device": dev.device_kind, "backend": jax.default_backend(), "batch": args.batch,
                       "dtype": args.dtype, "peak_flops": peak, "results": results})
    print(f"wrote {fname}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
