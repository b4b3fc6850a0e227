"""bench/evidence_sweep.py's choice on hand-made sweep files."""

from bench.evidence_sweep import choose, sweep_cells


def result(lr, scores):
    runs = [{"task": t, "method": m, "seed": 7, "curve": [{"step": 1, "eval": v}]} for (t, m), v in scores.items()]
    return {"args": {"set": {"optim.lr": lr}}, "runs": runs + [{"task": "a", "method": "rl", "seed": 7, "error": "x"}]}


def test_each_arm_gets_the_lr_that_scores_best_over_its_tasks():
    files = [result(1e-3, {("a", "rl"): 0.2, ("b", "rl"): 0.4, ("a", "distill"): 0.5}),
             result(3e-3, {("a", "rl"): 0.5, ("b", "rl"): 0.3, ("a", "distill"): 0.1})]
    cells = sweep_cells(files)
    assert set(cells[("a", "rl")]) == {1e-3, 3e-3}
    assert choose(cells) == {"rl": 3e-3, "distill": 1e-3}
