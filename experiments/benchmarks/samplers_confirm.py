"""Which UniPC cell at NFE 20 and 50, chosen on seeds 1-12 and confirmed on fresh seeds 701-712.

The held-out run on seeds 601-612 (samplers_selected_seeds601-612.md) was the first with UniPC-3
(gf.sample's unipc with order=3) cells; its two optimized UniPC-3 cells differed by 10x at NFE 50
(optimized-hard 4.5e-5, optimized-global 4.2e-4, rms over all samples). Here the UniPC cells are
scored on the selection seeds 1-12, the one with the lowest rms over all their samples is chosen per
NFE, and the choice is run on seeds 701-712, which no run has used. Same problem, grids and
calibration as samplers.py (its functions).

    .venv/bin/python experiments/benchmarks/samplers_confirm.py     # ~12 min on 2 CPU cores

Other solvers' optimized cells on the selection seeds alone (no confirmation run; results in
samplers_confirm_selection_{solvers}_nfe{nfes}.md), e.g. DEIS in both forms and DPM-Solver++(3M)
at NFE 20 (~4 min):

    .venv/bin/python experiments/benchmarks/samplers_confirm.py --solvers deis deis-x0 dpm++3m --nfes 20 \
        --selection-only

With --confirmation-seeds (fresh ones: samplers.py's SEEN_SEEDS are refused) the cell chosen per NFE
is run there too (results in samplers_confirm_seeds{first}-{last}_{solvers}.md), e.g. the UniPC
variants at NFE 20 on 801-812 (~12 min):

    .venv/bin/python experiments/benchmarks/samplers_confirm.py --solvers unipc unipc-3 unipc-bh1 unipc-3-bh1 \
        --nfes 20 --confirmation-seeds $(seq 801 812)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import samplers as S  # noqa: E402
from _timing import markdown_table  # noqa: E402

SELECTION, CONFIRMATION = list(range(1, 13)), list(range(701, 713))
SCHEDULES = ("optimized-global", "optimized-hard")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--solvers", nargs="+", default=["unipc", "unipc-3"], help="samplers.py's table names")
    ap.add_argument("--nfes", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--selection-only", action="store_true", help="score on seeds 1-12, run no confirmation")
    ap.add_argument("--confirmation-seeds", type=int, nargs="+", default=CONFIRMATION,
                    help="fresh seeds for the chosen cells (other than 701-712: no run may have used them)")
    a = ap.parse_args()
    default_run = a.confirmation_seeds == CONFIRMATION
    if default_run and not a.selection_only and (a.solvers != ap.get_default("solvers")
                                                 or a.nfes != ap.get_default("nfes")):
        # (the default confirmation writes stop 47's UniPC result file)
        ap.error("--solvers / --nfes other than the defaults need --selection-only or --confirmation-seeds")
    if not default_run and (seen := sorted(set(a.confirmation_seeds) & (S.SEEN_SEEDS | set(SELECTION)))):
        ap.error(f"--confirmation-seeds {seen} were used before (samplers.py's SEEN_SEEDS): pick fresh ones")
    t_all = time.perf_counter()
    gm = S.mixture()
    nfes = tuple(a.nfes)
    grids, _ = S.optimize_all(gm, nfes, S.CALIBRATION_SEED, 200, solvers=tuple(a.solvers),
                              objectives=(("optimized-global", "global"), ("optimized-hard", "global")))
    confirmation = list(a.confirmation_seeds)
    seeds = SELECTION + ([] if a.selection_only else confirmation)
    refs = {("genflow", s): S.reference(gm, S.RHO_MAX * S.noise(s), S.RHO_MAX) for s in seeds}
    sel, chosen = {}, {}
    for solver in a.solvers:
        for sched in SCHEDULES:
            sel.update(S.run_genflow(gm, nfes, SELECTION, refs, grids, (solver,), (sched,)))
    for nfe in nfes:
        chosen[nfe] = min((k for k in sel if k[3] == nfe), key=lambda k: S.pooled_rms(sel[k]))
    chosen_text = ("Chosen (lowest rms over all samples of seeds 1-12): "
                   + "; ".join(f"NFE {n}: {k[1]} {k[2]}" for n, k in chosen.items()))
    selection = ["## Selection seeds 1-12", markdown_table(S.SEED_ROWS_HEADER, S.seed_rows(sel)), chosen_text]
    payload = {"selection": {"|".join(map(str, k)): v for k, v in sel.items()},
               "chosen": {str(n): list(k) for n, k in chosen.items()}}
    # (a run's title, command line and file-name tag, from its cells)
    cells = f"Optimized cells of {', '.join(a.solvers)} at NFE {', '.join(map(str, nfes))}"
    args = ["--solvers", *a.solvers, "--nfes", *map(str, nfes)]
    tag = "-".join(a.solvers).replace("+", "p")
    if a.selection_only:
        text = "\n\n".join([f"# {cells} on seeds 1-12 (selection only)", *selection,
                             f"Command: `.venv/bin/python experiments/benchmarks/samplers_confirm.py "
                             f"{' '.join(args)} --selection-only`"])
        S.write_results(f"samplers_confirm_selection_{tag}_nfe{'-'.join(map(str, nfes))}", text, payload, t_all)
        return
    conf = {}
    for nfe, (_, solver, sched, _) in chosen.items():
        conf.update(S.run_genflow(gm, (nfe,), confirmation, refs, grids, (solver,), (sched,)))
    span = f"{confirmation[0]}-{confirmation[-1]}"
    if default_run:
        title = "# UniPC cells at NFE 20 and 50: chosen on seeds 1-12, confirmed on fresh seeds 701-712"
        intro, command = [__doc__.split("\n\n")[1].replace("\n", " ")], ""
        name = "samplers_confirm_seeds701-712"
    else:
        title = f"# {cells}: chosen on seeds 1-12, confirmed on fresh seeds {span}"
        intro = []
        command = " " + " ".join([*args, "--confirmation-seeds", *map(str, confirmation)])
        name = f"samplers_confirm_seeds{span}_{tag}"
    text = "\n\n".join([
        title, *intro, *selection,
        f"## Confirmation seeds {span} (never run before)", markdown_table(S.SEED_ROWS_HEADER, S.seed_rows(conf)),
        f"Command: `.venv/bin/python experiments/benchmarks/samplers_confirm.py{command}`"])
    payload["confirmation"] = {"|".join(map(str, k)): v for k, v in conf.items()}
    S.write_results(name, text, payload, t_all)


if __name__ == "__main__":
    main()
