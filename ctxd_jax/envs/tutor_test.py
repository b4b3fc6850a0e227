from ctxd_jax.envs import get_env, parse_context
from ctxd_jax.envs.persona import DEMOS
from ctxd_jax.envs.tutor import DEMO_ANSWERS, GUIDE, follows_guide


def test_each_rule_can_fail_alone():
    q = "Why do cats purr?"
    assert follows_guide(q, "Cats purr when they are happy. They also purr to heal.")
    assert not follows_guide(q, "Many happy animals make a sound. Cats purr.")  # subject not in the first words
    assert not follows_guide(q, "Cats purr for many different reasons that scientists still study and debate today.")
    assert not follows_guide(q, "Cats purr when they are happy and")  # cut off: the first sentence never ends
    assert not follows_guide(q, "Cats purr about 25 times a second.")  # a digit
    assert not follows_guide(q, "Cats purr when happy.\n* They also purr to heal.")  # a list
    assert not follows_guide(q, "")


def test_subject_matches_plural_and_case():
    assert follows_guide("What does a horse eat?", "Horses eat hay and grass.")
    assert follows_guide("How do bees make honey?", "Honey comes from nectar.")


def test_teacher_context_is_the_guide_with_demos_that_follow_it():
    env = get_env("tutor")
    ex = env.examples("eval")[0]
    msgs = env.teacher_messages(ex, env.default_context)
    assert msgs[0] == {"role": "system", "content": GUIDE}
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert parse_context(env.default_context) == msgs[:-1]
    for (q, _), a in zip(DEMOS, DEMO_ANSWERS):
        assert follows_guide(q, a)
    assert env.reward(ex, "") == 0.0
    # The persona tasks' questions and splits: the same held-out prompts.
    assert [e.messages for e in env.examples("eval")] == [e.messages for e in get_env("ahoy").examples("eval")]
