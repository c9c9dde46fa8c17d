"""The toy 2-D experiment end to end (short run): it trains, samples, writes its plots and metrics,
and reaches a measured quality bar."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_toy2d_end_to_end(tmp_path):
    out = tmp_path / "toy"
    cmd = [sys.executable, str(ROOT / "experiments" / "toy2d.py"), "--steps", "1500", "--n_eval", "1024",
           "--sample_steps", "20", "--progress", "false", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    for name in ("samples.png", "trajectories.png", "loss.png"):
        assert (out / name).stat().st_size > 10_000, name
    # what the plots show, not only that they exist: the samples panel (right half) carries about as
    # many blue scatter pixels as the data panel (a collapsed or exploded sampler leaves it nearly
    # blank: measured ratio 0.93), and the trajectory plot shows both ends (blue noise, red data)
    import matplotlib.image as mpimg

    im = mpimg.imread(out / "samples.png")
    blue = im[..., 2] > im[..., 0] + 0.2
    data_ink, sample_ink = blue[:, : blue.shape[1] // 2].sum(), blue[:, blue.shape[1] // 2:].sum()
    assert data_ink > 2_000 and 0.5 < sample_ink / data_ink < 2.0, (data_ink, sample_ink)
    im = mpimg.imread(out / "trajectories.png")
    assert (im[..., 2] > im[..., 0] + 0.2).sum() > 500 and (im[..., 0] > im[..., 2] + 0.2).sum() > 500
    m = json.loads((out / "metrics.json").read_text())
    assert m["nfe"] == 40 and m["nfe_tsit5"] > 0
    # measured: W2 0.21 after 1500 steps at n=1024 (data-vs-data floor 0.14 at that n)
    assert m["w2"] < 0.3, m
    assert m["train_steps_per_s"] > 0


def test_toy2d_rejects_bad_config(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "toy2d.py"), "--path", "nope", "--out",
                        str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "--path must be one of" in r.stderr


def test_toy2d_refuses_unusable_options_before_training():
    # these trained for the whole run and then crashed in gf.sample / the metrics, writing nothing
    import pytest

    sys.path.insert(0, str(ROOT / "experiments"))
    import toy2d

    for args, msg in ((["--prediction", "x0"], "--solver 'heun' cannot sample --path 'linear' with --prediction 'x0'"),
                      (["--solver", "euler_maruyama"], "--solver 'euler_maruyama' cannot sample"),
                      (["--steps", "0"], "--steps must be >= 1"), (["--n_eval", "1"], "--n_eval must be >= 2"),
                      (["--batch", "0"], "--batch must be >= 1"), (["--weighting", "foo"], "--weighting must be one of")):
        with pytest.raises(SystemExit, match=msg.replace("+", r"\+")):
            toy2d.validate(toy2d.parse_config(args))


def test_inverse_quick_beats_the_pseudo_inverse(tmp_path):
    """Even a briefly trained prior (1500 steps) must beat the pseudo-inverse baseline where the
    measurement leaves most of the image unknown (measured: +1.8 to +5.1 dB; PiGDM, whose isotropic
    prior variance suits this prior least, +1.2 to +2.1)."""
    out = tmp_path / "inv"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "inverse.py"), "--quick", "--out", str(out)],
                   check=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=900)
    r = json.loads((out / "results.json").read_text())["results"]
    for task in ("inpainting", "compressed_sensing"):
        for method in ("dps", "mcg", "flowdps", "ddnm", "pigdm", "tmpd"):
            margin = 0.5 if method == "pigdm" else 1.0
            assert r[task][method]["psnr"] > r[task]["pinv"]["psnr"] + margin, (task, method, r[task])
            assert r[task][method]["nfe"] == 20
    for name in ("inpainting.png", "super_resolution_x2.png", "results.md"):
        assert (out / name).stat().st_size > 100


def test_inverse_refuses_bad_flags_before_training():
    # --steps 0 and --noise < 0 failed after the prior's 4,000 training steps, --train_steps 0 after
    # every sampler had run (KeyError 'loss'), --batch 0 with a ZeroDivisionError
    import pytest

    sys.path.insert(0, str(ROOT / "experiments"))
    import _cli
    import inverse

    for args, msg in ((["--steps", "0"], "--steps must be >= 1"), (["--train_steps", "0"], "--train_steps must be >= 1"),
                      (["--batch", "0"], "--batch must be >= 1"), (["--hidden", "0"], "--hidden must be >= 1"),
                      (["--noise", "-0.1"], "--noise must be a finite number >= 0"),
                      (["--lr", "nan"], "--lr must be a finite number > 0")):
        with pytest.raises(SystemExit, match=msg):
            inverse.validate(_cli.parse(inverse.Config, args))


def test_inverse_step_size_search_leaves_no_best_at_an_edge():
    """choose_scale grows the grid past an end that holds the best (the first runs picked FlowDPS's
    1.5, the top of its grid, in every task): hand-worked cases."""
    import math

    sys.path.insert(0, str(ROOT / "experiments"))
    import inverse

    calls = []

    def peak_at(p):
        def f(s):
            calls.append(s)
            return -(math.log(s) - math.log(p)) ** 2
        return f

    best, tried = inverse.choose_scale((0.1, 0.3, 1.0, 3.0), peak_at(10.0))
    # up twice (27 is worse: stop), then the midpoints sqrt(3 * 9) and sqrt(9 * 27) around the best
    assert best == 9.0 and list(tried) == [0.1, 0.3, 1.0, 3.0, 5.2, 9.0, 15.6, 27.0]
    best, tried = inverse.choose_scale((0.3, 1.0, 3.0), peak_at(0.05))
    # down twice (0.0111 is worse), then midpoints 0.0192 and 0.0577: 0.0577 is nearer the peak
    assert best == 0.0577 and list(tried) == [0.0111, 0.0192, 0.0333, 0.0577, 0.1, 0.3, 1.0, 3.0]
    best, tried = inverse.choose_scale((0.3, 1.0, 3.0), peak_at(1.2))
    assert best == 1.0 and list(tried) == [0.3, 0.548, 1.0, 1.73, 3.0]  # inside: midpoints only
    best, tried = inverse.choose_scale((0.3, 1.0), peak_at(1e6))
    assert best == 81.0 and list(tried)[-3:] == [27.0, 46.8, 81.0]  # at most 4 extensions
    # a diverging (NaN) step size is never chosen, and stops the growth
    best, tried = inverse.choose_scale((0.3, 1.0), lambda s: float("nan") if s > 1.5 else -abs(s - 2))
    assert best == 1.0 and math.isnan(tried[3.0]) and math.isnan(tried[1.73]) and list(tried) == [0.3, 0.548, 1.0,
                                                                                                  1.73, 3.0]
    assert inverse.choose_scale((None,), lambda s: 5.0) == (None, {None: 5.0})


def test_experiment_json_is_standard_json(tmp_path):
    """The entry points write a diverged run's NaN / inf metrics as null: Python's json wrote NaN and
    Infinity, which strict parsers refuse. NumPy scalars and arrays become Python values."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import _cli

    obj = {"w2": float("nan"), "loss": [1.0, float("inf"), -float("inf")], "nfe": np.int32(14),
           "curve": np.array([0.5, np.nan]), "nested": {"ok": np.float32(0.25), "name": "moons", "none": None}}
    _cli.write_json(str(tmp_path / "m.json"), obj)
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert back == {"w2": None, "loss": [1.0, None, None], "nfe": 14, "curve": [0.5, None],
                    "nested": {"ok": 0.25, "name": "moons", "none": None}}


def test_toy2d_refuses_a_bad_learning_rate_before_training():
    # --lr -0.01 trained the whole run uphill (W2 1569, loss 6e6) and wrote it; --lr nan failed at
    # step 0 with an unnamed NonFiniteLossError
    import pytest

    sys.path.insert(0, str(ROOT / "experiments"))
    import toy2d

    for lr in ("-0.01", "nan", "0", "inf"):
        with pytest.raises(SystemExit, match="--lr must be a finite number > 0"):
            toy2d.validate(toy2d.parse_config(["--lr", lr]))


def _listed(out) -> list:
    """The files in ``out`` but the marker naming the script whose outputs they are."""
    return sorted(n for n in os.listdir(out) if n != ".genflow_run")


def test_an_out_of_one_script_is_refused_to_another(tmp_path):
    # scripts share output names (metrics.json, results.json, samples.png): a second script's run into
    # the same --out overwrote the first's results and left the rest beside its own
    sys.path.insert(0, str(ROOT / "experiments"))
    import _cli

    out = tmp_path / "o"
    _cli.make_out(str(out), "toy2d")
    assert (out / ".genflow_run").read_text() == "toy2d\n"
    _cli.make_out(str(out), "toy2d")  # its own: fine
    with pytest.raises(SystemExit, match="--out .* holds the outputs of toy2d.py; pass another --out for images.py"):
        _cli.make_out(str(out), "images")


def test_sigterm_runs_the_interrupt_handling():
    # SIGTERM (pre-emption, timeout) skipped the scripts' Ctrl-C handling (failure records, removal of an
    # earlier run's results): it now raises KeyboardInterrupt under __main__
    code = ("import os, signal, sys; sys.path.insert(0, 'experiments'); import _cli; _cli.terminate_as_interrupt()\n"
            "try:\n    os.kill(os.getpid(), signal.SIGTERM); signal.pause()\n"
            "except KeyboardInterrupt as e:\n    print('interrupted', e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("interrupted terminated by signal"), (r.stdout, r.stderr)


def _toy2d():
    sys.path.insert(0, str(ROOT / "experiments"))
    import toy2d

    return toy2d


def test_toy2d_keeps_its_metrics_and_loss_curve_when_training_fails(tmp_path):
    """A non-finite loss used to leave an empty --out (the exception carried the history and the
    last good state, but nothing was written) and a traceback; now metrics.json says why and where."""
    toy2d = _toy2d()
    out = tmp_path / "fail"
    rc = toy2d.main(["--steps", "20", "--n_eval", "64", "--lr", "1e30", "--progress", "false", "--chunk", "10",
                     "--out", str(out)])
    assert rc == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["failed"] == "NonFiniteLossError" and m["failed_at_step"] == m["steps_done"] == 1
    assert m["config"]["lr"] == 1e30 and (out / "loss.png").stat().st_size > 1000


def test_toy2d_same_seed_same_metrics_other_seed_other_metrics(tmp_path):
    toy2d = _toy2d()
    args = ["--steps", "60", "--n_eval", "128", "--sample_steps", "4", "--chunk", "30", "--progress", "false"]
    runs = [toy2d.run(toy2d.parse_config(args + ["--seed", str(s), "--out", str(tmp_path / f"r{i}")]))
            for i, s in enumerate((3, 3, 4))]
    for k in ("w2", "final_loss", "w2_tsit5", "mmd", "nfe_tsit5"):
        assert runs[0][k] == runs[1][k], k
    assert runs[0]["w2"] != runs[2]["w2"] and runs[0]["final_loss"] != runs[2]["final_loss"]


def test_entry_points_refuse_a_file_as_out_a_huge_seed_and_unusable_eval_options(tmp_path):
    import pytest

    toy2d = _toy2d()
    import _cli
    import inverse
    import optimizers

    afile = tmp_path / "afile"
    afile.write_text("x")
    for parse in (toy2d.parse_config, lambda a: _cli.parse(inverse.Config, a), optimizers.parse_config):
        with pytest.raises(SystemExit, match="--out .* exists and is not a directory"):
            parse(["--out", str(afile)])
        # (a seed near 2**63 passed, and jax.random.key(seed + 100) overflowed after the first task)
        # (and jax.random.key keeps 32 bits: 2**32 re-ran seed 0, -1 was 2**32 - 1)
        for seed in (10 ** 20, 2 ** 63 - 1, 2 ** 62, 2 ** 32, 2 ** 31, -1):
            with pytest.raises(SystemExit, match=r"--seed must lie in \[0, 2\*\*31\)"):
                parse(["--seed", str(seed)])
        with pytest.raises(SystemExit, match="--out must be a non-empty path"):
            parse(["--out", ""])  # (os.makedirs' FileNotFoundError, after the sampler dry run)
    for args, msg in ((["--eval_solver", "heun"], "--eval_solver must be an adaptive solver"),
                      (["--solver", "bogus"], "--solver must be one of .*; got 'bogus'"),
                      (["--eval_solver", "bogus"], "--eval_solver must be one of .*; got 'bogus'"),
                      (["--n_eval", "50000"], "--n_eval must be <= 10000")):
        with pytest.raises(SystemExit, match=msg):
            toy2d.validate(toy2d.parse_config(args))
    with pytest.raises(SystemExit, match="--from_results .* is not a file"):
        optimizers.parse_config(["--from_results", str(tmp_path / "missing.json")])


def test_optimizer_sweep_flatness_is_the_contiguous_width_around_the_best():
    sys.path.insert(0, str(ROOT / "experiments"))
    import numpy as np
    import optimizers

    lrs = np.logspace(-3, 1, 5)  # 1e-3 ... 10, one decade apart
    # accuracy, absolute tolerance 0.06: 0.9 and 0.95 are contiguous around the best (1 decade);
    # 0.94 at lr 10 is within tolerance but cut off by the 0.5 at lr 1: counted, not in the width
    f = optimizers.flatness(lrs, np.array([0.5, 0.9, 0.95, 0.5, 0.94]), True, 0.06, relative=False)
    assert (f["best"], f["best_lr"], f["width_decades"], f["n_within"]) == (0.95, 0.1, 1.0, 3)
    # loss, relative tolerance 10 %: a diverged run (valid False) never counts, even with a low value
    f = optimizers.flatness(lrs, np.array([1.05, 1.0, 1.08, 3.0, 0.1]), False, 0.1, relative=True,
                            valid=np.array([True, True, True, True, False]))
    assert (f["best"], f["best_lr"], f["width_decades"], f["n_within"]) == (1.0, 0.01, 2.0, 3)


def test_toy2d_records_a_failure_after_training(tmp_path, monkeypatch, capsys):
    """A Ctrl-C (or an error) in the sampling / the exact W2 after training printed "interrupted:
    wrote .../metrics.json" and wrote nothing: now metrics.json records that training completed and
    where the run stopped, and only the files written are named."""
    toy2d = _toy2d()
    args = ["--steps", "20", "--n_eval", "64", "--sample_steps", "4", "--chunk", "10", "--progress", "false"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy2d.gf.metrics, "w2_exact", interrupted)
    out = tmp_path / "r"
    assert toy2d.main(args + ["--out", str(out)]) == 130
    m = json.loads((out / "metrics.json").read_text())
    assert m["failed"] == "KeyboardInterrupt" and m["training_completed"] and m["failed_in"] == "metrics"
    assert m["steps_done"] == 20 and np.isfinite(m["final_loss"])
    assert capsys.readouterr().err.splitlines()[-1] == f"interrupted: wrote {out}/loss.png, metrics.json"
    assert _listed((out)) == ["loss.png", "metrics.json"]

    def broken(*a, **k):
        raise ValueError("no plot")

    monkeypatch.undo()
    monkeypatch.setattr(toy2d.gf.viz, "trajectories", broken)  # any other error: recorded too, then raised
    with pytest.raises(ValueError, match="no plot"):
        toy2d.main(args + ["--out", str(tmp_path / "e")])
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["failed"] == "ValueError" and m["training_completed"] and m["failed_in"] == "plots"
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == f"failed: wrote {tmp_path / 'e'}/samples.png, loss.png, metrics.json"
    assert _listed((tmp_path / "e")) == ["loss.png", "metrics.json", "samples.png"]


def test_toy2d_failed_rerun_leaves_no_outputs_of_the_earlier_run(tmp_path, monkeypatch, capsys):
    """A failed re-run into an --out left the previous run's samples.png / trajectories.png (and
    loss.png without a loss row) beside its failure record, and claimed a loss.png it had not drawn."""
    toy2d = _toy2d()
    out = tmp_path / "r"
    args = ["--steps", "20", "--n_eval", "64", "--sample_steps", "4", "--chunk", "10", "--progress", "false",
            "--out", str(out)]
    assert toy2d.main(args) == 0
    assert _listed((out)) == ["loss.png", "metrics.json", "samples.png", "trajectories.png"]
    # diverges at step 1: its own loss curve (one step) and metrics.json, nothing of the earlier run
    assert toy2d.main(args + ["--lr", "1e30"]) == 1
    assert _listed((out)) == ["loss.png", "metrics.json"]
    assert capsys.readouterr().err.splitlines()[-1] == f"wrote {out}/loss.png, metrics.json"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy2d.gf.train, "fit", interrupted)  # before any step: no loss row, no loss.png
    assert toy2d.main(args) == 130
    assert _listed((out)) == ["metrics.json"]
    assert capsys.readouterr().err.splitlines()[-1] == f"interrupted: wrote {out}/metrics.json"
    assert json.loads((out / "metrics.json").read_text())["steps_done"] == 0


def test_density_without_digits_removes_an_earlier_digits_grid(tmp_path):
    # --digits false into an --out of an earlier run left its samples_digits.png beside a
    # results.json without digits results
    sys.path.insert(0, str(ROOT / "experiments"))
    import density

    out = tmp_path / "d"
    out.mkdir()
    (out / "samples_digits.png").write_bytes(b"an earlier run's grid")
    res = density.run(density.parse_config(["--models", "glow", "--steps_2d", "2", "--flow_steps_2d", "1",
                                            "--hidden", "4", "--batch", "8", "--n_test_2d", "8", "--grid", "4",
                                            "--digits", "false", "--out", str(out)]))
    assert "digits" not in res and not (out / "samples_digits.png").exists()
    assert (out / "results.json").exists() and (out / "samples_2d.png").exists()


def test_entry_points_refuse_an_out_inside_a_file(tmp_path):
    # an --out whose parent is a file failed with a NotADirectoryError traceback from os.makedirs
    toy2d = _toy2d()
    import _cli
    import density
    import images
    import inverse
    import optimizers

    afile = tmp_path / "afile"
    afile.write_text("x")
    for parse in (toy2d.parse_config, lambda a: _cli.parse(inverse.Config, a), optimizers.parse_config,
                  images.parse_config, density.parse_config):
        for out in (afile / "sub", afile / "sub" / "deeper"):
            with pytest.raises(SystemExit, match="^--out .* is not a directory$"):
                parse(["--out", str(out)])
    toy2d.parse_config(["--out", str(tmp_path / "new" / "deeper")])  # a folder yet to be made is fine


def test_failed_reruns_remove_the_earlier_runs_outputs_and_partial_results_are_refused(tmp_path):
    """optimizers / density / inverse reruns that failed left the earlier run's results.json (and
    summary, plots) beside the new run's partial outputs; optimizers --from_results on the partial
    results_digits_only.json failed with KeyError 'flow'; inverse's --n_val + --n_test check ran
    after --out was made."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import _cli
    import inverse
    import optimizers

    out = tmp_path / "o"
    out.mkdir()
    for name in ("results.json", "summary.md", "kept.txt"):
        (out / name).write_text("an earlier run's")  # (just before the block: a 1 s mtime window kept them)
    with pytest.raises(RuntimeError, match="flow task failed"):
        with _cli.stale_outputs_removed(str(out), ("results.json", "summary.md", "sweep.png", "partial.json")):
            (out / "partial.json").write_text("this run's")
            raise RuntimeError("flow task failed")
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt", "partial.json"]
    with _cli.stale_outputs_removed(str(out), ("kept.txt",)):
        pass  # (a run that finishes removes nothing)
    assert (out / "kept.txt").exists()
    # (a rerun refused before it wrote anything -- a flag that disagrees with the checkpoints there --
    # deleted the earlier run's results, which still described what --out held)
    for error in (SystemExit("--lr differs from the checkpoints'"), ValueError("the network failed to build")):
        with pytest.raises(type(error)):
            with _cli.stale_outputs_removed(str(out), ("kept.txt",)):
                raise error
        assert (out / "kept.txt").read_text() == "an earlier run's"

    (out / "partial.json").write_text(json.dumps({"config": {}, "digits": {}}))
    with pytest.raises(SystemExit, match=r"--from_results .* has no flow results"):
        optimizers.main(["--from_results", str(out / "partial.json"), "--out", str(tmp_path / "redraw")])
    with pytest.raises(SystemExit, match=r"--n_val \+ --n_test must be <= 364"):
        inverse.validate(_cli.parse(inverse.Config, ["--n_val", "300", "--n_test", "100"]))
    assert set(inverse.OUTPUTS) >= {f"{t}.png" for t in inverse.tasks(__import__("jax").random.key(0))}


def test_help_shows_what_each_flag_means(capsys):
    """--help showed only "default: X"; the meaning of each flag was in a source comment."""
    toy2d = _toy2d()
    import optimizers

    with pytest.raises(SystemExit):
        toy2d.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "EMA decay of the sampled parameters (0 disables); default: 0.99" in text
    assert "steps of fixed-step solvers; default: 50" in text
    with pytest.raises(SystemExit):
        optimizers.parse_config(["--help"])
    assert "loss within 10% of the best; default: 0.1" in " ".join(capsys.readouterr().out.split())


def test_toy2d_metrics_measure_what_they_name(tmp_path, monkeypatch):
    """metrics.json: w2 / nfe of the --solver samples against the data, w2_<eval_solver> /
    nfe_<eval_solver> of the adaptive solver's, w2_data_floor of two independent data draws,
    train_steps_per_s = steps / training wall time, final_loss the mean of the last 100 losses; the
    samples come from the EMA parameters (--ema), or the raw ones with --ema 0."""
    import jax

    import genflow as gf

    toy2d = _toy2d()
    seen = {"sample": {}, "w2": [], "model_fn": []}
    real_sample, real_w2, real_fit, real_model_fn = gf.sample, gf.metrics.w2_exact, gf.train.fit, gf.nets.model_fn

    def sample(*a, **kw):
        out = real_sample(*a, **kw)
        seen["sample"][kw["solver"]] = out  # the last call: the timed one
        return out

    def w2(a, b):
        r = real_w2(a, b)
        seen["w2"].append((a, b, r))
        return r

    def fit(*a, **kw):
        state, hist = real_fit(*a, **kw)
        seen["state"], seen["hist"] = state, hist
        return state, hist

    def model_fn(model, params):
        seen["model_fn"].append(params)
        return real_model_fn(model, params)

    monkeypatch.setattr(toy2d.gf, "sample", sample)
    monkeypatch.setattr(toy2d.gf.metrics, "w2_exact", w2)
    monkeypatch.setattr(toy2d.gf.train, "fit", fit)
    monkeypatch.setattr(toy2d.gf.nets, "model_fn", model_fn)
    args = ["--steps", "150", "--n_eval", "64", "--sample_steps", "4", "--chunk", "50", "--progress", "false",
            "--hidden", "16", "--depth", "1"]
    m = toy2d.run(toy2d.parse_config(args + ["--out", str(tmp_path / "a")]))
    (x_fix, info_fix), (x_ad, info_ad) = seen["sample"]["heun"], seen["sample"]["tsit5"]
    by_first = {id(a): (b, r) for a, b, r in seen["w2"]}
    data = seen["w2"][0][1]
    assert id(x_fix) in by_first and id(x_ad) in by_first  # both solvers' samples are measured
    assert by_first[id(x_fix)][0] is data and by_first[id(x_fix)][1] == m["w2"] and m["nfe"] == int(info_fix.nfe)
    assert by_first[id(x_ad)][0] is data and by_first[id(x_ad)][1] == m["w2_tsit5"]
    assert m["nfe_tsit5"] == int(info_ad.nfe)
    assert m["nfe_tsit5"] != m["nfe"]  # (adaptive: not the fixed 2 x 4)
    (fresh, b, r), = [c for c in seen["w2"] if id(c[0]) not in (id(x_fix), id(x_ad))]
    assert b is data and r == m["w2_data_floor"] and not np.array_equal(np.asarray(fresh), np.asarray(data))
    assert m["w2_data_floor"] > 0
    hist = seen["hist"]
    np.testing.assert_allclose(m["train_steps_per_s"], 150 / hist["wall_time"], rtol=1e-12)
    np.testing.assert_allclose(m["final_loss"], np.mean(np.asarray(hist["loss"])[-100:]), rtol=1e-6)
    assert not np.isclose(np.mean(np.asarray(hist["loss"])[:100]), m["final_loss"], rtol=1e-6)
    state = seen["state"]
    ema = state.ema[gf.train.ema_key(0.99)]
    chex_eq = lambda p, q: all(np.array_equal(np.asarray(u), np.asarray(v))  # noqa: E731
                               for u, v in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)))
    assert not chex_eq(ema, state.params)
    assert seen["model_fn"] and all(chex_eq(p, ema) for p in seen["model_fn"])
    seen["model_fn"].clear()
    toy2d.run(toy2d.parse_config(args + ["--ema", "0", "--out", str(tmp_path / "b")]))
    assert seen["model_fn"] and all(chex_eq(p, seen["state"].params) for p in seen["model_fn"])


def test_toy2d_refuses_an_ema_decay_of_one():
    """--ema must be in [0, 1): a decay of 1 never moves the EMA, which would sample the init."""
    toy2d = _toy2d()
    with pytest.raises(SystemExit, match=r"--ema must be in \[0, 1\)"):
        toy2d.validate(toy2d.parse_config(["--ema", "1"]))
