"""experiments/optimizers.py --quick end to end: it trains both tasks over a learning-rate grid,
writes its plot, table and JSON, and reaches measured quality bars."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_optimizers_experiment_quick(tmp_path):
    out = tmp_path / "opt"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "optimizers.py"), "--quick", "true", "--out", str(out)],
                   check=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert (out / "sweep.png").stat().st_size > 20_000
    assert "| momo |" in (out / "summary.md").read_text()
    res = json.loads((out / "results.json").read_text())
    for name in ("sgd_m", "momo"):
        d, f = res["digits"][name], res["flow"][name]
        assert len(d["lrs"]) == 5 and d["lrs"][0] == 1e-3 and abs(d["lrs"][-1] - 10.0) < 1e-9
        # measured (quick): best test accuracy 0.967 (SGD-M), 0.973 (MoMo); best W2 0.47 (data floor 0.27, n=256)
        assert d["flat_acc"]["best"] >= 0.9, (name, d["flat_acc"])
        assert f["flat_w2"]["best"] <= 0.8, (name, f["flat_w2"])
        assert 0.0 <= d["flat_acc"]["width_decades"] <= 4.0
    # MoMo's Polyak cap: no MoMo run diverged on digits, even at lr = 10
    assert not any(res["digits"]["momo"]["diverged"])


def test_optimizers_experiment_rejects_bad_config(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "optimizers.py"), "--optimizers", "adam,nope",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "--optimizers must be a comma list" in r.stderr
