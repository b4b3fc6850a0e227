import pytest

from ctxd_jax.timeline import Timeline, intersection, union


def test_union_clips_and_merges():
    assert union([(5, 7), (0, 2), (1, 3), (9, 20)], 1.5, 10) == [(1.5, 3), (5, 7), (9, 10)]
    assert union([(0, 1)], 2, 3) == []


def test_intersection_of_disjoint_sets():
    assert intersection([(0, 2), (4, 6)], [(1, 5)]) == 2
    assert intersection([(0, 1)], [(1, 2)]) == 0


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_busy_splits_a_window_into_server_trainer_both_neither():
    clock = Clock()
    tl = Timeline(clock)
    with tl.span("server"):  # 0..6
        clock.t = 2
        with tl.span("trainer"):  # 2..4
            clock.t = 4
        clock.t = 6
    clock.t = 8
    with tl.span("trainer"):  # 8..9
        clock.t = 9
    clock.t = 10
    assert tl.busy(1, 10) == {"busy/server": 5, "busy/trainer": 3, "busy/both": 2, "busy/neither": 3}


def test_open_spans_count_until_now_and_old_spans_are_forgotten():
    clock = Clock()
    tl = Timeline(clock)
    with tl.span("trainer"):
        clock.t = 1
    spans = tl.span("server")
    spans.__enter__()
    clock.t = 5
    assert tl.busy(2, 5)["busy/server"] == pytest.approx(5 - 2)
    assert tl.busy(2, 5)["busy/trainer"] == 0
    assert len(tl._spans["trainer"]) == 0  # ended before the window: forgotten
    spans.__exit__(None, None, None)
