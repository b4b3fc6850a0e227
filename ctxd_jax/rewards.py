"""Task rewards, checked: a reward function that raises, or returns anything but a real finite number (a bool, a
numeric string, NaN, inf, None), never becomes a silent 0 or a traceback wall.

`env.reward_errors` says what such a sample does: 'stop' ends the run with one line naming the example and the value
(the checkpoints saved so far are kept; resume once the reward is fixed), 'zero' scores it 0 and counts it in the
step's `reward/errors` metric.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

REWARD_ERRORS = ("stop", "zero")  # env.reward_errors


class RewardError(RuntimeError):
    """A reward that is not a finite number, with env.reward_errors='stop'; str() is one line."""


def problem(value) -> str | None:
    """Why `value` is not a usable reward, or None when it is one."""
    if isinstance(value, (bool, np.bool_)):
        return "a bool, not a number"
    if not isinstance(value, numbers.Real):
        return f"a {type(value).__name__}, not a number"
    if not math.isfinite(float(value)):
        return "not a finite number"
    return None


def score(env, example, completion_text: str, mode: str = "stop") -> tuple[float, bool]:
    """(reward, whether it failed): `env.reward(example, completion_text)` as a float; a failure raises RewardError
    (mode 'stop') or scores 0.0 (mode 'zero')."""
    try:
        value = env.reward(example, completion_text)
    except Exception as e:  # any bug of a user's reward function
        why = f"raised {type(e).__name__}: {e}"
    else:
        why = problem(value)
        if why is None:
            return float(value), False
        why = f"is {value!r} ({why})"
    if mode == "zero":
        return 0.0, True
    why = " ".join(why.split())[:300]
    raise RewardError(f"env.reward_errors: the reward of example {example.id!r} {why}; the run stopped with its "
                      "checkpoints kept: fix the reward function, or set --config.env.reward_errors=zero to score "
                      "such samples 0")
