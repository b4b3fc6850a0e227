"""The report's arithmetic on a hand-made results.json (no servers: bench/evidence.py's measurement is not timed
here)."""

import statistics

from bench.evidence_report import summarize, table


def run(method, evals, before=-2.0, after=-2.5, task="t", seed=42):
    curve = [{"step": i + 1, "seconds": 10.0 * (i + 1), "tokens": 64.0 * (i + 1), "eval": r, "reward": r}
             for i, r in enumerate(evals)]
    return {"task": task, "method": method, "seed": seed, "curve": curve, "base_answers_before": before,
            "base_answers_after": after, "teacher_answers_before": -3.0, "teacher_answers_after": -2.0}


def test_reaching_90_percent_gap_and_loglik_changes():
    results = {"tasks": {"t": {"student": {"reward": 0.2}, "teacher": {"reward": 0.6}}},
               "runs": [run("fast", [0.3, 0.55, 0.6]), run("slow", [0.2, 0.3, 0.4]),
                        {"task": "t", "method": "broken", "seed": 42, "error": "boom"}]}
    rows = {r["method"]: r for r in summarize(results)}
    assert set(rows) == {"fast", "slow"}
    fast, slow = rows["fast"], rows["slow"]
    assert (fast["to90_steps"], fast["to90_s"]) == (2, 20.0)  # 0.55 >= 0.9 * 0.6, and stays
    assert slow["to90_steps"] is None
    # a run's final is the mean of its last three evals
    assert abs(fast["final"] - 1.45 / 3) < 1e-9 and abs(slow["gap_closed"] - 0.25) < 1e-9
    assert abs(fast["forget"] + 0.5) < 1e-9 and abs(fast["fidelity"] - 1.0) < 1e-9
    assert fast["tokens"] == 192.0
    text = table(list(rows.values()))
    assert "| t | slow | 1 | 0.20 → 0.60 | 0.30 | 0.25 | - | - |" in text


def test_rows_follow_the_tasks_then_the_methods_order_not_completion_order():
    base = {"student": {"reward": 0.2}, "teacher": {"reward": 0.6}}
    finished = [("u", "hybrid_topk", 42), ("t", "rl", 43), ("u", "custom", 42), ("t", "trainer_teacher", 42),
                ("u", "rl", 42), ("t", "distill", 42), ("t", "rl", 42), ("u", "distill", 42)]
    results = {"tasks": {"t": base, "u": base}, "runs": [run(m, [0.3], task=t, seed=s) for t, m, s in finished]}
    rows = summarize(results)
    assert [(r["task"], r["method"], r["seeds"]) for r in rows] == [
        ("t", "rl", 2), ("t", "distill", 1), ("t", "trainer_teacher", 1),
        ("u", "rl", 1), ("u", "distill", 1), ("u", "hybrid_topk", 1), ("u", "custom", 1)]  # unknown methods last


def test_spread_over_seeds_partial_reach_and_mean_curves(tmp_path):
    from bench.evidence_report import mean_curve, plot

    base = {"student": {"reward": 0.2}, "teacher": {"reward": 0.6}}
    results = {"tasks": {"t": base}, "runs": [run("m", [0.3, 0.6], seed=42), run("m", [0.3, 0.4], seed=43)]}
    (row,) = summarize(results)
    half = 12.7062 * statistics.stdev([0.45, 0.35]) / 2 ** 0.5  # t(0.975, 1 degree of freedom)
    assert abs(row["final_ci"] - half) < 1e-3 and row["reached"] == 1
    assert "| t | m | 2 | 0.20 → 0.60 | 0.40 ± 0.64 | 0.50 | - (1/2) | - (1/2) |" in table([row])
    curve = mean_curve(results["runs"], 0.2)  # step 0 (the untrained student), then the two evals
    assert [c[0] for c in curve] == [0, 1, 2] and abs(curve[2][3] - 0.5) < 1e-9
    assert abs(curve[2][5] - curve[2][3] - 12.7062 * 0.1) < 1e-3  # the band is the confidence interval
    assert plot(results, str(tmp_path)) == [str(tmp_path / "evidence_t.png")] and (tmp_path / "evidence_t.png").exists()
