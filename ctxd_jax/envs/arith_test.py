import pytest

from ctxd_jax.envs import Example, get_env, parse_context
from ctxd_jax.envs.arith import DEMOS, solve


def test_the_result_is_checked_and_degenerate_answers_fail():
    env = get_env("arith")
    ex = env.examples("eval")[0]
    a, b = (int(x) for x in ex.data["question"][8:-1].split(" + "))
    right = a + b
    assert ex.data["answer"] == right
    assert env.reward(ex, f"{a} + {b} = {right}. The answer is {right}.") == 1.0
    assert env.reward(ex, f"{right}") == 1.0
    for wrong in (f"The answer is {right + 1}.", f"{right} or maybe {right + 10}", "", "Spain.", "Capital.",
                  "Spain is nice. " + "blah " * 80, f"The answer is {right}. " + "blah " * 80 + "7"):
        assert env.reward(ex, wrong) == 0.0, wrong


def test_splits_are_disjoint_seeded_and_avoid_the_demos():
    env = get_env("arith", num_eval=50, num_train=200)
    ev, train = env.examples("eval"), env.examples("train")
    assert len(ev) == 50 and len(train) == 200
    qs = [e.data["question"] for e in ev + train]
    assert len(set(qs)) == len(qs) and not set(qs) & {q for q, _ in DEMOS}
    assert get_env("arith", num_eval=50, num_train=200).examples("eval") == ev
    assert get_env("arith", seed=1).examples("eval") != get_env("arith").examples("eval")
    mixed = get_env("arith", ops="+-*", num_train=300)
    assert {e.data["question"].split()[3] for e in mixed.examples("train")} == {"+", "-", "*"}


def test_teacher_context_demos_are_right_and_bad_arguments_are_named():
    env = get_env("arith")
    msgs = env.teacher_messages(env.examples("train")[0], env.default_context)
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert parse_context(env.default_context) == msgs[:-1]
    for q, a in DEMOS:
        x, op, y = q[8:-1].split()
        assert env.reward(Example("demo", (), {"answer": solve(int(x), op, int(y))}), a) == 1.0
    with pytest.raises(ValueError, match="env.ops"):
        get_env("arith", ops="/")
    with pytest.raises(ValueError, match=r"env.num_train: 96 \+ 9000 problems asked, only 78 distinct"):
        get_env("arith", low=1, high=9, num_train=9000)
