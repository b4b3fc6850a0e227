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


def test_render_context_template():
    from ctxd_jax.envs import render_context

    ex = Example("r7", ({"role": "user", "content": "q"},), {"solution": "x = 2", "n": 3}, context="own hint")
    assert render_context("Reference solution:\n{solution}", ex) == "Reference solution:\nx = 2"
    assert render_context("{context} / {n} / {{solution}} and {{}}", ex) == "own hint / 3 / {solution} and {}"
    # no placeholder: as it is (a JSON brace or a doubled one stays); empty: the example's own context
    assert render_context('Reply as {"a": 1} {{x}}', ex) == 'Reply as {"a": 1} {{x}}'
    assert render_context("", ex) == "own hint" and render_context(None, ex) == "own hint"
    assert render_context("", Example("y", (), {})) == ""
    with pytest.raises(ValueError, match=r"teacher.context: \{answer\} is not a field of example 'r7' "
                                         r"\(fields: n, solution\)"):
        render_context("{answer}", ex)
    # demo turns still parse after rendering
    demo = render_context("Rule {n}.\n<<user>>\nQ\n<<assistant>>\n{solution}", ex)
    assert parse_context(demo)[-1] == {"role": "assistant", "content": "x = 2"}


def test_check_context_names_the_missing_field():
    from ctxd_jax.envs import check_context

    env = get_env("ahoy")
    check_context("Rule about {question}", env)
    with pytest.raises(ValueError, match=r"\{solution\} is not a field of example 'ahoy-train-0'"):
        check_context("{solution}", env)
    with pytest.raises(ValueError, match=r"\{context\} but the train examples have no context"):
        check_context("Hint: {context}", env)


def test_student_never_sees_the_example_context(tmp_path):
    from transformers import AutoTokenizer

    from ctxd_jax.inference.teacher import render_prompt, teacher_prompt_ids
    from ctxd_jax.tiny import write_tiny_checkpoint

    tok = AutoTokenizer.from_pretrained(write_tiny_checkpoint(str(tmp_path), "qwen3"))
    secret = "SECRET SOLUTION 42"
    ex = Example("s", ({"role": "user", "content": "What is it?"},), {"solution": secret}, context=secret)
    secret_ids = tok.encode(" " + secret, add_special_tokens=False)[1:]  # the context's tokens, past its first

    def has(ids):
        return any(ids[i:i + len(secret_ids)] == secret_ids for i in range(len(ids)))

    student = render_prompt(tok, ex.messages)
    assert not has(student)
    for template in ("", "{context}", "Solution: {solution}"):
        teacher = teacher_prompt_ids(tok, Environment(), ex, template, student)
        assert has(teacher) and teacher != student
    assert teacher_prompt_ids(tok, Environment(), Example("n", ex.messages, {}), "", student) == student
