"""What the experiment scripts' measurements are computed from (experiments/images.py, inverse.py,
density.py's digits run, optimizers.py, _cli.py): the parameters sampled, the split each metric
compares against, the noise and bin widths used, resuming. The end-to-end tests check that the
scripts run and reach their bars; these catch a metric measured on the wrong arrays, which those
let through (mutation audit, round 6: 21 such bugs survived the suite)."""
import json
import math
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genflow as gf

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))


def _images():
    import images

    return images


def _tiny_images_args(out, *extra):
    return ["--net", "mlp", "--ch", "2", "--depth", "1", "--batch", "4", "--warmup", "0", "--n_eval", "8", "--n_nll",
            "0", "--sample_steps", "1", "--solver", "euler", "--ckpt_every", "1", "--progress", "false", "--out",
            str(out), *extra]


def _flat_features(images, monkeypatch):
    # the feature classifier is not under test: features are the flattened pixels themselves
    monkeypatch.setattr(images, "train_classifier",
                        lambda xtr, ytr, xte, yte, key: (lambda x: np.asarray(x, np.float64).reshape(len(x), -1), 1.0))


def test_images_samples_the_ema_params_and_measures_fd_and_nll_against_the_test_split(tmp_path, monkeypatch):
    """The samples come from the EMA parameters (not the raw ones); "fd" compares the samples' features
    with the test split's, "fd_train_vs_test" training images with the test split, "fd_prior" the
    clipped prior draws; the NLL is measured on the first --n_nll test images."""
    images = _images()
    _flat_features(images, monkeypatch)
    seen = {"fd": [], "model_fn": [], "fit": [], "nll": []}
    fit, model_fn, sample = images.gf.train.fit, images.gf.nets.model_fn, images.gf.sample

    def spy_fit(*a, **k):
        state, hist = fit(*a, **k)
        seen["fit"].append(jax.tree.map(np.asarray, (state.params, state.ema)))
        return state, hist

    def spy_model_fn(net, params, **kw):
        seen["model_fn"].append(jax.tree.map(np.asarray, params))
        return model_fn(net, params, **kw)

    def spy_sample(fn, path, x1, **kw):
        x0, info = sample(fn, path, x1, **kw)
        seen["x1"], seen["x0"] = np.asarray(x1), np.clip(np.asarray(x0), -1, 1)
        return x0, info

    monkeypatch.setattr(images.gf.train, "fit", spy_fit)
    monkeypatch.setattr(images.gf.nets, "model_fn", spy_model_fn)
    monkeypatch.setattr(images.gf, "sample", spy_sample)
    monkeypatch.setattr(images, "frechet", lambda fa, fb: seen["fd"].append((np.asarray(fa), np.asarray(fb))) or 0.0)
    monkeypatch.setattr(images, "nll_bits_per_dim",
                        lambda cfg, fn, path, x, key: seen["nll"].append(np.asarray(x)) or (1.0, "stub"))
    m = images.run(images.parse_config(_tiny_images_args(tmp_path / "r", "--steps", "3", "--n_nll", "5",
                                                         "--ema", "0.5")))
    (params, ema), = seen["fit"]
    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])  # noqa: E731
    assert not np.allclose(flat(params), flat(ema["0.5"]))  # (the two differ after 3 steps)
    for p in seen["model_fn"]:  # the sampler's and the NLL's model: the EMA parameters
        np.testing.assert_array_equal(flat(p), flat(ema["0.5"]))
    xte = gf.data.load_digits("test")[0].reshape(-1, 64)
    xtr = gf.data.load_digits("train")[0].reshape(-1, 64)
    (s_a, s_b), (r_a, r_b), (p_a, p_b) = seen["fd"]
    np.testing.assert_array_equal(s_a, seen["x0"].reshape(8, 64))
    for b in (s_b, r_b, p_b):
        np.testing.assert_array_equal(b, xte)
    train_rows = {r.tobytes() for r in xtr.astype(np.float64)}
    assert len(r_a) == 8 and all(r.tobytes() in train_rows for r in r_a)  # training images, not test ones
    np.testing.assert_array_equal(p_a, np.clip(seen["x1"], -1, 1).reshape(8, 64))
    np.testing.assert_array_equal(seen["nll"][0].reshape(5, 64), xte[:5])
    assert m["nll_n"] == 5


def test_images_nll_uses_the_digits_bin_width_and_64_dimensions(monkeypatch):
    """The digits take 17 levels on [-1, 1] (bins 2/16 wide): a bound of -D ln 17 (a model putting
    equal mass on every level) is log2(17) bits/dim."""
    images = _images()
    import genflow.likelihood as lik

    seen = {}

    def fake(fn, path, x, key, bin_width, **kw):
        seen["bin_width"] = bin_width
        return -64 * math.log(17.0) * jnp.ones(len(x)), None

    monkeypatch.setattr(lik, "dequantized_log_prob", fake)
    cfg = images.parse_config(["--quick"])
    x = jnp.asarray(gf.data.load_digits("test")[0][:4])
    bpd, _ = images.nll_bits_per_dim(cfg, None, gf.paths.linear(), x, jax.random.key(0))
    assert seen["bin_width"] == pytest.approx(2.0 / 16.0)
    assert bpd == pytest.approx(math.log2(17.0), rel=1e-5)


def test_images_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    """A run killed after step 2 and resumed logs the same losses as one run straight through
    (state, RNG and data position restored, as the module docstring says)."""
    images = _images()
    _flat_features(images, monkeypatch)
    monkeypatch.setattr(images, "frechet", lambda fa, fb: 0.0)
    images.run(images.parse_config(_tiny_images_args(tmp_path / "a", "--steps", "4")))
    images.run(images.parse_config(_tiny_images_args(tmp_path / "b", "--steps", "4")))
    for d in (tmp_path / "b" / "ckpt").iterdir():
        if d.name.isdigit() and int(d.name) > 2:
            shutil.rmtree(d)
    m = images.run(images.parse_config(_tiny_images_args(tmp_path / "b", "--steps", "4")))
    assert m["resumed_from"] == 2
    la = [r["loss"] for r in gf.train.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))]
    lb = [r["loss"] for r in gf.train.read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))]
    assert len(la) == 4 and la == lb


def test_images_resume_check_keeps_the_stored_values_of_added_flags(tmp_path):
    """A run that recorded --image_size 16 / --label_key coarse_label resumes with the same flags
    (the defaults fill in only what an older run did not record)."""
    images = _images()
    cfg = images.parse_config(["--dataset", "cifar100", "--out", str(tmp_path), "--image_size", "16", "--label_key",
                               "coarse_label"])
    (tmp_path / "train_config.json").write_text(json.dumps({k: getattr(cfg, k) for k in images.TRAINING_FLAGS}))

    class Ckpt:
        def latest_step(self):
            return 100

    images.check_resume_config(cfg, Ckpt())  # the same flags: no SystemExit
    other = images.parse_config(["--dataset", "cifar100", "--out", str(tmp_path), "--label_key", "coarse_label"])
    with pytest.raises(SystemExit, match="trained with --image_size 16; got --image_size 0"):
        images.check_resume_config(other, Ckpt())


def test_inverse_measures_test_psnr_on_x_test_with_the_step_size_chosen_on_disjoint_x_val(tmp_path, monkeypatch):
    """Validation and test images are disjoint slices of the digits test split; both get
    measurement noise of --noise; the step size chosen on the validation images is the one used on
    the test images; PSNR is computed against the right ground truth; the pseudo-inverse baseline
    sees the same noisy measurement as the methods."""
    import genflow.inverse as inv
    import inverse

    op = inv.random_inpainting(jax.random.key(3), inverse.SHAPE, keep=0.4)
    monkeypatch.setattr(inverse, "tasks", lambda key: {"inpainting": op})
    monkeypatch.setattr(inverse, "SCALES", {"dps": (0.1, 1.0)})
    zero = jax.tree_util.Partial(lambda x, t: jnp.zeros_like(x))
    monkeypatch.setattr(inverse, "train_prior", lambda cfg, xtr: (zero, gf.paths.linear(), {"loss": np.zeros(3)}))
    calls, refs = [], []
    post, psnr = inv.posterior_sample, gf.metrics.psnr

    def spy_post(fn, path, x1, y, op_, **kw):
        calls.append((np.asarray(y), kw.get("scale")))
        return post(fn, path, x1, y, op_, **kw)

    def spy_psnr(x, ref, *a, **k):
        refs.append(np.asarray(ref))
        return psnr(x, ref, *a, **k)

    monkeypatch.setattr(inv, "posterior_sample", spy_post)
    monkeypatch.setattr(gf.metrics, "psnr", spy_psnr)
    out = inverse.run(inverse._cli.parse(inverse.Config, ["--steps", "1", "--n_val", "16", "--n_test", "16", "--noise",
                                                          "0.2", "--out", str(tmp_path)]))
    xte = gf.data.load_digits("test")[0]
    x_val, x_test = xte[:16], xte[16:32]
    (y_test, s_test), (_, s_test2) = calls[-2:]
    val_calls = calls[:-2]
    assert s_test == s_test2 == out["chosen_scale"]["inpainting"]["dps"]
    assert {s for _, s in val_calls} == {float(k) for k in out["validation_psnr"]["inpainting"]["dps"]}
    # measurement noise of --noise on the right images (inpainting keeps 40 % of 16 * 64 pixels)
    for y, x in [(y_test, x_test)] + [(y, x_val) for y, _ in val_calls]:
        r = np.asarray(y - op(jnp.asarray(x)))
        assert 0.17 < r.std() < 0.23, r.std()
    # PSNR: the pseudo-inverse and the method against x_test, the step-size search against x_val
    assert len(refs) == len(val_calls) + 2
    np.testing.assert_array_equal(refs[0], x_test)  # pinv
    np.testing.assert_array_equal(refs[-1], x_test)  # the method on the test images
    for r in refs[1:-1]:
        np.testing.assert_array_equal(r, x_val)
    base = jnp.clip(op.pinv(jnp.asarray(y_test)), -1, 1)
    assert out["results"]["inpainting"]["pinv"]["psnr"] == pytest.approx(float(psnr(base, x_test).mean()), rel=1e-6)


def test_density_digits_bits_per_dim_of_a_uniform_model_is_log2_17_on_dequantized_splits(tmp_path, monkeypatch):
    """A model with the uniform density on the dequantized support [-1 - b/2, 1 + b/2]^64 (b = 2/16:
    17 levels) puts equal mass on every level: log2(17) bits/dim on test and training images. Test
    images, training images (from the training part, not the held-out one) and the validation set
    are each dequantized within half a bin of their own split; the Gaussian reference is fitted on
    training images and evaluated on test ones."""
    import density

    x_all = gf.data.load_digits("train", channels_last=False)[0]
    x_test = gf.data.load_digits("test", channels_last=False)[0]
    n_val = len(x_all) // 10
    x_train, x_held = x_all[:-n_val], x_all[-n_val:]
    b = 2.0 / 16.0
    seen = {"logp": [], "gauss": []}

    def logp(y):
        seen["logp"].append(np.asarray(y))
        return jnp.full((len(y),), -64 * math.log(2.0 + b))

    def fake_fit(models, shape, batch_fn, x_example, steps, ffjord_steps, cfg, bin_width=None, x_val=None):
        seen["x_val"] = np.asarray(x_val)
        return {"uniform": (logp, lambda k, n: jnp.zeros((n, 64)), 0.01, 0.0)}

    gauss = density.gaussian_baseline

    def spy_gauss(tr, te):
        seen["gauss"].append((np.asarray(tr), np.asarray(te)))
        return gauss(tr, te)

    monkeypatch.setattr(density, "fit_models", fake_fit)
    monkeypatch.setattr(density, "gaussian_baseline", spy_gauss)
    cfg = density.parse_config(["--out", str(tmp_path)])
    rows = density.run_digits(cfg, ["glow"])
    assert rows["uniform"]["bpd"] == pytest.approx(math.log2(17.0), rel=1e-5)
    assert rows["uniform"]["train_bpd"] == pytest.approx(math.log2(17.0), rel=1e-5)

    def dequantized(y, x):  # within half a bin of x, and off the grid
        if y.shape != x.shape:
            return False
        d = np.abs(np.asarray(y, np.float64) - x)
        return d.max() <= b / 2 + 1e-6 and d.mean() > b / 8

    (y_te, y_tr_eval) = seen["logp"]
    assert dequantized(y_te, x_test)
    assert dequantized(y_tr_eval, x_train[: len(x_test)])
    assert dequantized(seen["x_val"], x_held)
    (g_tr, g_te), (g_tr2, g_te2) = seen["gauss"]
    assert dequantized(g_tr, x_train) and dequantized(g_te, x_test)
    assert dequantized(g_tr2, x_train) and dequantized(g_te2, x_train[: len(x_test)])
    assert rows["gaussian"]["bpd"] > rows["gaussian"]["train_bpd"]  # fitted on training images


def test_optimizers_digits_accuracy_is_measured_on_the_test_split(monkeypatch):
    """A test split whose labels no prediction can match (class 10 of a 10-way classifier) scores
    accuracy 0 at every learning rate; the training loss is the training split's."""
    import optimizers

    load = gf.data.load_digits

    def fake_load(split, **kw):
        x, y = load(split, **kw)
        return (x, np.full_like(y, 10)) if split == "test" else (x, y)

    monkeypatch.setattr(gf.data, "load_digits", fake_load)
    cfg = optimizers.parse_config(["--optimizers", "sgd_m", "--n_lrs", "2", "--digits_steps", "2", "--digits_batch",
                                   "8"])
    out = optimizers.digits_task(cfg, ["sgd_m"])["sgd_m"]
    assert not any(out["diverged"])
    assert out["test_acc"] == [0.0, 0.0]
    assert all(1.0 < v < 4.0 for v in out["train_loss"])  # ~ln 10 after 2 steps, finite


def test_optimizers_flow_w2_floor_is_between_two_independent_data_draws(monkeypatch):
    """The W2 data floor compares two independent draws of --n_eval points: positive, and of the
    size of W2 between independent draws."""
    import optimizers

    cfg = optimizers.parse_config(["--optimizers", "sgd_m", "--n_lrs", "2", "--fm_steps", "1", "--fm_batch", "8",
                                   "--n_eval", "64", "--sample_steps", "1"])
    out = optimizers.flow_task(cfg, ["sgd_m"])
    s = gf.data.toy_sampler("moons")
    ref = gf.metrics.w2_exact(np.asarray(s(jax.random.key(5), 64)), np.asarray(s(jax.random.key(6), 64)))
    assert 0.3 * ref < out["w2_data_floor"] < 3 * ref, (out["w2_data_floor"], ref)


def test_cli_quick_keeps_flags_given_in_either_form_and_parses_booleans():
    import _cli
    import images

    cfg = _cli.parse(images.Config, ["--quick", "--steps=7", "--batch", "5"], quick=images.QUICK)
    assert (cfg.steps, cfg.batch, cfg.ch, cfg.quick) == (7, 5, images.QUICK["ch"], True)
    cfg = _cli.parse(images.Config, ["--conditional", "--progress", "no"])
    assert cfg.conditional is True and cfg.progress is False and cfg.quick is False
    with pytest.raises(SystemExit):
        _cli.parse(images.Config, ["--progress", "maybe"])
