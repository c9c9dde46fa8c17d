"""Density estimation: Glow, EBFlow, FFJORD and flow matching on toy 2-D data and on the 8x8 digits.

Writes ``density_2d.png`` (heat maps of every model's density), ``samples_2d.png``,
``samples_digits.png``, ``results.json`` and ``results.md``: test NLL (nats on 2-D, bits/dim
on the digits with uniform dequantization), training time per step and compile time.

    python experiments/density.py                   # a few minutes on 2 CPU cores
    python experiments/density.py --quick           # ~2 minutes on 2 CPU cores (mostly compiling): the end-to-end test
    python experiments/density.py --dataset checkerboard --steps_2d 4000

Models (each trained with gf.train.fit):
  glow      flow of Glow steps (ActNorm, dense invertible linear, affine coupling), maximum
            likelihood (on the digits flattened to 64-D)
  ebflow    the same architecture trained by sliced score matching (EBFlow): no log-determinant
            of the linear layers during training; log p = -E - log Z at evaluation
  ffjord    continuous normalizing flow, maximum likelihood with the Hutchinson trace
  fm        flow matching (linear path), likelihood by gf.log_prob with the exact trace
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import genflow as gf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

MODELS = ("glow", "ebflow", "ffjord", "fm")
DIGIT_BIN = 2.0 / 16.0  # the digits take 17 values {0..16}/16 * 2 - 1


@dataclasses.dataclass
class Config:
    dataset: str = "moons"       # one of gf.data.TOY
    models: str = "glow,ebflow,ffjord,fm"
    steps_2d: int = 2000
    steps_digits: int = 1500
    ffjord_steps_2d: int = 600   # FFJORD solves an ODE per step: fewer steps
    ffjord_steps_digits: int = 300
    batch: int = 256
    lr: float = 2e-3
    flow_steps_2d: int = 6       # Glow steps on 2-D
    flow_steps_digits: int = 6   # Glow steps on the (flattened) digits
    hidden: int = 64
    ebflow: str = "ssm"          # ssm | dsm
    n_test_2d: int = 2000
    grid: int = 80               # heat-map resolution
    digits: bool = True
    seed: int = 0
    quick: bool = False
    out: str = "runs/density"
    progress: bool = False


def parse_config(argv=None) -> Config:
    # (--quick's values apply except to the options given on the command line)
    return _cli.parse(Config, argv, __doc__, quick=dict(steps_2d=300, steps_digits=150, ffjord_steps_2d=60,
                                                        ffjord_steps_digits=40, n_test_2d=500, grid=40,
                                                        flow_steps_digits=4))


def validate(cfg: Config) -> list[str]:
    if cfg.dataset not in gf.data.TOY:
        raise SystemExit(f"--dataset must be one of {sorted(gf.data.TOY)}; got {cfg.dataset!r}")
    models = [m for m in cfg.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise SystemExit(f"--models must be a comma-separated subset of {list(MODELS)}; got {cfg.models!r}")
    if cfg.ebflow not in ("ssm", "dsm"):
        raise SystemExit(f"--ebflow must be 'ssm' or 'dsm'; got {cfg.ebflow!r}")
    _cli.require_finite(cfg, "lr", strict=True)  # (nan or <= 0 stopped training with a NonFiniteLossError)
    _cli.require_min(cfg, **dict.fromkeys(  # (these failed after training, or deep inside)
        ("steps_2d", "steps_digits", "ffjord_steps_2d", "ffjord_steps_digits", "batch", "flow_steps_2d",
         "flow_steps_digits", "hidden", "n_test_2d", "grid"), 1))
    return models


# -- training ---------------------------------------------------------------------------------------
def train(loss_fn, params, batch_fn, steps: int, cfg: Config, desc: str, val_fn=None, eval_every: int = 100):
    """Adam with a cosine decay; returns (params, seconds per step, compile seconds, final loss).

    ``val_fn(params) -> scalar`` (optional): evaluated every ``eval_every`` steps; the parameters
    with the lowest value are returned (early stopping on held-out data)."""
    opt = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(optax.cosine_decay_schedule(cfg.lr, steps)))
    params = jax.tree.map(jnp.array, params)  # fit donates the state: keep the caller's copy alive
    t0 = time.perf_counter()
    state = gf.train.init_state(params, opt, jax.random.key(cfg.seed + 1))
    step = gf.train.make_train_step(loss_fn, opt)
    segment = steps if val_fn is None else eval_every
    wall = comp = 0.0
    losses, best, done = [], (math.inf, None, 0), 0
    while done < steps:
        n = min(segment, steps - done)
        state, hist = gf.train.fit(state, step, batch_fn, n, chunk_size=max(1, min(n, 100)), progress=cfg.progress,
                                   desc=desc)
        done += n
        wall, comp = wall + hist["wall_time"], comp + hist["compile_time"]
        losses.extend(np.asarray(hist["loss"]).tolist())
        if val_fn is not None:
            v = float(val_fn(state.params))
            if v < best[0]:
                best = (v, jax.tree.map(jnp.array, state.params), done)
    chosen = state.params if val_fn is None else best[1]
    stop = "" if val_fn is None else f", best held-out value {best[0]:.4g} at step {best[2]}"
    print(f"  {desc}: {steps} steps, {1e3 * wall / steps:.2f} ms/step, compile {comp:.1f} s, "
          f"total {time.perf_counter() - t0:.1f} s{stop}", flush=True)
    return chosen, wall / steps, comp, float(np.mean(losses[-50:]))


def velocity_mlp(dim: int, hidden: int) -> gf.nets.MLP:
    # t enters as a plain feature: smooth in t, so adaptive likelihood solves take few steps
    return gf.nets.MLP(hidden=(hidden,) * 3, activation="silu", time_embedding="identity")


def fit_models(models, data_shape, batch_fn, x_example, steps, ffjord_steps, cfg, bin_width=None, x_val=None):
    """Train every requested model; returns {name: (log_prob_fn, sample_fn, seconds/step, compile s)}.

    ``x_val`` (dequantized held-out data, optional): Glow and EBFlow keep the parameters with the
    best held-out NLL (their exact log-density is cheap; both over-fit the 1.4k training digits)."""
    key = jax.random.key(cfg.seed)
    out = {}
    if bin_width is not None:  # data-dependent init (ActNorm) on data as the models see it
        x_example, _ = gf.likelihood.uniform_dequantize(jax.random.fold_in(key, 7), x_example, bin_width)
    dim = math.prod(data_shape)
    if "glow" in models or "ebflow" in models:
        # Glow steps on vectors (the digits flattened to 64-D): dense invertible linear layers, as in
        # EBFlow's fully-connected flows; the multi-scale convolutional gf.flows.glow compiles and runs
        # ~10x slower on this CPU (0.17 s per step at batch 128).
        n_layers = cfg.flow_steps_digits if dim > 2 else cfg.flow_steps_2d
        flow = gf.flows.realnvp(dim, num_steps=n_layers, hidden=cfg.hidden if dim == 2 else 4 * cfg.hidden, lu=False)
        p0 = flow.init(key, x_example)
        for name, method in (("glow", "ml"), ("ebflow", cfg.ebflow)):
            if name not in models:
                continue
            loss = gf.flows.flow_objective(flow, method, dequantize=bin_width)
            val = None if x_val is None else jax.jit(lambda p: -jnp.mean(flow.log_prob(p, x_val)))
            params, sps, comp, _ = train(loss, p0, batch_fn, steps, cfg, name, val_fn=val)
            out[name] = (jax.jit(lambda x, p=params: flow.log_prob(p, x)),
                         jax.jit(lambda k, n, p=params: flow.sample(p, k, n), static_argnums=1), sps, comp)
    if "ffjord" in models or "fm" in models:
        net = velocity_mlp(dim, cfg.hidden if dim == 2 else 4 * cfg.hidden)
        flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731

        def apply(p, x, t):
            return net.apply(p, flat(x), t).reshape(x.shape)

        p0 = net.init(key, flat(x_example[:1]), jnp.zeros((1,)))
    if "ffjord" in models:
        loss = gf.flows.ffjord_objective(apply, dequantize=bin_width, solver="tsit5", steps=4 if dim > 2 else 6)
        params, sps, comp, _ = train(loss, p0, batch_fn, ffjord_steps, cfg, "ffjord")
        out["ffjord"] = (lambda x, p=params: gf.flows.cnf_log_prob(apply, p, x, rtol=1e-5, atol=1e-5)[0],
                         lambda k, n, p=params: gf.flows.cnf_sample(apply, p, jax.random.normal(k, (n,) + data_shape)),
                         sps, comp)
    if "fm" in models:
        path = gf.paths.linear()
        inner = gf.train.diffusion_objective(apply, path, prediction="velocity")

        def fm_loss(params, batch, k):
            if bin_width is not None:
                k, kd = jax.random.split(k)
                batch = batch + (jax.random.uniform(kd, batch.shape) - 0.5) * bin_width
            return inner(params, batch, k)

        params, sps, comp, _ = train(fm_loss, p0, batch_fn, steps, cfg, "fm")
        fn = jax.tree_util.Partial(apply, params)
        out["fm"] = (lambda x, fn=fn: gf.log_prob(fn, path, x, prediction="velocity", rtol=1e-5, atol=1e-5)[0],
                     lambda k, n, fn=fn: gf.sample(fn, path, jax.random.normal(k, (n,) + data_shape),
                                                   prediction="velocity", solver="tsit5")[0], sps, comp)
    return out


def gaussian_baseline(train_x: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Log-density of a full-covariance Gaussian fitted to the training data (a reference)."""
    a, b = train_x.reshape(len(train_x), -1).astype(np.float64), test_x.reshape(len(test_x), -1).astype(np.float64)
    mu, cov = a.mean(0), np.cov(a, rowvar=False) + 1e-6 * np.eye(a.shape[1])
    g = gf.oracles.Gaussian.full(jnp.asarray(mu, jnp.float32), jnp.asarray(cov, jnp.float32))
    return np.asarray(g.log_prob(jnp.asarray(b, jnp.float32), 0.0, gf.paths.linear()))


# -- the two experiments ------------------------------------------------------------------------------
def run_2d(cfg: Config, models) -> dict:
    sampler = gf.data.toy_sampler(cfg.dataset)
    k_test, k_train, k_s = jax.random.split(jax.random.key(cfg.seed + 100), 3)
    test = sampler(k_test, cfg.n_test_2d)
    fitted = fit_models(models, (2,), lambda k: sampler(k, cfg.batch), sampler(k_train, 1024), cfg.steps_2d,
                        cfg.ffjord_steps_2d, cfg)
    lims = ((-4.0, 4.0), (-4.0, 4.0))
    xs = np.linspace(*lims[0], cfg.grid)
    grid = jnp.asarray(np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2), jnp.float32)
    rows, dens, samples = {}, {}, {}
    base = gaussian_baseline(np.asarray(sampler(k_train, 4096)), np.asarray(test))
    rows["gaussian"] = {"nll": float(-base.mean())}
    for name, (logp_fn, sample_fn, sps, comp) in fitted.items():
        t0 = time.perf_counter()
        lp = np.asarray(logp_fn(jnp.concatenate([test, grid])))  # one call: one compile
        rows[name] = {"nll": float(-lp[:len(test)].mean()), "sec_per_step": sps, "compile_s": comp}
        dens[name] = np.exp(lp[len(test):]).reshape(cfg.grid, cfg.grid)
        samples[name] = np.asarray(sample_fn(k_s, 2000))
        print(f"  {name}: evaluated in {time.perf_counter() - t0:.1f} s", flush=True)
    ref = np.asarray(sampler(k_s, 20000))
    fig, axes = plt.subplots(1, len(dens) + 1, figsize=(3 * (len(dens) + 1), 3))
    axes[0].hist2d(ref[:, 0], ref[:, 1], bins=cfg.grid, range=lims, cmap="magma")
    axes[0].set_title("data")
    for ax, (name, z) in zip(axes[1:], dens.items()):
        ax.imshow(z, origin="lower", extent=(*lims[0], *lims[1]), cmap="magma")
        ax.set_title(f"{name}: NLL {rows[name]['nll']:.3f}")
    for ax in axes:
        ax.set_xticks([]); ax.set_yticks([])
    fig.tight_layout()
    gf.viz.save(fig, os.path.join(cfg.out, "density_2d.png"))
    fig, axes = plt.subplots(1, len(samples), figsize=(3 * len(samples), 3), squeeze=False)
    for ax, (name, s) in zip(axes[0], samples.items()):
        ax.scatter(s[:, 0], s[:, 1], s=1, alpha=0.5)
        ax.set_xlim(*lims[0]); ax.set_ylim(*lims[1]); ax.set_title(name); ax.set_aspect("equal")
    fig.tight_layout()
    gf.viz.save(fig, os.path.join(cfg.out, "samples_2d.png"))
    return rows


def run_digits(cfg: Config, models) -> dict:
    x_all, _ = gf.data.load_digits("train", channels_last=False)  # [N, 64]
    x_test, _ = gf.data.load_digits("test", channels_last=False)
    n_val = len(x_all) // 10  # held out from training, for early stopping of the flows
    x_train, x_val = x_all[:-n_val], x_all[-n_val:]
    xtr = jnp.asarray(x_train)
    shape = tuple(x_train.shape[1:])

    def batch_fn(k):
        return xtr[jax.random.randint(k, (cfg.batch,), 0, xtr.shape[0])]

    y_val, _ = gf.likelihood.uniform_dequantize(jax.random.key(cfg.seed + 300), jnp.asarray(x_val), DIGIT_BIN)
    fitted = fit_models(models, shape, batch_fn, xtr[:512], cfg.steps_digits, cfg.ffjord_steps_digits, cfg,
                        bin_width=DIGIT_BIN, x_val=y_val)
    k_deq, k_s = jax.random.split(jax.random.key(cfg.seed + 200))
    y_test, _ = gf.likelihood.uniform_dequantize(k_deq, jnp.asarray(x_test), DIGIT_BIN)
    d = math.prod(shape)
    y_train, _ = gf.likelihood.uniform_dequantize(k_deq, xtr, DIGIT_BIN)
    base = gaussian_baseline(np.asarray(y_train), np.asarray(y_test))
    y_train_eval = y_train[: y_test.shape[0]]  # as many training images as test images: the gap shows over-fitting
    base_train = gaussian_baseline(np.asarray(y_train), np.asarray(y_train_eval))
    rows = {"gaussian": {"bpd": float(np.mean(gf.likelihood.bits_per_dim(base, d, DIGIT_BIN))),
                         "train_bpd": float(np.mean(gf.likelihood.bits_per_dim(base_train, d, DIGIT_BIN)))}}
    grids = []
    for name, (logp_fn, sample_fn, sps, comp) in fitted.items():
        lp = np.asarray(logp_fn(y_test))
        lp_train = np.asarray(logp_fn(y_train_eval))
        rows[name] = {"bpd": float(np.mean(gf.likelihood.bits_per_dim(lp, d, DIGIT_BIN))),
                      "train_bpd": float(np.mean(gf.likelihood.bits_per_dim(lp_train, d, DIGIT_BIN))),
                      "sec_per_step": sps, "compile_s": comp}
        grids.append(np.clip(np.asarray(sample_fn(k_s, 16)), -1, 1).reshape(16, 8, 8))
    gf.viz.image_grid(np.concatenate(grids, 0), nrow=16, title="samples: " + ", ".join(fitted),
                      path=os.path.join(cfg.out, "samples_digits.png"))
    return rows


def table(results: dict) -> str:
    lines = []
    for split, unit in (("2d", "nll"), ("digits", "bpd")):
        if split not in results:
            continue
        rows = results[split]
        header = ["model", "test NLL (nats)" if unit == "nll" else "test bits/dim", "ms / step", "compile s"]
        body = [[n, r[unit], 1e3 * r["sec_per_step"] if "sec_per_step" in r else "-",
                 r.get("compile_s", "-")] for n, r in rows.items()]
        if unit == "bpd":
            header.insert(2, "train bits/dim")
            for row, r in zip(body, rows.values()):
                row.insert(2, r.get("train_bpd", "-"))
        lines.append(f"### {split}\n")
        from experiments.benchmarks._timing import markdown_table

        lines.append(markdown_table(header, body))
        if "glow" in rows and "ebflow" in rows:
            lines.append(f"\nEBFlow / ML-Glow time per step: {rows['ebflow']['sec_per_step'] / rows['glow']['sec_per_step']:.3g}\n")
    return "\n".join(lines)


OUTPUTS = ("results.json", "results.md", "density_2d.png", "samples_2d.png", "samples_digits.png")


def run(cfg: Config) -> dict:
    models = validate(cfg)
    _cli.make_out(cfg.out, "density")
    t0 = time.perf_counter()
    # (a failed rerun left the earlier run's results.json beside its own new plots)
    with _cli.stale_outputs_removed(cfg.out, OUTPUTS):
        results = {"config": dataclasses.asdict(cfg), "2d": run_2d(cfg, models)}
        if cfg.digits:
            # the 2-D results are kept if the digits part fails or is interrupted (they were lost)
            _cli.write_json(os.path.join(cfg.out, "results.json"), {**results, "digits": "not finished"})
            results["digits"] = run_digits(cfg, models)
        elif os.path.exists(os.path.join(cfg.out, "samples_digits.png")):
            # (an earlier run's grid stayed beside a results.json without digits results)
            os.remove(os.path.join(cfg.out, "samples_digits.png"))
        results["wall_time_s"] = time.perf_counter() - t0
        _cli.write_json(os.path.join(cfg.out, "results.json"), results)
        with open(os.path.join(cfg.out, "results.md"), "w") as f:
            f.write(table(results) + "\n")
    return results


def main(argv=None) -> int:
    cfg = parse_config(argv)
    res = run(cfg)
    print(table(res))
    print(f"wall time {res['wall_time_s']:.1f} s; wrote {cfg.out}/results.json, results.md, density_2d.png, "
          f"samples_2d.png{', samples_digits.png' if cfg.digits else ''}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    _cli.terminate_as_interrupt()
    sys.exit(main())
