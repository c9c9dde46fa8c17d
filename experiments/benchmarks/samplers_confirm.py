"""Which UniPC cell at NFE 20 and 50, chosen on seeds 1-12 and confirmed on fresh seeds 701-712.

The held-out run on seeds 601-612 (samplers_selected_seeds601-612.md) was the first with UniPC-3
(gf.sample's unipc with order=3) cells; its two optimized UniPC-3 cells differed by 10x at NFE 50
(optimized-hard 4.5e-5, optimized-global 4.2e-4, rms over all samples). Here the UniPC cells are
scored on the selection seeds 1-12, the one with the lowest rms over all their samples is chosen per
NFE, and the choice is run on seeds 701-712, which no run has used. Same problem, grids and
calibration as samplers.py (its functions).

    .venv/bin/python experiments/benchmarks/samplers_confirm.py     # ~8 min on 2 CPU cores
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import samplers as S  # noqa: E402
from _timing import markdown_table  # noqa: E402

SELECTION, CONFIRMATION = list(range(1, 13)), list(range(701, 713))
CELLS = [(s, o) for s in ("unipc", "unipc-3") for o in ("optimized-global", "optimized-hard")]


def main():
    t_all = time.perf_counter()
    gm = S.mixture()
    grids, _ = S.optimize_all(gm, (20, 50), S.CALIBRATION_SEED, 200, solvers=("unipc", "unipc-3"),
                              objectives=(("optimized-global", "global"), ("optimized-hard", "global")))
    refs = {("genflow", s): S.reference(gm, S.RHO_MAX * S.noise(s), S.RHO_MAX) for s in SELECTION + CONFIRMATION}
    sel, chosen = {}, {}
    for solver, sched in CELLS:
        sel.update(S.run_genflow(gm, (20, 50), SELECTION, refs, grids, (solver,), (sched,)))
    for nfe in (20, 50):
        best = min((k for k in sel if k[3] == nfe), key=lambda k: S.pooled_rms(sel[k]))
        chosen[nfe] = best
    conf = {}
    for nfe, (_, solver, sched, _) in chosen.items():
        conf.update(S.run_genflow(gm, (nfe,), CONFIRMATION, refs, grids, (solver,), (sched,)))
    text = "\n\n".join([
        "# UniPC cells at NFE 20 and 50: chosen on seeds 1-12, confirmed on fresh seeds 701-712",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "## Selection seeds 1-12", markdown_table(S.SEED_ROWS_HEADER, S.seed_rows(sel)),
        "Chosen (lowest rms over all samples of seeds 1-12): "
        + "; ".join(f"NFE {n}: {k[1]} {k[2]}" for n, k in chosen.items()),
        "## Confirmation seeds 701-712 (never run before)", markdown_table(S.SEED_ROWS_HEADER, S.seed_rows(conf)),
        "Command: `.venv/bin/python experiments/benchmarks/samplers_confirm.py`"])
    S.write_results("samplers_confirm_seeds701-712", text, {
        "selection": {"|".join(map(str, k)): v for k, v in sel.items()},
        "chosen": {str(n): list(k) for n, k in chosen.items()},
        "confirmation": {"|".join(map(str, k)): v for k, v in conf.items()}}, t_all)


if __name__ == "__main__":
    main()
