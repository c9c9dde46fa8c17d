"""Learning-rate sensitivity: the MoMo paper's headline claim, checked on two small tasks.

MoMo (Schaipp et al. 2023) claims that its Polyak-type adaptive step makes SGD-M and Adam far
less sensitive to the learning rate. Here every optimizer is trained at each learning rate of a
4-decade log grid (vmapped over the grid: same initialization, same batches), on

  (a) a digits classifier: a 64-64-64-10 ReLU MLP on scikit-learn's 8x8 digits
      (gf.data.load_digits), softmax cross-entropy; reported: test accuracy and final train loss;
  (b) flow matching on toy 2-D data (moons): a 3x64 SiLU velocity MLP on the linear path;
      reported: final flow-matching loss on a fixed evaluation batch and W2 between Heun
      samples and fresh data (gf.metrics.w2_exact).

Families: SGD-M (momentum 0.9, EMA form as in the MoMo paper) vs MoMo (and MoMo with the on-the-fly lower bound) and SMB on
lr in 10^[-3, 1]; Adam vs MoMo-Adam (and with the lower-bound estimate), Grams, FAdam and diffGrad
on lr in 10^[-4, 0]. A run whose loss becomes non-finite counts as diverged (accuracy 0.1,
loss and W2 infinite). Flatness is the width, in decades, of the contiguous learning-rate range
around the best grid point whose result is within a tolerance of the best (test accuracy
>= best - acc_tol; loss <= best (1 + loss_tol); W2 <= best (1 + w2_tol)), and how many grid
points are within it.

    python experiments/optimizers.py                    # full sweep, a few minutes on 2 CPU cores
    python experiments/optimizers.py --quick true       # a smoke run (~30 s)

Writes sweep.png, results.json and summary.md to --out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import genflow as gf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

SGD_GRID = (-3.0, 1.0)
ADAM_GRID = (-4.0, 0.0)

# name -> (family, log10 lr range, factory(lr) -> optimizer)
OPTIMIZERS: dict[str, tuple[str, tuple[float, float], Callable]] = {
    # SGD-M in the EMA form MoMo builds on (d = 0.9 d + 0.1 g, step -lr d), so that MoMo is
    # "SGD-M with its step capped by a Polyak step" at the same lr; optax.sgd(lr, momentum=0.9)
    # (d = g + 0.9 d) would take 10x larger steps at the same nominal lr.
    "sgd_m": ("sgd", SGD_GRID, lambda lr: optax.sgd(0.1 * lr, momentum=0.9)),
    "momo": ("sgd", SGD_GRID, lambda lr: gf.optim.momo(lr, beta=0.9)),
    "momo_lb": ("sgd", SGD_GRID, lambda lr: gf.optim.momo(lr, beta=0.9, adapt_lower_bound=True)),
    "smb": ("sgd", SGD_GRID, lambda lr: gf.optim.smb(lr)),
    "adam": ("adam", ADAM_GRID, lambda lr: optax.adam(lr)),
    "momo_adam": ("adam", ADAM_GRID, lambda lr: gf.optim.momo_adam(lr)),
    "momo_adam_lb": ("adam", ADAM_GRID, lambda lr: gf.optim.momo_adam(lr, adapt_lower_bound=True)),
    "grams": ("adam", ADAM_GRID, lambda lr: gf.optim.grams(lr)),
    "fadam": ("adam", ADAM_GRID, lambda lr: gf.optim.fadam(lr, weight_decay=0.0)),
    "diffgrad": ("adam", ADAM_GRID, lambda lr: gf.optim.diffgrad(lr)),
}
QUICK_OPTIMIZERS = "sgd_m,momo"


@dataclasses.dataclass
class Config:
    quick: bool = False             # smoke run: 5 learning rates, few steps, SGD-M and MoMo only
    optimizers: str = ",".join(OPTIMIZERS)
    n_lrs: int = 13                 # grid points over the 4 decades (13: 3 per decade)
    digits_steps: int = 1000
    digits_batch: int = 128
    fm_steps: int = 1500
    fm_batch: int = 128
    fm_dataset: str = "moons"
    n_eval: int = 512               # samples for W2
    sample_steps: int = 20          # Heun steps (NFE = 2x)
    acc_tol: float = 0.02           # accuracy within 2 points of the best counts as "as good"
    loss_tol: float = 0.10          # loss within 10% of the best
    w2_tol: float = 0.25            # W2 within 25% of the best
    seed: int = 0
    out: str = "runs/optimizers"
    from_results: str = ""          # redraw the plot and table from a results.json, no training


def parse_config(argv=None) -> Config:
    # (--quick's values apply except to the options given on the command line)
    cfg = _cli.parse(Config, argv, __doc__, quick=dict(n_lrs=5, digits_steps=200, fm_steps=300, n_eval=256,
                                                       sample_steps=10, optimizers=QUICK_OPTIMIZERS))
    unknown = [o for o in cfg.optimizers.split(",") if o not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"--optimizers must be a comma list of {list(OPTIMIZERS)}; unknown {unknown}")
    if cfg.fm_dataset not in gf.data.TOY:
        raise SystemExit(f"--fm_dataset must be one of {sorted(gf.data.TOY)}; got {cfg.fm_dataset!r}")
    # (these failed after the digits sweep, in flow_task or gf.sample, and lost its results)
    _cli.require_min(cfg, n_lrs=2, digits_steps=1, digits_batch=1, fm_steps=1, fm_batch=1, n_eval=2,
                     sample_steps=1)
    _cli.require_finite(cfg, "acc_tol", "loss_tol", "w2_tol")
    if cfg.from_results and not os.path.isfile(cfg.from_results):
        raise SystemExit(f"--from_results {cfg.from_results!r} is not a file")
    return cfg


def sweep(loss_fn, params, batch_fn, factory, lrs, steps: int, key):
    """Train one copy of ``params`` per learning rate (vmapped), the same batches for all.

    Returns (final params [L, ...], loss history [L, steps], diverged [L])."""

    def one(lr):
        opt = factory(lr)
        step = gf.train.make_train_step(loss_fn, opt)
        state = gf.train.init_state(params, opt, key)

        def body(st, _):
            new, m = step(st, batch_fn(gf.train.batch_key(st.rng)))
            return new, (m["loss"], m["finite"])

        state, (losses, finite) = jax.lax.scan(body, state, None, length=steps)
        return state.params, losses, ~jnp.all(finite)

    return jax.jit(jax.vmap(one))(lrs)


def grid(name: str, cfg: Config) -> tuple[str, np.ndarray, Callable]:
    """(family, learning-rate grid [n_lrs], factory) of an optimizer."""
    fam, (lo, hi), factory = OPTIMIZERS[name]
    return fam, np.logspace(lo, hi, cfg.n_lrs), factory


def _at(flat: dict, fmt: str) -> str:
    """``best @ lr`` of a :func:`flatness` record ("diverged" when no run was valid)."""
    return "diverged" if flat["best_lr"] is None else f"{flat['best']:{fmt}} @ {flat['best_lr']:.2g}"


def flatness(lrs: np.ndarray, values: np.ndarray, higher_better: bool, tol: float, relative: bool,
             valid: np.ndarray | None = None) -> dict:
    """Best value, the contiguous log10-lr width around the best within ``tol`` of it, and the
    number of grid points within ``tol``, over the ``valid`` (not diverged, finite) runs only: an
    optimizer that diverged at every learning rate was "within tolerance" of its inf / 0.1 best
    everywhere, the flattest of all."""
    valid = np.isfinite(values) if valid is None else np.asarray(valid, bool) & np.isfinite(values)
    if not valid.any():
        return {"best": float("nan"), "best_lr": None, "width_decades": 0.0, "n_within": 0, "n": int(len(values))}
    v = np.where(valid, values, -np.inf if higher_better else np.inf)
    i = int(np.argmax(v) if higher_better else np.argmin(v))
    best = float(v[i])
    if higher_better:
        ok = v >= (best * (1 - tol) if relative else best - tol)
    else:
        ok = v <= (best * (1 + tol) if relative else best + tol)
    ok &= valid
    lo = hi = i
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(v) - 1 and ok[hi + 1]:
        hi += 1
    log = np.log10(lrs)
    return {"best": best, "best_lr": float(lrs[i]), "width_decades": float(log[hi] - log[lo]),
            "n_within": int(ok.sum()), "n": int(len(v))}


def digits_task(cfg: Config, names: list[str]) -> dict:
    import flax.linen as nn

    xtr, ytr = gf.data.load_digits("train", channels_last=False)
    xte, yte = gf.data.load_digits("test", channels_last=False)
    xtr, ytr, xte, yte = map(jnp.asarray, (xtr, ytr, xte, yte))

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(2):
                x = nn.relu(nn.Dense(64)(x))
            return nn.Dense(10)(x)

    model = Classifier()
    k_init, k_train = jax.random.split(jax.random.key(cfg.seed))
    params = model.init(k_init, xtr[:1])

    def xent(p, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y))

    def loss_fn(p, batch, key):
        return xent(p, *batch), {}

    def batch_fn(key):
        idx = jax.random.randint(key, (cfg.digits_batch,), 0, xtr.shape[0])
        return xtr[idx], ytr[idx]

    evaluate = jax.jit(jax.vmap(lambda p: (xent(p, xtr, ytr), jnp.mean(jnp.argmax(model.apply(p, xte), -1) == yte))))
    out = {}
    for name in names:
        fam, lrs, factory = grid(name, cfg)
        t0 = time.perf_counter()
        final, losses, diverged = sweep(loss_fn, params, batch_fn, factory, jnp.asarray(lrs, jnp.float32),
                                        cfg.digits_steps, k_train)
        train_loss, acc = (np.asarray(a, np.float64) for a in evaluate(final))
        diverged = np.asarray(diverged)
        train_loss[diverged | ~np.isfinite(train_loss)] = np.inf
        acc[diverged] = 0.1
        out[name] = {"family": fam, "lrs": lrs.tolist(), "test_acc": acc.tolist(), "train_loss": train_loss.tolist(),
                     "diverged": diverged.tolist(), "seconds": time.perf_counter() - t0,
                     "flat_acc": flatness(lrs, acc, True, cfg.acc_tol, relative=False, valid=~diverged),
                     "flat_loss": flatness(lrs, train_loss, False, cfg.loss_tol, relative=True, valid=~diverged)}
        print(f"digits {name:13s} best acc {_at(out[name]['flat_acc'], '.3f')}"
              f", width {out[name]['flat_acc']['width_decades']:.2f} decades, diverged {int(diverged.sum())}/{len(lrs)}"
              f" ({out[name]['seconds']:.0f}s)", flush=True)
    return out


def flow_task(cfg: Config, names: list[str]) -> dict:
    path = gf.paths.linear()
    sampler = gf.data.toy_sampler(cfg.fm_dataset)
    model = gf.nets.MLP(hidden=(64, 64, 64), activation="silu", time_embedding="identity")
    k_init, k_train, k_eval, k_noise, k_data = jax.random.split(jax.random.key(cfg.seed + 1), 5)
    params = model.init(k_init, jnp.zeros((1, 2)), jnp.zeros((1,)))
    loss_fn = gf.train.diffusion_objective(model.apply, path, prediction="velocity")
    eval_batch = sampler(k_eval, 4096)
    eval_loss = jax.jit(jax.vmap(lambda p: loss_fn(p, eval_batch, k_eval)[0]))
    x1 = path.prior_sample(k_noise, (cfg.n_eval, 2))
    data = np.asarray(sampler(k_data, cfg.n_eval))
    floor = gf.metrics.w2_exact(np.asarray(sampler(jax.random.fold_in(k_data, 1), cfg.n_eval)), data)

    out = {"w2_data_floor": floor}
    for name in names:
        fam, lrs, factory = grid(name, cfg)
        t0 = time.perf_counter()
        final, losses, diverged = sweep(loss_fn, params, lambda k: sampler(k, cfg.fm_batch), factory,
                                        jnp.asarray(lrs, jnp.float32), cfg.fm_steps, k_train)
        fm_loss = np.asarray(eval_loss(final), np.float64)
        diverged = np.asarray(diverged)
        w2 = []
        for i in range(len(lrs)):
            p = jax.tree.map(lambda a, i=i: a[i], final)
            x0, _ = gf.sample(gf.nets.model_fn(model, p), path, x1, prediction="velocity", solver="heun",
                              steps=cfg.sample_steps)
            x0 = np.asarray(x0)
            w2.append(gf.metrics.w2_exact(x0, data) if np.all(np.isfinite(x0)) and not diverged[i] else np.inf)
        w2 = np.array(w2)
        fm_loss[diverged | ~np.isfinite(fm_loss)] = np.inf
        out[name] = {"family": fam, "lrs": lrs.tolist(), "fm_loss": fm_loss.tolist(), "w2": w2.tolist(),
                     "diverged": diverged.tolist(), "seconds": time.perf_counter() - t0,
                     "flat_loss": flatness(lrs, fm_loss, False, cfg.loss_tol, relative=True, valid=~diverged),
                     "flat_w2": flatness(lrs, w2, False, cfg.w2_tol, relative=True, valid=~diverged)}
        print(f"flow   {name:13s} best loss {out[name]['flat_loss']['best']:.4f}, best W2 {_at(out[name]['flat_w2'], '.3f')}"
              f", width {out[name]['flat_w2']['width_decades']:.2f} decades"
              f", diverged {int(diverged.sum())}/{len(lrs)} ({out[name]['seconds']:.0f}s)", flush=True)
    return out


def plot(results: dict, cfg: Config, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("digits", "test_acc", "digits: test accuracy", False), ("digits", "train_loss", "digits: train loss", True),
              ("flow", "fm_loss", f"flow matching ({cfg.fm_dataset}): loss", True),
              ("flow", "w2", f"flow matching ({cfg.fm_dataset}): W2", True)]
    fams = [f for f in ("sgd", "adam") if any(v["family"] == f for k, v in results["digits"].items())]
    fig, axes = plt.subplots(len(fams), len(panels), figsize=(4.2 * len(panels), 3.4 * len(fams)), squeeze=False)
    for r, fam in enumerate(fams):
        for c, (task, key, title, logy) in enumerate(panels):
            ax = axes[r, c]
            for name, res in results[task].items():
                if not isinstance(res, dict) or res.get("family") != fam:
                    continue
                y = np.asarray(res[key], np.float64)
                style = "-" if name.startswith(("momo",)) else "--"
                ax.plot(res["lrs"], np.where(np.isfinite(y), y, np.nan), style, marker="o", ms=3, label=name)
                div = np.asarray(res["diverged"])
                if div.any() and key == "test_acc":
                    ax.plot(np.asarray(res["lrs"])[div], y[div], "x", color="k", ms=5)
            if key == "w2":
                ax.axhline(results["flow"]["w2_data_floor"], color="gray", lw=0.8, ls=":", label="data floor")
            vals = np.concatenate([np.asarray(v[key], np.float64) for v in results[task].values()
                                   if isinstance(v, dict) and v.get("family") == fam])
            vals = vals[np.isfinite(vals) & (vals > 0)]
            if task == "flow" and vals.size:  # blown-up runs (loss 1e3, W2 1e28) would squash the curves
                lo = 0.9 * min(vals.min(), results["flow"]["w2_data_floor"] if key == "w2" else np.inf)
                ax.set_ylim(lo, min(vals.max() * 1.1, 2.0 * lo if key == "fm_loss" else 2.5))
            # (explicit limits: a family that diverged everywhere plots no finite point, and matplotlib
            # refused to log-scale the empty data range: "Data cannot be log-scaled")
            lrs = np.concatenate([v["lrs"] for v in results[task].values()
                                  if isinstance(v, dict) and v.get("family") == fam])
            ax.set_xscale("log")
            ax.set_xlim(lrs.min() / 1.5, lrs.max() * 1.5)
            if logy and vals.size:
                ax.set_yscale("log")
            if key != "test_acc":  # (a diverged run or one above the panel's range just vanished from these panels)
                top = ax.get_ylim()[1]
                for name, res in results[task].items():
                    if not isinstance(res, dict) or res.get("family") != fam:
                        continue
                    y, lr = np.asarray(res[key], np.float64), np.asarray(res["lrs"], np.float64)
                    div = np.asarray(res["diverged"], bool) | ~np.isfinite(y)
                    over = ~div & (y > top)
                    if div.any():
                        ax.plot(lr[div], np.full(int(div.sum()), top), "x", color="k", ms=5, clip_on=False)
                    if over.any():
                        ax.plot(lr[over], np.full(int(over.sum()), top), "^", color="k", ms=4, clip_on=False)
            ax.set_xlabel("learning rate")
            ax.set_title(f"{title} [{fam.upper()} family]", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("x: diverged run (accuracy 0.1 / loss inf); ^: value above the panel's range", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


OUTPUTS = ("results.json", "summary.md", "sweep.png", "results_digits_only.json")


def run(cfg: Config) -> dict:
    _cli.make_out(cfg.out, "optimizers")
    names = cfg.optimizers.split(",")
    t0 = time.perf_counter()
    # (a failed rerun left the earlier run's results.json / summary.md / sweep.png beside its own
    # results_digits_only.json)
    with _cli.stale_outputs_removed(cfg.out, OUTPUTS):
        results = {"config": dataclasses.asdict(cfg), "digits": digits_task(cfg, names)}
        partial = os.path.join(cfg.out, "results_digits_only.json")  # (a failure in the flow task kept nothing)
        _cli.write_json(partial, results, indent=1)
        results["flow"] = flow_task(cfg, names)
        results["wall_time_s"] = time.perf_counter() - t0
        _cli.write_json(os.path.join(cfg.out, "results.json"), results, indent=1)
        os.remove(partial)
        report(results, cfg)
    return results


def report(results: dict, cfg: Config) -> None:
    """Write summary.md and sweep.png (also from a saved results.json: --from_results)."""
    table = markdown(results, cfg)
    with open(os.path.join(cfg.out, "summary.md"), "w") as f:  # (first: a failing plot keeps the table)
        f.write(table + "\n")
    print("\n" + table)
    plot(results, cfg, os.path.join(cfg.out, "sweep.png"))


def markdown(results: dict, cfg: Config) -> str:
    d, fl = results["digits"], results["flow"]
    lines = [f"Width (decades of lr, grid step {4 / (cfg.n_lrs - 1):.2f}) of the contiguous range within tolerance "
             f"of the best (acc: -{cfg.acc_tol:g} abs; loss: +{cfg.loss_tol:.0%}; W2: +{cfg.w2_tol:.0%}); "
             f"n = grid points within tolerance of {cfg.n_lrs}. W2 data floor {fl['w2_data_floor']:.3f} "
             f"(n={cfg.n_eval}).", "",
             "| optimizer | lr grid | digits best acc | acc width (n) | digits best train loss | FM best loss "
             "| FM loss width (n) | FM best W2 | W2 width (n) | diverged (digits / FM) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in d:
        a, b = d[name], fl[name]
        lo, hi = np.log10(a["lrs"][0]), np.log10(a["lrs"][-1])
        lines.append(
            f"| {name} | 1e{lo:.0f}..1e{hi:.0f} | {_at(a['flat_acc'], '.3f')} "
            f"| {a['flat_acc']['width_decades']:.2f} ({a['flat_acc']['n_within']}) "
            f"| {_at(a['flat_loss'], '.2g')} "
            f"| {_at(b['flat_loss'], '.4f')} "
            f"| {b['flat_loss']['width_decades']:.2f} ({b['flat_loss']['n_within']}) "
            f"| {_at(b['flat_w2'], '.3f')} "
            f"| {b['flat_w2']['width_decades']:.2f} ({b['flat_w2']['n_within']}) "
            f"| {sum(a['diverged'])} / {sum(b['diverged'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    cfg = parse_config(argv)
    if cfg.from_results:
        with open(cfg.from_results) as f:
            saved = json.load(f)
        missing = [k for k in ("config", "digits", "flow") if k not in saved]
        if missing:  # (results_digits_only.json of a failed run: KeyError 'flow' in markdown)
            raise SystemExit(f"--from_results {cfg.from_results!r} has no {' / '.join(missing)} results (a "
                             f"results_digits_only.json is what a run that failed in the flow task kept); "
                             f"pass a complete results.json")
        cfg = dataclasses.replace(Config(**saved["config"]), out=cfg.out)
        _cli.make_out(cfg.out, "optimizers")
        report(saved, cfg)
        return 0
    res = run(cfg)
    print(f"\nwall time {res['wall_time_s']:.0f}s; wrote {cfg.out}/sweep.png, summary.md, results.json")
    return 0


if __name__ == "__main__":
    _cli.terminate_as_interrupt()
    sys.exit(main())
