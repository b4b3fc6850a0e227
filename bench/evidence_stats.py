"""The measures of bench/evidence.py's table, as pure functions of a run's curve (a list of per-step points with
"step", "seconds", "tokens", "eval", "completion_len") so they can be checked on hand-made numbers.

- a run's score is the mean of its last LAST_EVALS evals (one eval is a noisy reading);
- a cell's score is the mean over its seeds with a 95 % confidence interval from Student's t;
- "reached 90 % of the teacher" is the first eval from which every later eval stays at or above the line (a curve
  that touches the line and falls back has not reached it);
- the lr sweep picks, per task and arm, the lr whose run scores highest on the tuning seed.
"""

import math
import statistics

from scipy import stats

LAST_EVALS = 3
CONFIDENCE = 0.95


def evals(curve: list[dict]) -> list[dict]:
    return [p for p in curve if p.get("eval") is not None]


def run_score(curve: list[dict], last: int = LAST_EVALS) -> float:
    """Mean eval reward of the run's last `last` evals."""
    points = evals(curve)
    if not points:
        raise ValueError("run_score: the run has no eval")
    return statistics.fmean(p["eval"] for p in points[-last:])


def mean_ci(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float | None]:
    """(mean, half-width of its t confidence interval); the half-width is None for a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    t = stats.t.ppf(0.5 + confidence / 2, len(values) - 1)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def reach_and_stay(curve: list[dict], target: float) -> dict | None:
    """The eval point (step, seconds, tokens) from which every eval is >= target, None if the last one is below."""
    points = evals(curve)
    hit = None
    for p in points:
        if p["eval"] < target:
            hit = None
        elif hit is None:
            hit = p
    return None if hit is None else {k: hit[k] for k in ("step", "seconds", "tokens")}


def length_curve(curve: list[dict]) -> list[tuple[int, float]]:
    """(step, mean completion length of the step's samples) over training."""
    return [(p["step"], p["completion_len"]) for p in curve if p.get("completion_len") is not None]


def best_lr(sweep: dict[float, list[dict]]) -> float:
    """The lr (of {lr: curve} on the tuning seed) whose run scores highest; ties go to the smaller lr."""
    if not sweep:
        raise ValueError("best_lr: no sweep runs")
    return max(sorted(sweep), key=lambda lr: (run_score(sweep[lr]), -lr))
