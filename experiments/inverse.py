"""Inverse problems on the bundled 8x8 digits: inpainting, 2x super-resolution, deblurring and
compressed sensing with DPS, MCG, FlowDPS, DDNM, PiGDM and TMPD on one trained prior, plus the pseudo-inverse
baseline. Writes one image grid per task (inpainting.png, super_resolution_x2.png,
deblur_gaussian.png, compressed_sensing.png: ground truth, pseudo-inverse, samples per method),
prior_loss.png, results.json and results.md (PSNR / SSIM / NFE / wall time per task and method, and
the validation PSNR of every step size tried).

    python experiments/inverse.py                  # trains a small flow-matching prior inline (~4 min on 2 CPU cores)
    python experiments/inverse.py --quick          # a smoke run for the tests

The prior is trained here (flow matching on the linear path, an MLP over the 64 pixels); every
posterior sampler reads it through the same ``fn(x, t)`` (any path and prediction kind work).
Each method's step size is chosen per task on validation images (the first ``--n_val`` test
images, their own measurement noise and starting noise) from a small grid, extended past an end
that holds the best (``choose_scale``), then applied to the next ``--n_test`` images.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import genflow as gf
from genflow import inverse as inv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

SHAPE = (8, 8, 1)


@dataclasses.dataclass
class Config:
    train_steps: int = 4000
    batch: int = 256
    hidden: int = 512
    lr: float = 1e-3
    steps: int = 100            # sampler steps (NFE = steps, + 1 when denoising at the end)
    n_test: int = 182           # n_val + n_test <= 364, the digits test split (200 + 200 had tested on 164)
    n_val: int = 182            # same batch size as the test set: one compilation serves both
    noise: float = 0.05         # measurement noise std on the [-1, 1] scale
    seed: int = 0
    out: str = "runs/inverse"
    quick: bool = False


# Step sizes tried first per method on the validation images (per task; choose_scale extends the
# grid past an end that holds the best); DDNM has none.
SCALES = {
    "dps": (0.1, 0.3, 1.0, 3.0),
    "mcg": (0.03, 0.1, 0.3, 1.0),
    "flowdps": (0.25, 0.5, 1.0, 1.5),
    "ddnm": (None,),
    "pigdm": (0.3, 1.0, 3.0),  # 1 = the Gaussian likelihood as is
    "tmpd": (0.3, 1.0, 3.0),
}


def choose_scale(scales, evaluate, factor: float = 3.0, max_extend: int = 4):
    """The step size with the best finite ``evaluate(scale)`` (validation PSNR), and every value
    tried. When the best is at an end of the grid, the grid grows past that end by ``factor`` (up to
    ``max_extend`` times), until the best is inside it or the next value is worse or not finite:
    a step size chosen at the edge of a fixed grid understated the method (FlowDPS at 1.5, the
    top of its grid, in every task of the first runs). Then the geometric midpoints between the
    best and its neighbours are tried once. ``(None,)`` (DDNM) is evaluated as is.
    Returns ``(best, {scale: psnr})`` (NaN PSNRs are never chosen unless every one is NaN)."""
    tried = {s: evaluate(s) for s in scales}
    if tuple(scales) == (None,):
        return None, tried

    def best_finite():  # (NaN PSNRs compare false: max() kept a NaN first entry)
        finite = {s: v for s, v in tried.items() if np.isfinite(v)}
        return max(finite, key=finite.get) if finite else None

    for _ in range(max_extend):
        best = best_finite()
        if best is None:
            break
        if best == max(tried):
            new = float(f"{best * factor:.3g}")  # (3 digits: 0.3 / 3 is 0.09999999999999999)
        elif best == min(tried):
            new = float(f"{best / factor:.3g}")
        else:
            break
        tried[new] = evaluate(new)
    best = best_finite()
    if best is not None:  # one refinement: the geometric midpoints between the best and its neighbours
        ordered = sorted(tried)
        i = ordered.index(best)
        for j in (i - 1, i + 1):
            if 0 <= j < len(ordered):
                mid = float(f"{math.sqrt(best * ordered[j]):.3g}")
                if mid not in tried:
                    tried[mid] = evaluate(mid)
        best = best_finite()
    return (next(iter(tried)) if best is None else best), dict(sorted(tried.items()))


def tasks(key):
    return {
        "inpainting": inv.random_inpainting(key, SHAPE, keep=0.4),
        "super_resolution_x2": inv.super_resolution(2),
        "deblur_gaussian": inv.gaussian_blur((8, 8), 1.0, size=5),
        "compressed_sensing": inv.compressed_sensing(jax.random.fold_in(key, 1), SHAPE, 24),
    }


class FlatMLP:
    """Flow-matching prior on the 64 pixels: ``fn(x: [B, 8, 8, 1], t: [B])``."""

    def __init__(self, hidden: int):
        self.net = gf.nets.MLP(hidden=(hidden,) * 3, time_embedding="sinusoidal")

    def init(self, key):
        return self.net.init(key, jnp.zeros((1, 64)), jnp.zeros((1,)))

    def apply(self, params, x, t):
        return self.net.apply(params, x.reshape(x.shape[0], -1), t).reshape(x.shape)


def train_prior(cfg: Config, xtr: np.ndarray):
    model = FlatMLP(cfg.hidden)
    path = gf.paths.linear()
    params = model.init(jax.random.key(cfg.seed))
    opt = optax.adam(cfg.lr)
    loss_fn = gf.train.diffusion_objective(model.apply, path, prediction="velocity")
    data = jnp.asarray(xtr)

    def batch_fn(key):
        return data[jax.random.randint(key, (cfg.batch,), 0, data.shape[0])]

    state = gf.train.init_state(params, opt, jax.random.key(cfg.seed + 1), ema_decays=(0.999,))
    state, hist = gf.train.fit(state, gf.train.make_train_step(loss_fn, opt), batch_fn, cfg.train_steps,
                               chunk_size=500, progress=not cfg.quick, desc="prior")
    return jax.tree_util.Partial(model.apply, state.ema["0.999"]), path, hist


def validate(cfg: Config) -> None:
    """``SystemExit`` naming a bad flag, before the prior is trained (--steps 0 and --noise < 0
    failed after training, --train_steps 0 after every sampler ran, --batch 0 with a
    ZeroDivisionError)."""
    _cli.require_min(cfg, train_steps=1, batch=1, hidden=1, steps=1, n_val=1, n_test=1)
    _cli.require_finite(cfg, "noise")
    _cli.require_finite(cfg, "lr", strict=True)
    n = len(gf.data.load_digits("test")[1])  # (checked in run, after --out was made)
    if cfg.n_val + cfg.n_test > n:
        raise SystemExit(f"--n_val + --n_test must be <= {n} (the digits test split), each >= 1; got "
                         f"{cfg.n_val} + {cfg.n_test}")


OUTPUTS = ("results.json", "results.md", "prior_loss.png", "inpainting.png", "super_resolution_x2.png",
           "deblur_gaussian.png", "compressed_sensing.png")


def run(cfg: Config) -> dict:
    validate(cfg)
    _cli.make_out(cfg.out, "inverse")
    with _cli.stale_outputs_removed(cfg.out, OUTPUTS):  # (a failed rerun left the earlier run's results)
        return _run(cfg)


def _run(cfg: Config) -> dict:
    t_wall = time.perf_counter()
    xtr, _ = gf.data.load_digits("train")
    xte, _ = gf.data.load_digits("test")
    x_val, x_test = jnp.asarray(xte[: cfg.n_val]), jnp.asarray(xte[cfg.n_val: cfg.n_val + cfg.n_test])
    fn, path, hist = train_prior(cfg, xtr)
    key = jax.random.key(cfg.seed + 2)
    noise = inv.GaussianNoise(cfg.noise)
    results, grids, chosen, tried_all = {}, {}, {}, {}
    for task, op in tasks(key).items():
        y = noise.sample(jax.random.fold_in(key, 7), op(x_test))
        jax.block_until_ready(op.pinv(y))  # (compiles; the second call is timed, as the samplers' are)
        t0 = time.perf_counter()
        base = jax.block_until_ready(op.pinv(y))
        dt = time.perf_counter() - t0  # (read after the metrics, it timed their compilation: 990 ms in the first task)
        row = {"pinv": dict(psnr=float(gf.metrics.psnr(jnp.clip(base, -1, 1), x_test).mean()),
                            ssim=float(gf.metrics.ssim(jnp.clip(base, -1, 1), x_test).mean()), nfe=0, seconds=dt)}
        grids[task] = {"truth": np.asarray(x_test[:8]), "A^+ y": np.asarray(jnp.clip(base[:8], -1, 1))}
        x1 = jax.random.normal(jax.random.fold_in(key, 11), x_test.shape)
        y_val = noise.sample(jax.random.fold_in(key, 8), op(x_val))
        x1_val = jax.random.normal(jax.random.fold_in(key, 12), x_val.shape)
        for method, scales in SCALES.items():
            common = dict(prediction="velocity", method=method, steps=cfg.steps, noise=noise)
            if method == "pigdm":  # its isotropic prior variance: the training pixels' variance
                common["data_var"] = float(np.var(xtr))
            # choose the step size on the validation images (the scale is traced: no recompile)
            def val_psnr(sc):
                hp = {} if sc is None else {"scale": sc}
                xv, _ = inv.posterior_sample(fn, path, x1_val, y_val, op, key=jax.random.fold_in(key, 14), **common, **hp)
                return float(gf.metrics.psnr(jnp.clip(xv, -1, 1), x_val).mean())

            best, tried = choose_scale(scales, val_psnr)
            chosen.setdefault(task, {})[method] = best
            tried_all.setdefault(task, {})[method] = {str(k): v for k, v in tried.items()}
            hp = {} if best is None else {"scale": best}
            args = dict(common, key=jax.random.fold_in(key, 13), **hp)
            x, info = inv.posterior_sample(fn, path, x1, y, op, **args)  # compile for this batch shape
            t0 = time.perf_counter()
            x, info = inv.posterior_sample(fn, path, x1, y, op, **args)
            x = jnp.clip(jax.block_until_ready(x), -1, 1)
            dt = time.perf_counter() - t0
            row[method] = dict(psnr=float(gf.metrics.psnr(x, x_test).mean()), ssim=float(gf.metrics.ssim(x, x_test).mean()),
                               nfe=int(info.nfe), vjp=int(info.vjp), jvp=int(info.jvp), seconds=dt)
            grids[task][method] = np.asarray(x[:8])
        results[task] = row
        print(task, {m: (round(v["psnr"], 2), round(v["ssim"], 3)) for m, v in row.items()}, flush=True)

    # plots: one grid per task (rows: truth, pseudo-inverse, methods)
    for task, rows in grids.items():
        imgs = np.concatenate(list(rows.values()))
        gf.viz.image_grid(imgs, nrow=8, title=task, row_labels=list(rows), path=os.path.join(cfg.out, f"{task}.png"))
    gf.viz.curves({"prior loss": hist["loss"]}, ylabel="flow-matching loss", smooth=100,
                  path=os.path.join(cfg.out, "prior_loss.png"))
    table = gf_table(results)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(table + "\n\n" + scale_table(tried_all, chosen) + "\n")
    out = {"config": dataclasses.asdict(cfg), "results": results, "chosen_scale": chosen,
           "validation_psnr": tried_all,
           "wall_time_s": time.perf_counter() - t_wall,
           "prior_final_loss": float(np.mean(hist["loss"][-200:]))}
    _cli.write_json(os.path.join(cfg.out, "results.json"), out)
    print(table)
    return out


def scale_table(tried: dict, chosen: dict) -> str:
    """Validation PSNR of every step size tried, per task and method; the chosen one in bold."""
    lines = ["| task | method | validation PSNR (dB) per step size |", "|---|---|---|"]
    for task, methods in tried.items():
        for method, psnrs in methods.items():
            if list(psnrs) == ["None"]:
                continue
            cells = [(f"**{k}: {v:.2f}**" if k == str(chosen[task][method]) else f"{k}: {v:.2f}") for k, v in psnrs.items()]
            lines.append(f"| {task} | {method} | " + ", ".join(cells) + " |")
    return "\n".join(lines)


def gf_table(results: dict) -> str:
    methods = list(next(iter(results.values())))
    lines = ["| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for task, row in results.items():
        cells = [f"{row[m]['psnr']:.2f} dB / {row[m]['ssim']:.3f} / {row[m]['nfe']} NFE"
                 + (f" + {row[m]['jvp']} JVP" if row[m].get("jvp") else "") + f" / {1e3 * row[m]['seconds']:.1f} ms"
                 for m in methods]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUICK = dict(train_steps=1500, steps=20, n_test=32, n_val=32, hidden=128)


def main(argv=None) -> int:
    run(_cli.parse(Config, argv, __doc__, quick=QUICK))
    return 0


if __name__ == "__main__":
    _cli.terminate_as_interrupt()
    sys.exit(main())
