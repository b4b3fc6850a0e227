"""The learning-rate sweep of bench/evidence.py: one command per lr on the tuning seed (not in the final table), each
into its own folder; this reads their results.json files and prints, per task and arm, every lr's score (the mean of
its last 3 evals) and the chosen lr, then the --lr flag of the final command (one lr per arm: where tasks disagree,
the lr with the best mean score over the tasks).

    for lr in 3e-4 1e-3 3e-3; do python bench/evidence.py --first_seed=7 --seeds=1 --set=optim.lr=$lr \\
        --out=sweep/lr$lr ...; done
    python bench/evidence_sweep.py sweep/lr*/results.json
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evidence_stats import best_lr, run_score  # noqa: E402


def sweep_cells(results: list[dict]) -> dict[tuple[str, str], dict[float, list[dict]]]:
    """{(task, method): {lr: curve}} of finished runs; a file's lr is its --set optim.lr."""
    cells = {}
    for res in results:
        lr = float(res["args"]["set"]["optim.lr"])
        for run in res["runs"]:
            if "error" not in run:
                cells.setdefault((run["task"], run["method"]), {})[lr] = run["curve"]
    return cells


def choose(cells) -> dict[str, float]:
    """One lr per method: the best mean score over its tasks."""
    by_method = {}
    for (task, method), sweep in cells.items():
        for lr, curve in sweep.items():
            by_method.setdefault(method, {}).setdefault(lr, []).append(run_score(curve))
    return {m: max(sorted(lrs), key=lambda lr: (statistics.fmean(lrs[lr]), -lr)) for m, lrs in by_method.items()}


def main(paths):
    results = []
    for p in paths:
        with open(p) as f:
            results.append(json.load(f))
    cells = sweep_cells(results)
    print("| task | arm | lr: score | chosen |\n|---|---|---|---|")
    for (task, method), sweep in sorted(cells.items()):
        scores = ", ".join(f"{lr:g}: {run_score(c):.3f}" for lr, c in sorted(sweep.items()))
        print(f"| {task} | {method} | {scores} | {best_lr(sweep):g} |")
    print("--lr=" + ",".join(f"{m}={lr:g}" for m, lr in choose(cells).items()))


if __name__ == "__main__":
    main(sys.argv[1:])
