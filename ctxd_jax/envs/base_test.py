import pytest

from ctxd_jax.envs import Example, env_names, get_env, parse_context
from ctxd_jax.envs.base import Environment, LazyExamples, format_context


def test_parse_context_plain_string_is_one_system_message():
    assert parse_context("  Be brief.\n") == [{"role": "system", "content": "Be brief."}]
    assert parse_context("") == []


def test_parse_context_demo_turns_roundtrip():
    ctx = format_context("Rule.", [("Q1", "A1"), ("Q2", "A2\nsecond line")])
    assert ctx == "Rule.\n<<user>>\nQ1\n<<assistant>>\nA1\n<<user>>\nQ2\n<<assistant>>\nA2\nsecond line"
    assert parse_context(ctx) == [
        {"role": "system", "content": "Rule."},
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2\nsecond line"},
    ]
    # markers only count on their own line
    assert parse_context("say <<user>> here") == [{"role": "system", "content": "say <<user>> here"}]
    assert parse_context("<<user>>\nhi")[0] == {"role": "user", "content": "hi"}


def test_default_teacher_messages_replace_system():
    ex = Example("x", ({"role": "system", "content": "student sys"}, {"role": "user", "content": "q"}), {})
    env = Environment()
    assert env.teacher_messages(ex, "ctx") == [{"role": "system", "content": "ctx"}, {"role": "user", "content": "q"}]
    no_sys = Example("y", ({"role": "user", "content": "q"},), {})
    assert env.teacher_messages(no_sys, "ctx\n<<user>>\nd\n<<assistant>>\na")[-1] == {"role": "user", "content": "q"}


def test_lazy_examples():
    made = []
    seq = LazyExamples(5, lambda i: made.append(i) or Example(str(i), (), {}))
    assert len(seq) == 5 and made == []
    assert seq[-1].id == "4" and seq[4] is seq[-1] and made == [4]
    assert [e.id for e in seq[1:3]] == ["1", "2"]
    assert [e.id for e in seq] == ["0", "1", "2", "3", "4"]
    with pytest.raises(IndexError):
        seq[5]


def test_registry():
    assert {"sokoban", "ahoy", "cheers", "caps"} <= set(env_names())
    with pytest.raises(ValueError, match="unknown environment 'nope'.*sokoban"):
        get_env("nope")
    with pytest.raises(ValueError, match="split"):
        get_env("ahoy").examples("test")
