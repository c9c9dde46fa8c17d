"""The image experiment end to end in --quick mode: it trains a small U-Net on the bundled digits,
checkpoints, samples, and writes its grid, loss curve and metrics (Fréchet distance in the feature
space of its own digits classifier, NLL in bits/dim)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_images_quick_end_to_end(tmp_path):
    out = tmp_path / "images"
    cmd = [sys.executable, str(ROOT / "experiments" / "images.py"), "--quick", "--progress", "false", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=900,
                   capture_output=True)
    for name in ("samples.png", "loss.png"):
        assert (out / name).stat().st_size > 5_000, name
    m = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 151)) and all(math.isfinite(r["loss"]) for r in rows)
    assert sorted(os.listdir(out / "ckpt"), key=int) == ["50", "100", "150"]  # saved every 50 steps
    assert m["train_steps"] == 150 and m["nfe"] == 20
    # the feature classifier is good (measured 0.975 test accuracy), so its Fréchet distances mean something
    assert m["classifier_test_accuracy"] > 0.95, m
    # measured: FD 45 after 150 steps (128 samples), 14.5 between 128 training images and the test
    # split (the floor at the generated sample size), 655 for the prior noise itself (an untrained
    # model); the 1500-step default run reaches 24.8
    assert m["fd_floor_n"] == m["fd_n_generated"] == 128
    assert m["fd_train_vs_test"] < 20 and m["fd"] < 100 and m["fd_prior"] > 300, m
    # dequantized NLL bound on 17-level data: below the 4.09 bits/dim of a uniform model (2.99 measured)
    assert 0.0 < m["nll_bpd"] < 4.0, m


def _images():
    sys.path.insert(0, str(ROOT / "experiments"))
    import images

    return images


def test_images_validate_dry_runs_the_sampler_and_checks_numbers():
    # a path/prediction/solver combination gf.sample refuses failed only after the whole training
    images = _images()
    for args, msg in ((["--prediction", "x0"], "--solver 'heun' cannot sample --path 'linear' with --prediction 'x0'"),
                      (["--solver", "euler_maruyama"], "--solver 'euler_maruyama' cannot sample"),
                      (["--sample_steps", "0"], "--sample_steps must be >= 1"),
                      (["--n_eval", "1"], "--n_eval must be >= 2"),
                      (["--batch", "0"], "--batch must be >= 1"),
                      (["--ema", "1.0"], r"--ema must be in \(0, 1\)"),
                      (["--weighting", "foo"], "--weighting must be one of"),
                      # (an odd --ch failed inside the network, after --out was made)
                      (["--ch", "3"], r"--ch must be even for --net unet \(its time embedding"),
                      (["--net", "dit", "--ch", "1"], r"--ch must be even for --net dit \(its width 2 \* ch")):
        with pytest.raises(SystemExit, match=msg):
            images.validate(images.parse_config(args))
    images.validate(images.parse_config(["--quick"]))  # the defaults pass


def test_images_resumed_conditional_run_plots_every_step_and_caps_the_nll_set(tmp_path, monkeypatch):
    # (1) after a resume loss.png showed only the resumed steps, at x = 0, 1, ...; (2) --conditional
    # with --n_nll above the test split's 364 images built 400 null labels for 364 images and failed
    # after training and sampling, before metrics.json was written
    images = _images()
    seen = []
    curves = images.gf.viz.curves

    def spy(series, **kw):
        v = series["loss"]
        seen.append(np.asarray(v[0] if isinstance(v, tuple) else np.arange(len(v))))
        return curves(series, **kw)

    monkeypatch.setattr(images.gf.viz, "curves", spy)
    args = ["--net", "mlp", "--ch", "8", "--batch", "8", "--warmup", "1", "--n_eval", "16", "--progress", "false",
            "--conditional", "--ckpt_every", "4", "--steps", "8", "--out", str(tmp_path / "r")]
    images.run(images.parse_config(args + ["--n_nll", "0"]))
    _cut_checkpoints(tmp_path / "r", 4)  # as if killed after step 4
    m = images.run(images.parse_config(args + ["--n_nll", "400"]))
    np.testing.assert_array_equal(seen[0], np.arange(1, 9))
    np.testing.assert_array_equal(seen[1], np.arange(1, 9))
    assert m["nll_n"] == 364 and np.isfinite(m["nll_bpd"]), m


def _cut_checkpoints(out, step):
    """Leave ``out`` as a run killed after ``step`` would: its later checkpoints removed (their
    metrics.jsonl rows are dropped by the resume)."""
    import shutil

    for d in os.listdir(out / "ckpt"):
        if d.isdigit() and int(d) > step:
            shutil.rmtree(out / "ckpt" / d)


def _stub_classifier(images, monkeypatch):
    # the feature classifier (600 steps) and the NLL are not under test: stubbed out to keep this fast
    monkeypatch.setattr(images, "train_classifier", lambda xtr, ytr, xte, yte, key: (lambda x: np.asarray(x).reshape(
        len(x), -1)[:, :4].astype(np.float64), 1.0))


def _tiny_args(out, *extra):
    return ["--net", "mlp", "--ch", "2", "--depth", "1", "--batch", "4", "--warmup", "0", "--n_eval", "8", "--n_nll",
            "0", "--sample_steps", "1", "--solver", "euler", "--ckpt_every", "1", "--progress", "false", "--out",
            str(out), *extra]


def _tiny_run(images, monkeypatch, out, *extra):
    _stub_classifier(images, monkeypatch)
    return images.run(images.parse_config(_tiny_args(out, *extra)))


def test_images_refuses_to_resume_a_checkpoint_of_another_config(tmp_path, monkeypatch):
    # a re-run into the same --out with another --prediction / --path / --lr silently restored the
    # checkpoint trained with the first config (a velocity model sampled as an eps model, FD 668)
    images = _images()
    _tiny_run(images, monkeypatch, tmp_path / "r", "--steps", "2")
    _cut_checkpoints(tmp_path / "r", 1)  # as if killed after step 1
    with pytest.raises(SystemExit, match="--prediction velocity.*--prediction eps"):
        _tiny_run(images, monkeypatch, tmp_path / "r", "--steps", "2", "--prediction", "eps", "--path", "vp_cosine")
    m = _tiny_run(images, monkeypatch, tmp_path / "r", "--steps", "2")  # the same flags resume
    assert m["resumed_from"] == 1


def test_images_refuses_to_resume_with_another_steps(tmp_path, monkeypatch):
    # --steps sets the cosine decay of the learning rate, but a resume with another --steps went on
    # silently (1500 -> 3000 steps raised it at step 1500 from 2e-4 to 1.15e-3): not bit-identical
    images = _images()
    out = tmp_path / "r"
    _tiny_run(images, monkeypatch, out, "--steps", "2")
    rows = (out / "metrics.jsonl").read_text()
    for steps in ("4", "1"):
        with pytest.raises(SystemExit, match=f"--steps 2; got --steps {steps}.*decays over --steps.*new --out"):
            _tiny_run(images, monkeypatch, out, "--steps", steps)
    assert (out / "metrics.jsonl").read_text() == rows  # refused before anything was touched
    # (and the finished run's results stay: the refusal deleted metrics.json and the plots)
    assert all((out / name).exists() for name in images.OUTPUTS)


def test_images_refuses_ckpt_every_0_into_an_out_holding_checkpoints(tmp_path, monkeypatch):
    # --ckpt_every 0 skipped the resume check: it trained from scratch beside another run's ckpt/ and
    # train_config.json and rewrote metrics.jsonl; a later checkpointed run then resumed the old
    # checkpoint and mixed both runs' rows
    images = _images()
    out = tmp_path / "r"
    _tiny_run(images, monkeypatch, out, "--steps", "2")
    before = {n: (out / n).read_text() for n in ("metrics.jsonl", "train_config.json", "metrics.json")}
    with pytest.raises(SystemExit, match="--out .* checkpoints.*--ckpt_every 0"):
        _tiny_run(images, monkeypatch, out, "--steps", "2", "--ckpt_every", "0", "--lr", "1e-3")
    assert {n: (out / n).read_text() for n in before} == before
    m = _tiny_run(images, monkeypatch, tmp_path / "new", "--steps", "2", "--ckpt_every", "0")  # a new --out trains
    assert m["train_steps"] == 2 and not (tmp_path / "new" / "ckpt").exists()


def test_images_rerun_after_a_failed_evaluation_reports_the_training(tmp_path, monkeypatch, capsys):
    # a run that died in the evaluation (training and its last checkpoint done, no metrics.json),
    # re-run: final_loss null and no loss.png although metrics.jsonl held every step, yet "wrote
    # ..., loss.png" was printed
    images = _images()
    out = tmp_path / "r"

    def crash(*args):
        raise RuntimeError("died in the evaluation")

    monkeypatch.setattr(images, "train_classifier", crash)
    with pytest.raises(RuntimeError, match="died in the evaluation"):
        images.run(images.parse_config(_tiny_args(out, "--steps", "3")))
    assert not (out / "metrics.json").exists() and not (out / "loss.png").exists()
    _stub_classifier(images, monkeypatch)
    assert images.main(_tiny_args(out, "--steps", "3")) == 0
    m = json.loads((out / "metrics.json").read_text())
    losses = [r["loss"] for r in images.gf.train.read_jsonl(str(out / "metrics.jsonl"))]
    assert len(losses) == 3 and m["resumed_from"] == 3 and m["train_steps"] == 0
    np.testing.assert_allclose(m["final_loss"], np.mean(np.float32(losses)), rtol=1e-6)
    assert (out / "loss.png").stat().st_size > 1000
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out}/samples.png, loss.png, metrics.json"
    # a record of another run in --out (another script's, or other training flags): its numbers are
    # not taken as this training's (toy2d's failure record's loss was reported as final_loss)
    foreign = dict(m, final_loss=123.0, train_steps_per_s=9e9, config=dict(m["config"], lr=0.5))
    (out / "metrics.json").write_text(json.dumps(foreign))
    assert images.main(_tiny_args(out, "--steps", "3")) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    np.testing.assert_allclose(m2["final_loss"], np.mean(np.float32(losses)), rtol=1e-6)
    assert m2["train_steps_per_s"] != 9e9
    capsys.readouterr()
    # without metrics.jsonl rows no loss.png is drawn, and none is claimed
    (out / "loss.png").unlink()
    (out / "metrics.jsonl").unlink()
    assert images.main(_tiny_args(out, "--steps", "3")) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out}/samples.png, metrics.json"
    assert not (out / "loss.png").exists()


def test_images_resumed_final_loss_covers_the_steps_before_the_resume(tmp_path, monkeypatch):
    # final_loss (the mean of the last 50 steps) of a run resumed with fewer than 50 steps left
    # averaged only the resumed steps: it differed from the uninterrupted run's
    images = _images()
    _tiny_run(images, monkeypatch, tmp_path / "r", "--steps", "4")
    _cut_checkpoints(tmp_path / "r", 2)  # as if killed after step 2
    m = _tiny_run(images, monkeypatch, tmp_path / "r", "--steps", "4")
    losses = [r["loss"] for r in images.gf.train.read_jsonl(str(tmp_path / "r" / "metrics.jsonl"))]
    assert len(losses) == 4 and m["resumed_from"] == 2
    np.testing.assert_allclose(m["final_loss"], np.mean(np.float32(losses)), rtol=1e-6)


def test_images_validate_checks_the_optimizer_flags():
    # --steps 0 passed validate and failed in make_optimizer ("decay_steps must be a positive int"),
    # --steps 50 (default --warmup 100) with "decay_steps (50) must exceed warmup_steps (100)", --lr nan
    # / --clip 0 with the optimizer's argument names
    images = _images()
    for args, msg in ((["--steps", "0"], "--steps must be >= 1"), (["--steps", "50"], "--warmup must be below --steps"),
                      (["--lr", "nan"], "--lr must be a finite number > 0"), (["--lr", "-1"], "--lr must be"),
                      (["--clip", "0"], "--clip must be a finite number > 0"), (["--warmup", "-1"], "--warmup must be >= 0")):
        with pytest.raises(SystemExit, match=msg):
            images.validate(images.parse_config(args))


def test_images_refuses_an_unknown_dataset_and_an_fsdp_that_does_not_divide_the_devices(tmp_path):
    # (an unknown tfds name failed as DatasetNotFoundError after --out was made; --fsdp 3 on one
    # device as an unnamed ValueError from make_mesh)
    import jax

    sys.path.insert(0, str(ROOT / "experiments"))
    import images

    with pytest.raises(SystemExit, match="--dataset must be 'digits' or a tfds dataset name"):
        images.validate(images.parse_config(["--dataset", "nope"]))
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4):
        images.validate(images.parse_config(["--dataset", "mnist"]))  # (a known, prepared name passes, offline)
    # an unprepared one started tfds's download (no internet: a failure deep inside tfds, after --out was made)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))
        with pytest.raises(SystemExit, match="--dataset 'mnist': tfds dataset 'mnist' .* without downloading"):
            images.validate(images.parse_config(["--dataset", "mnist"]))
    with pytest.raises(SystemExit, match="--solver must be one of"):
        images.validate(images.parse_config(["--solver", "bogus"]))  # (the one message not naming its flag)
    with pytest.raises(SystemExit, match="--fsdp must divide the number of devices"):
        images.validate(images.parse_config(["--fsdp", str(jax.device_count() + 1)]))


def test_images_on_a_small_tfds_dataset_and_a_failed_rerun_leaves_no_stale_results(tmp_path, monkeypatch):
    """The evaluation sets were read as fixed batches of 2048 / 4096 images: a dataset with fewer
    failed with "fewer than batch_size=2048" (a batch size nobody gave) after --out was made. A failed
    (or interrupted) rerun kept the earlier run's metrics.json and plots beside its own log."""
    import tensorflow_datasets as tfds

    images = _images()
    out = tmp_path / "small"
    with tfds.testing.mock_data(num_examples=40):
        m = _tiny_run(images, monkeypatch, out, "--dataset", "mnist", "--steps", "2", "--ckpt_every", "0")
        assert m["fd_n_test"] == 40 and (out / "metrics.json").exists() and (out / "samples.png").exists()

        def crash(*args):
            raise RuntimeError("died in the evaluation")

        monkeypatch.setattr(images, "train_classifier", crash)
        with pytest.raises(RuntimeError, match="died in the evaluation"):
            images.run(images.parse_config(_tiny_args(out, "--dataset", "mnist", "--steps", "2", "--ckpt_every", "0")))
    assert not (out / "metrics.json").exists() and not (out / "samples.png").exists()
    with pytest.raises(SystemExit, match="--image_size applies to tfds datasets"):
        images.validate(images.parse_config(["--image_size", "16"]))



def test_images_reads_the_label_and_image_features_it_is_told_to():
    """--label_key / --image_key name the tfds features (cifar100's 20 coarse classes rather than
    its 100 fine ones); an absent feature is refused before anything is written, naming the
    flags; the bundled digits have no feature names to choose."""
    import tensorflow_datasets as tfds

    images = _images()
    with tfds.testing.mock_data(num_examples=40):
        cfg = images.parse_config(["--dataset", "cifar100", "--label_key", "coarse_label"])
        images.validate(cfg)
        _, y = images._eval_images(cfg, "train", 40, 0)
        assert y.min() >= 0 and y.max() < 20 and len(set(y.tolist())) > 1
        for flag in ("--label_key", "--image_key"):
            with pytest.raises(SystemExit, match=r"--dataset 'cifar100': .*'nope'.*--image_key or --label_key"):
                images.validate(images.parse_config(["--dataset", "cifar100", flag, "nope"]))
    with pytest.raises(SystemExit, match="--image_key and --label_key apply to tfds datasets"):
        images.validate(images.parse_config(["--label_key", "coarse_label"]))


def test_images_resume_check_reads_a_flag_added_since_as_its_default_then(tmp_path):
    """A run saved before --label_key existed read "label": resuming it with another label_key
    was accepted unchecked, and its record overwritten (review). An array feature named as the
    label is refused by validate, before --out is made, not after training."""
    import json

    import tensorflow_datasets as tfds

    images = _images()
    old = {k: getattr(images.Config(), k) for k in images.TRAINING_FLAGS if k not in images.ADDED_FLAGS}
    assert "image_size" not in old
    (tmp_path / "train_config.json").write_text(json.dumps(dict(old, dataset="cifar100")))

    class Ckpt:
        def latest_step(self):
            return 100

    cfg = images.parse_config(["--dataset", "cifar100", "--out", str(tmp_path), "--label_key", "coarse_label"])
    with pytest.raises(SystemExit, match="trained with --label_key label; got --label_key coarse_label"):
        images.check_resume_config(cfg, Ckpt())
    images.check_resume_config(images.parse_config(["--dataset", "cifar100", "--out", str(tmp_path)]), Ckpt())
    # (so is --image_size, added to the training flags with a default of 0 before them)
    (tmp_path / "train_config.json").write_text(json.dumps(dict(old, dataset="cifar100")))
    cfg = images.parse_config(["--dataset", "cifar100", "--out", str(tmp_path), "--image_size", "16"])
    with pytest.raises(SystemExit, match="trained with --image_size 0; got --image_size 16"):
        images.check_resume_config(cfg, Ckpt())
    with tfds.testing.mock_data(num_examples=8):
        with pytest.raises(SystemExit, match="feature 'image' \\(label_key\\) is not a scalar integer"):
            images.validate(images.parse_config(["--dataset", "cifar100", "--label_key", "image"]))
