import os
import subprocess
import sys

import pytest

from ctxd_jax.envs import check_context, default_args, get_env
from ctxd_jax.rewards import RewardError, score

# A verifiers environment module as its author writes it, outside the repository: its own dataset built in code, a sync
# and an async reward function (tests/test_tasks.py runs it from the command line).
HALVES = '''import asyncio

import verifiers as vf
from datasets import Dataset


def exact(completion, answer, parser) -> float:
    return float(parser.parse_answer(completion).strip() == answer)


async def short(completion, info) -> float:
    await asyncio.sleep(0)
    return float(len(completion[-1]["content"]) <= info["limit"])


def load_environment(num_train: int = 6, limit: int = 8, broken: bool = False):
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i), "info": {"limit": limit, "hint": f"{i}+{i}"}}
            for i in range(num_train + 2)]
    parser = vf.Parser()
    funcs = [exact, short] + ([lambda completion: 1 / 0] if broken else [])
    rubric = vf.Rubric(funcs=funcs, weights=[1.0, 0.5] + [1.0] * broken, parser=parser)
    return vf.SingleTurnEnv(dataset=Dataset.from_list(rows[:num_train]), eval_dataset=Dataset.from_list(rows[-2:]),
                            system_prompt="Answer with a number.", parser=parser, rubric=rubric)
'''
CHAT = '''import verifiers as vf
from datasets import Dataset


class Chat(vf.MultiTurnEnv):
    async def env_response(self, messages, state, **kwargs):
        return [{"role": "user", "content": "go on"}]


def load_environment():
    return Chat(dataset=Dataset.from_list([{"question": "hi", "answer": "x"}]), max_turns=3)
'''


def classic_verifiers() -> str:
    """The folder that holds the `verifiers` library (for a subprocess's PYTHONPATH); skips the test without it."""
    vf = pytest.importorskip("verifiers")
    if not hasattr(vf, "SingleTurnEnv"):
        pytest.skip(f"verifiers {vf.__version__} has no classic API (SingleTurnEnv)")
    return os.path.dirname(os.path.dirname(vf.__file__))


@pytest.fixture
def modules(tmp_path, monkeypatch):
    classic_verifiers()
    (tmp_path / "halves_env.py").write_text(HALVES)
    (tmp_path / "chat_env.py").write_text(CHAT)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("halves_env", "chat_env"):
        sys.modules.pop(name, None)


def test_single_turn_environment_loads_and_scores(modules):
    assert default_args("verifiers:halves-env") == {"num_train": (6, int), "limit": (8, int), "broken": (False, bool)}
    env = get_env("verifiers:halves-env", num_train=4, context_key="info.hint")
    train, ev = env.examples("train"), env.examples("eval")
    assert (len(train), len(ev)) == (4, 2) and env.verifier == "rubric 1*exact + 0.5*short"
    ex = train[3]
    assert ex.messages == ({"role": "system", "content": "Answer with a number."},
                           {"role": "user", "content": "What is 3 plus 3?"})
    assert ex.context == "3+3" and ev[0].messages[-1]["content"] == "What is 4 plus 4?"
    assert env.reward(ex, "6") == 1.5  # both: sync exact (through the parser) and async short (from info)
    assert env.reward(ex, " 6 \n") == 1.5 and env.reward(ex, "the answer is 6") == 0.0
    assert env.reward(ex, "5") == 0.5
    check_context("Hint: {answer}", env)


def test_context_key_must_name_a_column(modules):
    with pytest.raises(ValueError, match=r"^env.verifiers.context_key: 'verifiers:halves-env' train row 1 has no "
                                         r"'solution' \(columns: question, answer, info, example_id, prompt\)$"):
        get_env("verifiers:halves-env", context_key="solution")


def test_multi_turn_environment_is_refused(modules):
    with pytest.raises(ValueError, match=r"^env.name: 'verifiers:chat-env' is a Chat; only single-turn"):
        get_env("verifiers:chat-env")


def test_a_reward_function_that_raises_is_not_a_silent_zero(modules):
    env = get_env("verifiers:halves-env", broken=True)
    ex = env.examples("train")[0]
    assert score(env, ex, "0", "zero") == (0.0, True)
    with pytest.raises(RewardError, match="halves-env/train/0' raised ZeroDivisionError"):
        score(env, ex, "0")


def test_a_missing_module_is_named(modules):
    with pytest.raises(ValueError, match=r"^env.name: cannot import 'no_such_env' for verifiers:no-such-env"):
        default_args("verifiers:no-such-env")


def test_dry_run_and_refusal_from_the_command_line(tmp_path, modules):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(tmp_path), classic_verifiers()]))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "ctxd_jax.train", "--config=configs/demo.py", *args, "--dry_run"],
                              cwd=root, capture_output=True, text=True, timeout=300, env=env)

    r = run("--config.env.name=verifiers:halves-env", "--config.env.args.num_train=5",
            "--config.env.verifiers.context_key=answer", "--config.teacher.context=The answer is {context}.")
    assert r.returncode == 0, r.stderr
    assert "num_train: 5" in r.stdout and "context_key: answer" in r.stdout
    assert "task: 5 train and 2 eval examples; verifier: rubric 1*exact + 0.5*short" in r.stdout
    student, teacher = r.stdout.split("student prompt of example 'halves-env/train/0':")[1].split("teacher prompt")
    assert "[system] Answer with a number.\n  [user] What is 0 plus 0?" in student and "answer is" not in student
    assert "[system] The answer is 0.\n  [user] What is 0 plus 0?" in teacher
    r = run("--config.env.name=verifiers:chat-env")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: env.name: 'verifiers:chat-env' is a Chat; only single-turn environments without tools "
        "(verifiers.SingleTurnEnv) can be trained here"]
