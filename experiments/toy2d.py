"""Toy 2-D experiment: train a diffusion / flow-matching model on a 2-D distribution, sample it,
and write samples.png, trajectories.png, loss.png and metrics.json. A failed or interrupted run
writes metrics.json saying why and where (and the loss curve so far), and removes the other outputs
of an earlier run into the same --out.

    python experiments/toy2d.py                         # flow matching on moons, ~1 min on 2 CPU cores
    python experiments/toy2d.py --dataset 8gaussians --path vp_linear --prediction eps --solver heun
    python experiments/toy2d.py --coupling ot --out runs/toy2d_ot

Config -> data -> model -> loss -> train.fit -> samples / metrics / plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import genflow as gf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402


@dataclasses.dataclass
class Config:
    dataset: str = "moons"          # one of gf.data.TOY
    path: str = "linear"            # one of gf.paths.names()
    prediction: str = "velocity"    # eps | x0 | v | score | velocity
    weighting: str = "uniform"      # see gf.losses
    coupling: str = "independent"   # independent | ot
    steps: int = 3000               # training steps
    batch: int = 256
    lr: float = 1e-3
    hidden: int = 256
    depth: int = 3
    time_embedding: str = "identity"  # identity | sinusoidal | fourier
    ema: float = 0.99               # EMA decay of the sampled parameters (0 disables)
    solver: str = "heun"            # one of gf.sampling.solvers()
    sample_steps: int = 50          # steps of fixed-step solvers
    eval_solver: str = "tsit5"      # adaptive solver also reported (NFE)
    n_eval: int = 4096              # samples for the W2 to fresh data
    seed: int = 0
    chunk: int = 500                # training steps per jitted call
    out: str = "runs/toy2d"
    progress: bool = True


def parse_config(argv=None) -> Config:
    """A typed CLI: one ``--field value`` flag per :class:`Config` field."""
    return _cli.parse(Config, argv, __doc__)


def validate(cfg: Config) -> None:
    if cfg.dataset not in gf.data.TOY:
        raise SystemExit(f"--dataset must be one of {sorted(gf.data.TOY)}; got {cfg.dataset!r}")
    if cfg.path not in gf.paths.names():
        raise SystemExit(f"--path must be one of {list(gf.paths.names())}; got {cfg.path!r}")
    if cfg.prediction not in gf.param.KINDS:
        raise SystemExit(f"--prediction must be one of {list(gf.param.KINDS)}; got {cfg.prediction!r}")
    for flag in ("solver", "eval_solver"):  # (the message did not say which of the two was wrong)
        if getattr(cfg, flag) not in gf.sampling.solvers():
            raise SystemExit(f"--{flag} must be one of {sorted(gf.sampling.solvers())}; got {getattr(cfg, flag)!r}")
    if not gf.sampling.solvers()[cfg.eval_solver].adaptive:  # (a fixed-step one ran 50 steps, ignoring rtol / atol)
        adaptive = sorted(k for k, s in gf.sampling.solvers().items() if s.adaptive)
        raise SystemExit(f"--eval_solver must be an adaptive solver ({adaptive}); got {cfg.eval_solver!r}")
    if cfg.n_eval > 10_000:  # (the exact W2 holds an n x n float64 cost matrix: 50,000 would need 20 GB, after training)
        raise SystemExit(f"--n_eval must be <= 10000 (exact W2 is O(n^2) memory, O(n^3) time); got {cfg.n_eval}")
    _cli.require_min(cfg, steps=1, batch=1, hidden=1, depth=1, sample_steps=1, n_eval=2, chunk=1)
    _cli.require_finite(cfg, "lr", strict=True)  # (a negative --lr trained the whole run uphill, NaN failed at step 0)
    if not 0.0 <= cfg.ema < 1.0:
        raise SystemExit(f"--ema must be in [0, 1); got {cfg.ema}")
    if cfg.weighting not in gf.losses.WEIGHTINGS:
        raise SystemExit(f"--weighting must be one of {list(gf.losses.WEIGHTINGS)}; got {cfg.weighting!r}")
    if cfg.coupling not in gf.losses.COUPLINGS:
        raise SystemExit(f"--coupling must be one of {sorted(gf.losses.COUPLINGS)}; got {cfg.coupling!r}")
    if cfg.time_embedding not in ("identity", "sinusoidal", "fourier"):
        raise SystemExit(f"--time_embedding must be identity, sinusoidal or fourier; got {cfg.time_embedding!r}")
    _cli.dry_run_sampling(cfg.path, cfg.prediction, (2, 2), [("solver", cfg.solver, dict(steps=cfg.sample_steps)),
                                                             ("eval_solver", cfg.eval_solver, dict(rtol=1e-5, atol=1e-5))])


# the files a run writes into --out (a failed run removes those of an earlier run it did not rewrite)
OUTPUTS = ("samples.png", "trajectories.png", "loss.png", "metrics.json")


def run(cfg: Config, written: list | None = None) -> dict:
    """The experiment; the names of the files it writes into ``--out`` are appended to ``written``."""
    validate(cfg)
    written = [] if written is None else written
    _cli.make_out(cfg.out, "toy2d")
    t_wall = time.perf_counter()
    key = jax.random.key(cfg.seed)
    k_init, k_train, k_noise, k_data = jax.random.split(key, 4)

    # data and model
    sampler = gf.data.toy_sampler(cfg.dataset)
    path = gf.paths.get(cfg.path)
    model = gf.nets.MLP(hidden=(cfg.hidden,) * cfg.depth, activation="silu", time_embedding=cfg.time_embedding)
    params = model.init(k_init, jnp.zeros((1, 2)), jnp.zeros((1,)))
    optimizer = optax.adam(cfg.lr)

    # objective and training
    loss_fn = gf.train.diffusion_objective(model.apply, path, prediction=cfg.prediction,
                                           weighting=cfg.weighting, coupling=cfg.coupling)
    step = gf.train.make_train_step(loss_fn, optimizer)
    state = gf.train.init_state(params, optimizer, k_train, ema_decays=(cfg.ema,) if cfg.ema else ())
    try:
        state, hist = gf.train.fit(state, step, lambda k: sampler(k, cfg.batch), cfg.steps,
                                   chunk_size=cfg.chunk, progress=cfg.progress, desc=f"toy2d {cfg.dataset}")
    except (gf.train.NonFiniteLossError, KeyboardInterrupt) as e:
        _write_failure(cfg, e, t_wall, written)
        raise
    # after training too (a Ctrl-C or an error in the sampling / the exact W2 wrote nothing, and was
    # reported as written): metrics.json records that training completed and the stage that failed
    stage = ["sampling"]  # (the part of the evaluation running; _evaluate advances it)
    try:
        return _evaluate(cfg, state, hist, model, path, sampler, k_noise, k_data, t_wall, written, stage)
    except (Exception, KeyboardInterrupt) as e:
        _write_failure(cfg, e, t_wall, written, hist=hist, stage=stage[0])
        raise


def _evaluate(cfg, state, hist, model, path, sampler, k_noise, k_data, t_wall, written, stage) -> dict:
    """Sampling, metrics and plots of the trained ``state``; ``stage[0]`` names the part running."""
    steps_per_s = cfg.steps / hist["wall_time"] if hist["wall_time"] > 0 else None

    # sampling and metrics
    final = state.ema[gf.train.ema_key(cfg.ema)] if cfg.ema else state.params
    fn = gf.nets.model_fn(model, final)
    x1 = path.prior_sample(k_noise, (cfg.n_eval, 2))
    data = np.asarray(sampler(k_data, cfg.n_eval))
    def draw():
        return gf.sample(fn, path, x1, prediction=cfg.prediction, solver=cfg.solver, steps=cfg.sample_steps,
                         key=k_noise, save_trajectory=True)

    t0 = time.perf_counter()
    jax.block_until_ready(draw())  # the first call compiles
    sample_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    x0, info = jax.block_until_ready(draw())
    sample_time = time.perf_counter() - t0
    x0_ad, info_ad = gf.sample(fn, path, x1, prediction=cfg.prediction, solver=cfg.eval_solver,
                               rtol=1e-5, atol=1e-5, key=k_noise)
    fresh = np.asarray(sampler(jax.random.fold_in(k_data, 1), cfg.n_eval))
    stage[0] = "metrics"
    metrics = {
        "config": dataclasses.asdict(cfg),
        "w2": gf.metrics.w2_exact(x0, data),
        "nfe": int(info.nfe),
        f"w2_{cfg.eval_solver}": gf.metrics.w2_exact(x0_ad, data),
        f"nfe_{cfg.eval_solver}": int(info_ad.nfe),
        "w2_data_floor": gf.metrics.w2_exact(fresh, data),
        "mmd": float(gf.metrics.mmd(x0[:2048], data[:2048])),
        "mmd_n": min(2048, cfg.n_eval),
        "final_loss": float(np.mean(hist["loss"][-100:])),
        "train_steps_per_s": steps_per_s,
        "train_compile_s": hist["compile_time"],
        "sample_time_s": sample_time,  # (a second call: the first compiles)
        "sample_compile_s": sample_compile,
        "n_eval": cfg.n_eval,
    }

    # plots
    stage[0] = "plots"
    gf.viz.scatter(x0, data, title=f"{cfg.dataset}: {cfg.path}/{cfg.prediction}, {cfg.solver} NFE={int(info.nfe)}, "
                   f"W2={metrics['w2']:.3f}", path=os.path.join(cfg.out, "samples.png"))
    written.append("samples.png")
    kind = "sampler" if gf.sampling.solvers()[cfg.solver].stochastic else "probability-flow"  # (an SDE's paths are not the ODE's)
    gf.viz.trajectories(info.trajectory, title=f"{kind} trajectories ({cfg.solver})",
                        path=os.path.join(cfg.out, "trajectories.png"))
    written.append("trajectories.png")
    gf.viz.curves({"loss": hist["loss"]}, ylabel="loss", logy=True, smooth=50,
                  path=os.path.join(cfg.out, "loss.png"))
    written.append("loss.png")
    metrics["wall_time_s"] = time.perf_counter() - t_wall
    stage[0] = "metrics.json"
    _cli.write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    written.append("metrics.json")
    return metrics


def _write_failure(cfg: Config, e: BaseException, t_wall: float, written: list, hist: dict | None = None,
                   stage: str = "training") -> None:
    """A failed run keeps what it has: metrics.json saying why and where, and the loss curve so far
    (a non-finite loss carries the history up to the last good step; after training, ``hist`` is
    the whole run's and ``stage`` the part of the evaluation that failed). The outputs of an
    earlier run into this --out that this one did not rewrite are removed: they would pass for its
    own beside its failure record."""
    if hist is None:
        hist = getattr(e, "history", None) or {}
    loss = np.asarray(hist.get("loss", []))
    if loss.size and "loss.png" not in written:
        gf.viz.curves({"loss": loss}, ylabel="loss", logy=True, smooth=min(50, loss.size),
                      path=os.path.join(cfg.out, "loss.png"))
        written.append("loss.png")
    out = {"config": dataclasses.asdict(cfg), "failed": type(e).__name__, "message": str(e),
           "failed_in": stage, "training_completed": stage != "training",
           "failed_at_step": getattr(e, "step", None), "steps_done": int(loss.size),
           "final_loss": float(np.mean(loss[-100:])) if loss.size else None,
           "wall_time_s": time.perf_counter() - t_wall}
    _cli.write_json(os.path.join(cfg.out, "metrics.json"), out)
    if "metrics.json" not in written:
        written.append("metrics.json")
    for name in OUTPUTS:
        if name not in written and os.path.exists(os.path.join(cfg.out, name)):
            os.remove(os.path.join(cfg.out, name))


def _wrote(cfg: Config, written: list) -> str:
    """The files a run wrote, for its last message (a failed one claimed a loss.png it had not drawn)."""
    return f"wrote {cfg.out}/" + ", ".join(written) if written else f"wrote nothing to {cfg.out}"


def main(argv=None) -> int:
    cfg = parse_config(argv)
    written = []
    try:
        m = run(cfg, written)
    except gf.train.NonFiniteLossError as e:
        print(f"training stopped: {e}\n{_wrote(cfg, written)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {_wrote(cfg, written)}", file=sys.stderr)
        return 130
    except Exception:
        print(f"failed: {_wrote(cfg, written)}", file=sys.stderr)
        raise
    print(json.dumps({k: v for k, v in m.items() if k != "config"}, indent=2))
    print(_wrote(cfg, written))
    return 0


if __name__ == "__main__":
    _cli.terminate_as_interrupt()
    sys.exit(main())
