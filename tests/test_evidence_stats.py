import pytest

from bench.evidence_stats import best_lr, length_curve, mean_ci, reach_and_stay, run_score


def curve(evals, lens=None):
    return [{"step": i + 1, "seconds": 10.0 * (i + 1), "tokens": 100.0 * (i + 1), "eval": e,
             "completion_len": None if lens is None else lens[i]} for i, e in enumerate(evals)]


def test_run_score_is_the_mean_of_the_last_three_evals():
    assert run_score(curve([0.1, 0.2, None, 0.95, 0.6, 0.85])) == pytest.approx((0.95 + 0.6 + 0.85) / 3)
    assert run_score(curve([0.4])) == 0.4
    with pytest.raises(ValueError, match="no eval"):
        run_score(curve([None, None]))


def test_mean_ci_uses_students_t():
    mean, half = mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2) = 4.3027
    assert mean_ci([0.3]) == (0.3, None)


def test_reaching_90_percent_means_staying_there():
    target = 0.9 * 0.5
    assert reach_and_stay(curve([0.2, 0.5, 0.3, 0.46, 0.5]), target) == {"step": 4, "seconds": 40.0, "tokens": 400.0}
    assert reach_and_stay(curve([0.2, 0.5, 0.5, 0.3]), target) is None  # touched the line and fell back
    assert reach_and_stay(curve([0.5, None, 0.5]), target)["step"] == 1  # steps without eval do not count


def test_length_curve_and_sweep_choice():
    assert length_curve(curve([0.1, None], lens=[89.0, 12.5])) == [(1, 89.0), (2, 12.5)]
    sweep = {1e-4: curve([0.1, 0.2, 0.3]), 1e-3: curve([0.2, 0.6, 0.5]), 3e-3: curve([0.9, 0.2, 0.1])}
    assert best_lr(sweep) == 1e-3
    assert best_lr({3e-3: curve([0.4]), 1e-3: curve([0.4])}) == 1e-3  # a tie goes to the smaller lr
