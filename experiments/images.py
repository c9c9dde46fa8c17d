"""Image experiment: diffusion / flow matching on images with any network, path and objective.

Writes samples.png (a grid of generated images), loss.png, metrics.json and metrics.jsonl to
``--out``: the Fréchet distance between generated and held-out images in the feature space of a
small digits classifier that the experiment trains itself (its test accuracy is reported), and
the NLL in bits/dim through the probability-flow ODE (``gf.likelihood``).

    python experiments/images.py                      # small U-Net, flow matching, bundled digits (CPU)
    python experiments/images.py --net dit --path vp_cosine --prediction eps
    python experiments/images.py --dataset cifar10 --net unet --ch 128 --steps 200000   # tfds, prepared data
    python experiments/images.py --quick              # a smoke run for the tests

Multi-host: set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (or
GENFLOW_DISTRIBUTED=1 on a detected cluster); each process reads its shard of the data and the
global batch is split over a ("data", "fsdp") mesh of all devices. A run restarted with the same
``--out`` resumes from its last checkpoint (state, RNG and data position: bit-identical) when given
the same training flags, ``--steps`` included: the learning rate decays over ``--steps``, so a
longer (or shorter) run needs a new ``--out``. With ``--ckpt_every 0`` the ``--out`` must hold no
checkpoints.

Config -> data -> model -> loss -> train.fit -> samples / metrics / plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import genflow as gf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

gf.train.maybe_initialize_distributed()  # before any other JAX call

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402


@dataclasses.dataclass
class Config:
    dataset: str = "digits"         # "digits" (bundled) or a labelled tfds image dataset name with a "test" split
    image_size: int = 0             # tfds images: central square crop resized to this size (0: as stored)
    image_key: str = "image"        # tfds datasets: the records' image feature
    label_key: str = "label"        # tfds datasets: the records' integer label feature (e.g. coarse_label)
    net: str = "unet"               # unet | dit | mlp
    ch: int = 32                    # U-Net base channels; DiT width 2*ch; MLP width 8*ch
    depth: int = 1                  # U-Net residual blocks per level; DiT 2*max(depth, 2) blocks;
                                    # MLP max(depth, 2) layers
    path: str = "linear"            # one of gf.paths.names()
    prediction: str = "velocity"    # eps | x0 | v | score | velocity
    weighting: str = "uniform"
    conditional: bool = False       # class-conditional (labels dropped with prob. 0.1 for CFG)
    steps: int = 1500
    batch: int = 64                 # global batch
    lr: float = 2e-3
    warmup: int = 100
    clip: float = 1.0
    ema: float = 0.999
    fsdp: int = 1                   # devices each parameter is sharded over
    chunk: int = 0                  # steps per compiled call; 0: 1 on CPU (see gf.train.fit), else 100
    ckpt_every: int = 500           # 0: no checkpoints
    solver: str = "heun"
    sample_steps: int = 25
    n_eval: int = 512               # generated images for the Fréchet distance
    n_nll: int = 128                # test images for the NLL (0: skip)
    seed: int = 0
    out: str = "runs/images"
    progress: bool = True
    quick: bool = False             # tiny model and few steps (tests)


QUICK = dict(ch=16, steps=150, batch=32, ckpt_every=50, warmup=10, ema=0.95, sample_steps=10, n_eval=128, n_nll=8)


def parse_config(argv=None) -> Config:
    """A typed CLI: one ``--field value`` flag per :class:`Config` field (``--quick`` alone works too)."""
    return _cli.parse(Config, argv, __doc__, quick=QUICK)


def validate(cfg: Config) -> None:
    if cfg.net not in ("unet", "dit", "mlp"):
        raise SystemExit(f"--net must be one of unet, dit, mlp; got {cfg.net!r}")
    if cfg.path not in gf.paths.names():
        raise SystemExit(f"--path must be one of {list(gf.paths.names())}; got {cfg.path!r}")
    if cfg.prediction not in gf.param.KINDS:
        raise SystemExit(f"--prediction must be one of {list(gf.param.KINDS)}; got {cfg.prediction!r}")
    if cfg.solver not in gf.sampling.solvers():
        raise SystemExit(f"--solver must be one of {sorted(gf.sampling.solvers())}; got {cfg.solver!r}")
    if cfg.weighting not in gf.losses.WEIGHTINGS:
        raise SystemExit(f"--weighting must be one of {list(gf.losses.WEIGHTINGS)}; got {cfg.weighting!r}")
    _cli.require_min(cfg, steps=1, batch=1, ch=1, depth=1, sample_steps=1, n_eval=2, n_nll=0, ckpt_every=0, chunk=0,
                     fsdp=1, warmup=0, seed=0, image_size=0)
    _cli.require_finite(cfg, "lr", "clip", strict=True)
    if cfg.net in ("unet", "dit") and cfg.ch % 2:  # (failed inside the network, after --out was made)
        why = "its time embedding is ch wide" if cfg.net == "unet" else "its width 2 * ch splits into 4 attention heads"
        raise SystemExit(f"--ch must be even for --net {cfg.net} ({why}); got {cfg.ch}")
    if cfg.warmup >= cfg.steps:  # (the cosine schedule decays over --steps, warmup included)
        raise SystemExit(f"--warmup must be below --steps; got --warmup {cfg.warmup} and --steps {cfg.steps}")
    if not 0.0 < cfg.ema < 1.0:
        raise SystemExit(f"--ema must be in (0, 1); got {cfg.ema}")
    if jax.device_count() % cfg.fsdp:  # (failed as an unnamed ValueError from make_mesh)
        raise SystemExit(f"--fsdp must divide the number of devices ({jax.device_count()}); got {cfg.fsdp}")
    if cfg.dataset != "digits":  # (an unknown tfds name failed as DatasetNotFoundError, after --out was made)
        import tensorflow_datasets as tfds

        if cfg.dataset.split(":")[0].split("/")[0] not in tfds.list_builders(with_community_datasets=False):
            raise SystemExit(f"--dataset must be 'digits' or a tfds dataset name; got {cfg.dataset!r}")
        try:  # (an unprepared one failed deep inside tfds's download, after --out was made)
            for split in ("train", "test"):
                ds = gf.data.image_dataset(cfg.dataset, split, **_dataset_kwargs(cfg))
            ds[0]  # (one record: an unlabelled dataset failed only after --out was made)
        except (ValueError, KeyError) as e:
            # (the error's advice names image_dataset's arguments; here they are --image_size, and
            # the labels are needed: the Fréchet distance uses a classifier trained on them)
            raise SystemExit(f"--dataset {cfg.dataset!r}: {e} (images.py: pass --image_size, --image_key or "
                             f"--label_key; it needs a labelled dataset with 'train' and 'test' splits)") from None
    elif cfg.image_size not in (0, 8):
        raise SystemExit(f"--image_size applies to tfds datasets (the bundled digits are 8x8); got {cfg.image_size}")
    elif (cfg.image_key, cfg.label_key) != ("image", "label"):
        raise SystemExit(f"--image_key and --label_key apply to tfds datasets (the bundled digits have no feature "
                         f"names); got {cfg.image_key!r}, {cfg.label_key!r}")
    _cli.dry_run_sampling(cfg.path, cfg.prediction, (2, 4, 4, 1), [("solver", cfg.solver, dict(steps=cfg.sample_steps))])


# the flags that make the trained state and its objective: a checkpoint trained with other values is
# not resumed. --steps is one of them: the cosine schedule decays over it (resuming a 1500-step run
# with --steps 3000 raised the learning rate at step 1500 from 2e-4 to 1.15e-3)
TRAINING_FLAGS = ("dataset", "image_size", "image_key", "label_key", "net", "ch", "depth", "path", "prediction",
                  "weighting", "conditional", "steps", "batch", "lr", "warmup", "clip", "ema", "seed")
ADDED_FLAGS = ("image_size", "image_key", "label_key")  # training flags that runs saved before them lack


def check_resume_config(cfg: Config, ckpt) -> None:
    """``SystemExit`` naming the flags that differ from those of the checkpoints in ``--out``
    (which were silently resumed: an eps model sampled as a velocity one); records them otherwise."""
    path = os.path.join(cfg.out, "train_config.json")
    mine = {k: getattr(cfg, k) for k in TRAINING_FLAGS}
    if ckpt.latest_step() is not None and os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        # (a flag added since that run was saved had its default then: a run from before --label_key
        # existed read "label", and resumed with any --label_key unchecked)
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        theirs = {k: theirs.get(k, defaults[k]) for k in ADDED_FLAGS} | theirs
        diff = [k for k in TRAINING_FLAGS if k in theirs and theirs[k] != mine[k]]
        if diff:
            why = " (the learning rate decays over --steps: a run of another length needs a new --out)" \
                if "steps" in diff else ""
            raise SystemExit(f"{cfg.out}/ckpt was trained with " + ", ".join(f"--{k} {theirs[k]}" for k in diff)
                             + "; got " + ", ".join(f"--{k} {mine[k]}" for k in diff)
                             + f": pass the same flags to resume it, or a new --out{why}")
    if jax.process_index() == 0:
        _cli.write_json(path, mine)


def final_loss(hist_loss, start: int, jsonl: str, n: int = 50) -> float | None:
    """The mean loss of the run's last ``n`` steps; a resumed run takes the steps before ``start``
    from metrics.jsonl (one row per chunk: exact with the CPU default of one step per chunk). A
    re-run with nothing left to train (one that died in the evaluation) takes them all from there;
    None without any loss."""
    losses = np.asarray(hist_loss)
    if len(losses) < n and start and os.path.exists(jsonl):
        earlier, prev = [], 0
        for r in gf.train.read_jsonl(jsonl):
            if "loss" in r and prev < r["step"] <= start:
                earlier += [r["loss"]] * (r["step"] - prev)
                prev = r["step"]
        losses = np.concatenate([np.asarray(earlier, losses.dtype), losses])
    return float(np.mean(losses[-n:])) if len(losses) else None


def build_net(cfg: Config, shape, num_classes: int | None):
    """The network for images of ``shape = (H, W, C)``."""
    if cfg.net == "unet":
        levels = 2 if shape[0] <= 16 else 3
        return gf.nets.UNet(ch=cfg.ch, ch_mult=(1, 2, 2)[:levels], num_res_blocks=cfg.depth,
                            attn_resolutions=(shape[0] // 2 ** (levels - 1),), num_heads=1, num_classes=num_classes)
    if cfg.net == "dit":
        return gf.nets.DiT(patch_size=2, hidden=cfg.ch * 2, depth=max(cfg.depth, 2) * 2, num_heads=4,
                           num_classes=num_classes)

    class Flat(gf.nets.MLP):  # the MLP on flattened images
        def __call__(self, x, t, y=None):
            return super().__call__(x.reshape(x.shape[0], -1), t, y).reshape(x.shape)

    return Flat(hidden=(cfg.ch * 8,) * max(cfg.depth, 2), num_classes=num_classes)


def train_classifier(xtr, ytr, xte, yte, key, steps: int = 600):
    """A small MLP digits classifier; returns ``features(x) -> [N, 128]`` and its test accuracy.

    Its penultimate activations are the feature space of the Fréchet distance (the role
    Inception-v3 plays for FID)."""
    import flax.linen as nn

    class Clf(nn.Module):
        @nn.compact
        def __call__(self, x, features=False):
            h = x.reshape(x.shape[0], -1)
            h = nn.gelu(nn.Dense(256)(h))
            h = nn.gelu(nn.Dense(128)(h))
            return h if features else nn.Dense(int(ytr.max()) + 1)(h)

    clf = Clf()
    params = clf.init(key, xtr[:1])
    opt = optax.adamw(3e-3, weight_decay=1e-3)
    xd, yd = jnp.asarray(xtr), jnp.asarray(ytr)

    def loss_fn(p, batch, k):
        idx = jax.random.randint(k, (128,), 0, len(xd))
        x = xd[idx] + 0.1 * jax.random.normal(k, xd[idx].shape)  # light noise: robust features
        logits = clf.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yd[idx]).mean(), {}

    state = gf.train.init_state(params, opt, key)
    state, _ = gf.train.fit(state, gf.train.make_train_step(loss_fn, opt), lambda k: None, steps, chunk_size=steps,
                            progress=False)
    p = state.params
    acc = float(np.mean(np.argmax(np.asarray(clf.apply(p, jnp.asarray(xte))), -1) == yte))
    feats = jax.jit(lambda x: clf.apply(p, x, features=True))
    return lambda x: np.asarray(feats(jnp.asarray(x))), acc


def frechet(fa, fb) -> float:
    return gf.metrics.frechet_distance(*gf.metrics.gaussian_stats(fa), *gf.metrics.gaussian_stats(fb))


def nll_bits_per_dim(cfg, fn, path, x, key) -> tuple[float | None, str]:
    """Dequantized NLL bound in bits/dim through the probability-flow ODE (Hutchinson trace)."""
    try:
        import genflow.likelihood as lik
    except ImportError as e:  # the Likelihood issue's module is not installed
        return None, f"NLL not computed: genflow.likelihood is unavailable ({e})"
    levels = 17 if cfg.dataset == "digits" else 256  # digits take the values {0..16}
    bin_width = 2.0 / (levels - 1)
    t_max = 1.0 if cfg.prediction in ("velocity", "v", "x0") else 0.999
    bound, _ = lik.dequantized_log_prob(fn, path, jnp.asarray(x), key, prediction=cfg.prediction, bin_width=bin_width,
                                        trace="hutchinson", num_probes=1, rtol=1e-4, atol=1e-4, t_max=t_max)
    bpd = float(np.mean(np.asarray(lik.bits_per_dim(bound, int(np.prod(x.shape[1:]))))))
    return bpd, f"uniform dequantization ({levels} levels), Hutchinson trace, tsit5 rtol=atol=1e-4, t_max={t_max}"


def run(cfg: Config, written: list | None = None) -> dict:
    """The experiment; the names of the files it writes into ``--out`` are appended to ``written``."""
    validate(cfg)
    written = [] if written is None else written
    ckpt_dir = os.path.join(cfg.out, "ckpt")
    if not cfg.ckpt_every and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        # (trained from scratch beside them, kept their train_config.json and rewrote metrics.jsonl:
        # a later checkpointed run resumed the old checkpoint and mixed both runs' rows)
        raise SystemExit(f"--out {cfg.out} holds another run's checkpoints ({ckpt_dir}) and --ckpt_every 0 would "
                         f"train from scratch beside them: pass --ckpt_every > 0 to resume them, or a new --out")
    _cli.make_out(cfg.out, "images")
    # (an interrupted or failed rerun left the earlier run's metrics.json and plots beside its own log)
    with _cli.stale_outputs_removed(cfg.out, OUTPUTS):
        return _train_and_evaluate(cfg, written, ckpt_dir)


OUTPUTS = ("metrics.json", "samples.png", "loss.png")


def _eval_images(cfg: Config, split: str, n: int, seed: int):
    """Up to ``n`` images and labels of ``split`` of a tfds dataset (this host's shard; fewer when the
    split is smaller: a fixed batch of 2048 failed on smaller datasets, naming a batch_size nobody gave)."""
    ds = gf.data.image_dataset(cfg.dataset, split, **_dataset_kwargs(cfg))
    n = min(n, len(ds) // jax.process_count())
    return _first(gf.data.image_loader(ds, n, seed=seed, shuffle=split != "test", num_epochs=1))


def _dataset_kwargs(cfg: Config) -> dict:
    keys = {} if cfg.dataset == "digits" else {"image_key": cfg.image_key, "label_key": cfg.label_key}
    return dict(keys, image_size=cfg.image_size) if cfg.image_size else keys


def _train_and_evaluate(cfg: Config, written: list, ckpt_dir: str) -> dict:
    t_wall = time.perf_counter()
    k_init, k_train, k_noise, k_clf, k_nll = jax.random.split(jax.random.key(cfg.seed), 5)

    # data: this host's share of the global batch, from a resumable grain iterator
    nproc = jax.process_count()
    if cfg.batch % nproc:
        raise SystemExit(f"--batch {cfg.batch} must be divisible by the number of processes ({nproc})")
    loader = gf.data.image_loader(cfg.dataset, cfg.batch // nproc, seed=cfg.seed, **_dataset_kwargs(cfg))
    xte, yte = gf.data.load_digits("test") if cfg.dataset == "digits" else _eval_images(cfg, "test", 2048, 0)
    xtr, ytr = (gf.data.load_digits("train") if cfg.dataset == "digits" else
                _eval_images(cfg, "train", 4096, cfg.seed + 1))
    shape, num_classes = xtr.shape[1:], int(ytr.max()) + 1

    # model, objective, optimizer
    path = gf.paths.get(cfg.path)
    net = build_net(cfg, shape, num_classes if cfg.conditional else None)
    y0 = jnp.zeros((1,), jnp.int32) if cfg.conditional else None
    params = jax.jit(net.init)(k_init, jnp.zeros((1, *shape)), jnp.zeros((1,)), y0)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    optimizer = gf.train.make_optimizer(cfg.lr, name="adam", warmup_steps=cfg.warmup, decay_steps=cfg.steps,
                                        end_factor=0.1, clip_norm=cfg.clip)
    loss_fn = gf.train.diffusion_objective(net.apply, path, prediction=cfg.prediction, weighting=cfg.weighting,
                                           label_dropout=0.1 if cfg.conditional else 0.0,
                                           null_label=num_classes if cfg.conditional else None)
    if not cfg.conditional:
        inner = loss_fn
        loss_fn = lambda p, b, k: inner(p, b["x"], k)  # noqa: E731  (drop the labels)
    step = gf.train.make_train_step(loss_fn, optimizer)
    state = gf.train.init_state(params, optimizer, k_train, ema_decays=(cfg.ema,))

    # train (sharded over all devices; checkpointed and resumed)
    mesh = gf.train.make_mesh(fsdp=cfg.fsdp)
    ckpt = gf.train.Checkpointer(ckpt_dir, save_every=cfg.ckpt_every) if cfg.ckpt_every else None
    if ckpt is not None:
        try:
            check_resume_config(cfg, ckpt)
        except SystemExit:  # (an open checkpointer's threads failed at interpreter shutdown)
            ckpt.close()
            raise
        state, data_state = ckpt.restore_or(gf.train.shard_state(state, mesh))
        if data_state:
            loader.set_state(data_state)
    start = int(state.step)
    if cfg.steps < start:
        raise SystemExit(f"--steps {cfg.steps} is below step {start} restored from {cfg.out}/ckpt; pass --steps >= "
                         f"{start} or a new --out")
    # (rows past the restored step, or of an earlier run into this --out, would be logged twice)
    jsonl = os.path.join(cfg.out, "metrics.jsonl")
    writer = gf.train.MetricsWriter(jsonl, resume_step=start)
    cpu = jax.default_backend() == "cpu"
    chunk = cfg.chunk or (1 if cpu else 100)
    state, hist = gf.train.fit(state, step, loader, cfg.steps - start, chunk_size=chunk, unroll=chunk if cpu else 1,
                               progress=cfg.progress, callback=writer, desc=f"{cfg.net} {cfg.dataset}", mesh=mesh,
                               checkpointer=ckpt)
    if ckpt is not None:
        ckpt.close()
    steps_done = cfg.steps - start
    if steps_done and writer.active:
        written.append("metrics.jsonl")
    train_steps_per_s = steps_done / hist["wall_time"] if hist["wall_time"] > 0 else None

    # sample with the EMA parameters
    final = state.ema[gf.train.ema_key(cfg.ema)]
    labels = jnp.arange(cfg.n_eval) % num_classes if cfg.conditional else None
    fn = gf.nets.model_fn(net, final, **({"y": labels} if cfg.conditional else {}))
    x1 = path.prior_sample(k_noise, (cfg.n_eval, *shape))
    t0 = time.perf_counter()
    x0, info = gf.sample(fn, path, x1, prediction=cfg.prediction, solver=cfg.solver, steps=cfg.sample_steps,
                         key=k_noise)
    x0 = np.clip(np.asarray(x0), -1.0, 1.0)
    sample_time = time.perf_counter() - t0

    # metrics: Fréchet distance in a digits classifier's feature space, NLL
    features, clf_acc = train_classifier(xtr, ytr, xte, yte, k_clf)
    f_test = features(xte)
    # the floor at the generated sample size (FD is biased upwards at small N: the test split's 364
    # training images gave a floor 2-3x too low for 128 generated ones)
    ref = xtr[np.random.default_rng(cfg.seed).permutation(len(xtr))[: min(cfg.n_eval, len(xtr))]]
    metrics = {
        "config": dataclasses.asdict(cfg),
        "params": n_params,
        "fd": frechet(features(x0), f_test),
        "fd_train_vs_test": frechet(features(ref), f_test),  # the floor at this sample size
        "fd_prior": frechet(features(np.clip(np.asarray(x1), -1, 1)), f_test),  # untrained: the noise itself
        "fd_n_generated": int(cfg.n_eval), "fd_n_test": int(len(xte)), "fd_floor_n": int(len(ref)),
        "classifier_test_accuracy": clf_acc,
        "nfe": int(info.nfe),
        # (from metrics.jsonl alone when nothing was left to train: a re-run of a run that died in the
        # evaluation reported null)
        "final_loss": final_loss(hist.get("loss", np.zeros(0, np.float32)), start, jsonl),
        "train_steps": steps_done, "resumed_from": start,
        "train_steps_per_s": train_steps_per_s,
        "train_examples_per_s": None if train_steps_per_s is None else train_steps_per_s * cfg.batch,
        "train_compile_s": hist["compile_time"],
        "sample_time_s_with_compile": sample_time,  # (one call: compilation included)
        "devices": jax.device_count(),
    }
    if cfg.n_nll:
        x_nll = xte[: cfg.n_nll]  # (the test split may hold fewer images than --n_nll)
        fn_u = gf.nets.model_fn(net, final, **({"y": jnp.full((len(x_nll),), num_classes)} if cfg.conditional else {}))
        t0 = time.perf_counter()
        metrics["nll_bpd"], metrics["nll_note"] = nll_bits_per_dim(cfg, fn_u, path, x_nll, k_nll)
        metrics["nll_n"] = int(len(x_nll))
        metrics["nll_time_s"] = time.perf_counter() - t0
        print(metrics["nll_note"], file=sys.stderr)

    # plots
    if jax.process_index() == 0:
        gf.viz.image_grid(x0[:100], nrow=10, title=f"{cfg.net} on {cfg.dataset}: {cfg.path}/{cfg.prediction}, "
                          f"{cfg.solver} NFE={int(info.nfe)}, FD={metrics['fd']:.2f}",
                          path=os.path.join(cfg.out, "samples.png"))
        written.append("samples.png")
        # the whole run, across resumes, against the step numbers (metrics.jsonl's rows); also when
        # nothing was left to train (a re-run of a run that died in the evaluation drew none)
        rows = [r for r in gf.train.read_jsonl(jsonl) if "loss" in r] if os.path.exists(jsonl) else []
        if rows:
            gf.viz.curves({"loss": (np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows]))},
                          ylabel="loss", logy=True, smooth=25, path=os.path.join(cfg.out, "loss.png"))
            written.append("loss.png")
        metrics["wall_time_s"] = time.perf_counter() - t_wall
        out_json = os.path.join(cfg.out, "metrics.json")
        if not steps_done and os.path.exists(out_json):  # a re-run of a finished run: keep its training numbers
            with open(out_json) as f:
                old = json.load(f)
            # (only from this run's own record: it copied another one's final_loss; the loss itself comes
            # from metrics.jsonl, which holds this training's rows)
            theirs = old.get("config") or {}
            if all(theirs.get(k) == metrics["config"][k] for k in TRAINING_FLAGS):
                metrics.update({k: old[k] for k in ("train_steps", "resumed_from", "train_steps_per_s",
                                                    "train_examples_per_s", "train_compile_s") if k in old})
                if metrics["final_loss"] is None and "final_loss" in old:
                    metrics["final_loss"] = old["final_loss"]
        _cli.write_json(out_json, metrics)
        written.append("metrics.json")
    return metrics


def _first(it):
    b = next(it)
    return b["x"], b["y"]


def main(argv=None) -> int:
    cfg = parse_config(argv)
    written = []
    try:
        m = run(cfg, written)
    except gf.train.NonFiniteLossError as e:  # (it ended in a traceback, as a crash does)
        print(f"training stopped: {e}; {cfg.out} keeps metrics.jsonl and the checkpoints saved before it",
              file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in m.items() if k != "config"}, indent=2))
    # only the files written (a re-run with nothing left to train claimed a loss.png it had not drawn)
    names = [n for n in ("samples.png", "loss.png", "metrics.json", "metrics.jsonl") if n in written]
    if names:
        print(f"wrote {cfg.out}/" + ", ".join(names))
    return 0


if __name__ == "__main__":
    _cli.terminate_as_interrupt()
    sys.exit(main())
