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


# The degenerate answers that passed the form-only guide, and answers that are right.
DEGENERATE = ("Spain.", "Capital.", "Spain is nice. " + "blah " * 80, "Spain is nice. " + "blah " * 80 + "Madrid.",
              "Madrid.", "The capital is Barcelona.")


def test_degenerate_or_wrong_answers_earn_nothing():
    env = get_env("tutor")
    ex = next(e for e in env.examples("train") + env.examples("eval")
              if e.data["question"] == "What is the capital of Spain?")
    for answer in DEGENERATE:
        assert env.reward(ex, answer) == 0.0, answer
    assert env.reward(ex, "The capital of Spain is Madrid.") == 1.0
    assert env.reward(ex, "Spain has Madrid as its capital. It is a big city.") == 1.0
    assert follows_guide("How many continents are there?", "There are seven continents on Earth.")
    assert not follows_guide("How many continents are there?", "There are six continents on Earth.")
    assert follows_guide("What is the capital of Argentina?", "The capital is Buenos Aires.")
    assert not follows_guide("What is the capital of Argentina?", "The capital is Buenos Dias.")


def test_every_fact_is_a_question_of_the_task():
    from ctxd_jax.envs.questions import all_questions
    from ctxd_jax.envs.tutor import FACTS

    assert set(FACTS) <= set(all_questions())
