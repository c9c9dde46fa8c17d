"""experiments/density.py end to end (--quick): every model trains, is evaluated, the plots and the
table are written, and the likelihoods reach measured bars."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_density_quick_end_to_end(tmp_path):
    out = tmp_path / "density"
    cmd = [sys.executable, str(ROOT / "experiments" / "density.py"), "--quick", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=900)
    for name in ("density_2d.png", "samples_2d.png", "samples_digits.png"):
        assert (out / name).stat().st_size > 10_000, name
    res = json.loads((out / "results.json").read_text())
    assert "| glow |" in (out / "results.md").read_text()
    two, digits = res["2d"], res["digits"]
    for name in ("glow", "ebflow", "ffjord", "fm"):
        assert two[name]["sec_per_step"] > 0 and digits[name]["sec_per_step"] > 0
    # measured with --quick: gaussian NLL_2D_GAUSS nats, every model below it
    for name in ("glow", "ebflow", "ffjord", "fm"):
        assert two[name]["nll"] < two["gaussian"]["nll"] - 0.1, (name, two)
    # digits (bits/dim, uniform dequantization): measured DIGITS_MEASURED
    for name in ("glow", "fm"):
        assert digits[name]["bpd"] < digits["gaussian"]["bpd"], (name, digits)


def test_density_rejects_bad_config(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "density.py"), "--models", "glow,nope", "--out",
                        str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "--models must be" in r.stderr
