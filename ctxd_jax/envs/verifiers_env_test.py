import os
import subprocess
import sys

import pytest

from ctxd_jax.envs import base, check_context, default_args, get_env
from ctxd_jax.rewards import RewardError, score

# A verifiers taskset as its author writes it (verifiers 0.4), outside the repository: its own dataset built in code,
# two rewards, one from the trace alone and one from the task's data too (tests/test_tasks.py runs it from the command
# line). A limit of 0 makes `short` divide by zero.
HALVES = '''import asyncio

import verifiers.v1 as vf
from datasets import Dataset


class HalvesData(vf.TaskData):
    answer: str
    info: dict


class HalvesTask(vf.Task[HalvesData]):
    @vf.reward
    async def exact(self, trace: vf.Trace) -> float:
        return float(trace.last_reply == self.data.answer)

    @vf.reward(weight=0.5)
    async def short(self, task: HalvesData, trace: vf.Trace) -> float:
        await asyncio.sleep(0)
        return float(len(trace.last_reply) / task.info["limit"] <= 1)


class HalvesConfig(vf.TasksetConfig):
    num_train: int = 6
    limit: int = 8


class HalvesTaskset(vf.Taskset[HalvesTask, HalvesConfig]):
    def load(self):
        n, limit = self.config.num_train, self.config.limit
        rows = Dataset.from_list([{"question": f"What is {i} plus {i}?", "answer": str(2 * i),
                                   "info": {"limit": limit, "hint": f"{i}+{i}"}} for i in range(n)])
        return [HalvesTask(HalvesData(prompt=row["question"], system_prompt="Answer with a number.",
                                      answer=row["answer"], info=row["info"]), self.config.task) for row in rows]


__all__ = ["HalvesTaskset"]
'''
# Not single-turn: a tool server the model would call.
LOOKUP = '''import verifiers.v1 as vf


class Lookup(vf.Toolset[vf.SharedToolsetConfig]):
    @vf.tool
    async def lookup(self, word: str) -> str:
        """Look a word up."""
        return word


class LookupTask(vf.Task):
    @vf.reward
    async def said(self, trace: vf.Trace) -> float:
        return float(bool(trace.last_reply))


class LookupTaskset(vf.Taskset[LookupTask, vf.TasksetConfig]):
    @classmethod
    def toolsets(cls, config):
        return [Lookup(vf.SharedToolsetConfig())]

    def load(self):
        return [LookupTask(vf.TaskData(prompt="Look up 'apple'."), self.config.task)]


__all__ = ["LookupTaskset"]
'''
MODULES = {"halves_env": HALVES, "lookup_env": LOOKUP,
           # verifiers 0.4 awaits each reward: a plain function fails in its own scoring too
           "sync_env": HALVES.replace("async def exact", "def exact")}


@pytest.fixture
def modules(tmp_path, monkeypatch):
    for name, text in MODULES.items():
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # other tests see no verifiers:NAME
    yield
    for name in MODULES:
        sys.modules.pop(name, None)


def test_single_turn_taskset_loads_and_scores(modules):
    assert default_args("verifiers:halves-env") == {"num_train": (6, int), "limit": (8, int)}
    env = get_env("verifiers:halves-env", num_train=4, context_key="info.hint", eval_fraction=0.5)
    train, ev = env.examples("train"), env.examples("eval")
    assert (len(train), len(ev)) == (2, 2) and env.verifier == "rewards 1*exact + 0.5*short"
    # a seeded half of the tasks held out: disjoint, together all of them
    ids = {split: {e.id.rsplit("/", 1)[1] for e in env.examples(split)} for split in ("train", "eval")}
    assert not ids["train"] & ids["eval"] and ids["train"] | ids["eval"] == {"0", "1", "2", "3"}
    ex = next(e for e in [*train, *ev] if e.id.endswith("/3"))
    assert ex.messages == ({"role": "system", "content": "Answer with a number."},
                           {"role": "user", "content": "What is 3 plus 3?"})
    assert ex.context == "3+3" and ex.data["answer"] == "6"
    assert env.reward(ex, "6") == 1.5  # both rewards, weighted
    assert env.reward(ex, " 6 \n") == 1.5  # the trace's last_reply is stripped
    assert env.reward(ex, "the answer is 6") == 0.0 and env.reward(ex, "5") == 0.5
    check_context("Hint: {answer}", env)


def test_eval_fraction_holds_out_tasks_and_is_checked(modules):
    env = get_env("verifiers:halves-env", num_train=6)  # the default 0.1: at least one task
    assert (len(env.examples("train")), len(env.examples("eval"))) == (5, 1)
    assert len(get_env("verifiers:halves-env", num_train=6, eval_fraction=0).examples("eval")) == 0
    with pytest.raises(ValueError, match=r"^env.verifiers.eval_fraction: 1.5 must be in \[0, 1\)"):
        get_env("verifiers:halves-env", eval_fraction=1.5)
    with pytest.raises(ValueError, match=r"^env.verifiers.eval_fraction: 0.9 leaves no train example of the 1 tasks of "):
        get_env("verifiers:halves-env", num_train=1, eval_fraction=0.9)


def test_context_key_must_name_a_field(modules):
    with pytest.raises(ValueError, match=r"^env.verifiers.context_key: 'verifiers:halves-env' task 0 has no "
                                         r"'solution' \(its own fields: answer, info\)$"):
        get_env("verifiers:halves-env", context_key="solution")


@pytest.mark.parametrize("name, why", [
    ("lookup-env", r"\(LookupTaskset\) has tool servers \(Lookup\)"),
    ("sync-env", r"\(HalvesTaskset\) has a reward, exact, that is not async \(verifiers awaits each\)")])
def test_what_is_not_single_turn_is_refused(modules, name, why):
    with pytest.raises(ValueError, match=rf"^env.name: 'verifiers:{name}' {why}; only single-turn tasksets"):
        get_env(f"verifiers:{name}")


def test_a_reward_that_raises_is_not_a_silent_zero(modules):
    env = get_env("verifiers:halves-env", limit=0)
    ex = env.examples("train")[0]
    assert score(env, ex, "0", "zero") == (0.0, True)
    with pytest.raises(RewardError, match="halves-env/train/0' raised TaskError: task HalvesTask scoring: "
                                          "ZeroDivisionError"):
        score(env, ex, "0")


def test_bad_arguments_and_a_missing_package_are_named(modules):
    with pytest.raises(ValueError, match=r"^env.limit: Input should be a valid integer"):
        get_env("verifiers:halves-env", limit="many")
    with pytest.raises(ValueError, match=r"^env.name: cannot load the taskset of verifiers:no-such-env "
                                         r"\(ModuleNotFoundError: taskset 'no-such-env' not found"):
        default_args("verifiers:no-such-env")


def test_dry_run_and_refusal_from_the_command_line(tmp_path, modules):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(tmp_path)]))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "ctxd_jax.train", "--config=configs/demo.py", *args, "--dry_run"],
                              cwd=root, capture_output=True, text=True, timeout=300, env=env)

    r = run("--config.env.name=verifiers:halves-env", "--config.env.args.num_train=5",
            "--config.env.verifiers.context_key=answer", "--config.teacher.context=The answer is {context}.")
    assert r.returncode == 0, r.stderr
    assert "num_train: 5" in r.stdout and "context_key: answer" in r.stdout
    assert "task: 4 train and 1 eval examples; verifier: rewards 1*exact + 0.5*short" in r.stdout  # 0.1 held out
    student, teacher = r.stdout.split("student prompt of example 'halves-env/train/0':")[1].split("teacher prompt")
    assert "[system] Answer with a number.\n  [user] What is 0 plus 0?" in student and "answer is" not in student
    assert "[system] The answer is 0.\n  [user] What is 0 plus 0?" in teacher
    r = run("--config.env.name=verifiers:lookup-env")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: env.name: 'verifiers:lookup-env' (LookupTaskset) has tool servers (Lookup); only single-turn "
        "tasksets (one chat reply, scored from the trace alone) can be trained here"]
