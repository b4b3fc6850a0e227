"""The report's arithmetic on a hand-made results.json (no servers: bench/evidence.py's measurement is not timed
here)."""

from bench.evidence_report import summarize, table


def run(method, evals, before=-2.0, after=-2.5):
    curve = [{"step": i + 1, "seconds": 10.0 * (i + 1), "tokens": 64.0 * (i + 1), "eval": r, "reward": r}
             for i, r in enumerate(evals)]
    return {"task": "t", "method": method, "seed": 42, "curve": curve, "base_answers_before": before,
            "base_answers_after": after, "teacher_answers_before": -3.0, "teacher_answers_after": -2.0}


def test_reaching_90_percent_gap_and_loglik_changes():
    results = {"tasks": {"t": {"student": {"reward": 0.2}, "teacher": {"reward": 0.6}}},
               "runs": [run("fast", [0.3, 0.55, 0.6]), run("slow", [0.2, 0.3, 0.4]),
                        {"task": "t", "method": "broken", "seed": 42, "error": "boom"}]}
    rows = {r["method"]: r for r in summarize(results)}
    assert set(rows) == {"fast", "slow"}
    fast, slow = rows["fast"], rows["slow"]
    assert (fast["to90_steps"], fast["to90_s"]) == (2, 20.0)  # 0.55 >= 0.9 * 0.6
    assert slow["to90_steps"] is None
    assert abs(fast["gap_closed"] - 1.0) < 1e-9 and abs(slow["gap_closed"] - 0.5) < 1e-9
    assert abs(fast["forget"] + 0.5) < 1e-9 and abs(fast["fidelity"] - 1.0) < 1e-9
    assert fast["tokens"] == 192.0
    text = table(list(rows.values()))
    assert "| t | slow | 1 | 0.20 → 0.60 | 0.40 | 0.50 | - | - |" in text
