import numpy as np
import pytest

from ctxd_jax.envs import Environment, Example
from ctxd_jax.rewards import RewardError, problem, score

EX = Example("ex-3", ({"role": "user", "content": "q"},), {})


class Returns(Environment):
    def __init__(self, value):
        self.value = value

    def reward(self, example, completion_text):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


@pytest.mark.parametrize("value", [1, 0.5, np.float32(0.25), np.int64(2), -3.0])
def test_finite_numbers_pass(value):
    assert score(Returns(value), EX, "t") == (float(value), False)
    assert problem(value) is None


@pytest.mark.parametrize("value, why", [
    (float("nan"), "is nan (not a finite number)"), (float("inf"), "is inf (not a finite number)"),
    (True, "is True (a bool, not a number)"), (np.bool_(False), "(a bool, not a number)"),
    ("1.0", "is '1.0' (a str, not a number)"), (None, "is None (a NoneType, not a number)"),
    (np.array([1.0]), "(a ndarray, not a number)"),
    (ZeroDivisionError("division by zero\nline two"), "raised ZeroDivisionError: division by zero line two"),
])
def test_bad_rewards_stop_with_one_line_or_score_zero(value, why):
    with pytest.raises(RewardError) as e:
        score(Returns(value), EX, "t")
    message = str(e.value)
    assert "\n" not in message and "example 'ex-3'" in message and why in message
    assert message.startswith("env.reward_errors: ") and "reward_errors=zero" in message
    assert score(Returns(value), EX, "t", mode="zero") == (0.0, True)
