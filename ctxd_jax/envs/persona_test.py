from ctxd_jax.envs import get_env, parse_context
from ctxd_jax.envs.persona import DEMOS, STYLES


def test_verifiers():
    ahoy, cheers, caps = (get_env(n) for n in ("ahoy", "cheers", "caps"))
    ex = ahoy.examples("eval")[0]
    assert ahoy.reward(ex, "  Ahoy! The capital is Paris.") == 1.0
    assert ahoy.reward(ex, "ahoy there, the capital is Paris") == 1.0
    assert ahoy.reward(ex, "Well, ahoy!") == 0.0
    assert ahoy.reward(ex, "") == 0.0
    assert cheers.reward(ex, "It is Paris. Cheers!\n") == 1.0
    assert cheers.reward(ex, "Cheers! It is Paris.") == 0.0
    assert cheers.reward(ex, "It is Paris. cheers!") == 0.0
    assert caps.reward(ex, "THE CAPITAL IS PARIS, 1 CITY.") == 1.0
    assert caps.reward(ex, "THE CAPITAL IS Paris.") == 0.0
    assert caps.reward(ex, "OK!") == 0.0  # too few letters to tell
    assert caps.reward(ex, "") == 0.0


def test_splits_deterministic_disjoint_and_sized():
    for name in STYLES:
        env = get_env(name)
        train, ev = env.examples("train"), env.examples("eval")
        assert len(ev) == 96 and len(train) >= 128
        qs_train = {e.data["question"] for e in train}
        qs_eval = {e.data["question"] for e in ev}
        assert len(qs_train) == len(train) and len(qs_eval) == len(ev) and not qs_train & qs_eval
        assert not (qs_train | qs_eval) & {q for q, _ in DEMOS}
        assert get_env(name).examples("eval") == ev
        assert ev[0].messages == ({"role": "user", "content": ev[0].data["question"]},)
    assert get_env("ahoy", seed=1).examples("eval") != get_env("ahoy").examples("eval")
    assert len(get_env("ahoy", num_eval=64, num_train=10).examples("train")) == 10


def test_teacher_context_has_rule_and_three_demos_that_pass_the_verifier():
    for name in STYLES:
        env = get_env(name)
        ex = env.examples("train")[0]
        msgs = env.teacher_messages(ex, env.default_context)
        assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 + ["user"]
        assert msgs[-1] == ex.messages[0]
        assert all(env.reward(ex, m["content"]) == 1.0 for m in msgs if m["role"] == "assistant")
        assert parse_context(env.default_context) == msgs[:-1]


def test_degenerate_answers_earn_nothing_in_any_style():
    """A fragment or padding in the task's form: the persona verifiers check form, so content cannot be checked, but
    a completion that is no answer gets 0."""
    ex = get_env("ahoy").examples("eval")[0]
    padding = "Spain is nice. " + "blah " * 80
    for name, answers in {"ahoy": ("Ahoy! Spain.", "Ahoy! Capital.", "Ahoy! " + padding),
                          "cheers": ("Spain. Cheers!", "Capital. Cheers!", padding + "Cheers!"),
                          "caps": ("SPAIN.", "CAPITAL CITY.", padding.upper())}.items():
        env = get_env(name)
        for answer in answers:
            assert env.reward(ex, answer) == 0.0, (name, answer)
    assert get_env("caps").reward(ex, "THE CAPITAL OF SPAIN IS MADRID.") == 1.0
