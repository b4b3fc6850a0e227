"""Your task, your data, from the command line as a new user runs it: a dataset file or an environment class outside
the repository, no Python written inside it (docs/tasks.md)."""

import json
import os
import subprocess
import sys

import pytest

from ctxd_jax.checkpoint import Checkpointer
from test_cli import ROOT, ok, refused

ROWS = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i), "solution": f"{i} + {i} = {2 * i}"}
        for i in range(10)]
ECHO = '''from ctxd_jax.envs import Environment, Example


class Echo(Environment):
    default_context = "Repeat the word you are given."

    def __init__(self, word: str = "banana", num_train: int = 8, broken: bool = False):
        self._ex = [Example(f"echo-{i}", ({"role": "user", "content": f"Say {word}"},), {"word": word})
                    for i in range(num_train)]
        self._broken = broken

    def examples(self, split):
        return self._ex if split == "train" else self._ex[:2]

    def reward(self, example, completion_text):
        if self._broken and example.id.endswith(("0", "2", "4", "6")):
            return float("nan")  # a reward function with a bug
        return float(example.data["word"] in completion_text)
'''


def _jsonl(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def _csv(tmp_path):
    path = tmp_path / "halves.csv"
    path.write_text("question,answer\n" + "".join(f'"What is {i}/2?",{i / 2}\n' for i in range(10)))
    return str(path)


def _echo_module(tmp_path):
    (tmp_path / "my_tasks.py").write_text(ECHO)
    return str(tmp_path)


def _verifiers_module(tmp_path):
    """A verifiers single-turn taskset module in tmp_path: its folder."""
    from ctxd_jax.envs.verifiers_env_test import HALVES

    (tmp_path / "halves_env.py").write_text(HALVES)
    return str(tmp_path)


def test_dry_run_shows_the_task(tmp_path):
    args = ["--config=configs/demo.py", "--config.env.name=dataset", f"--config.env.dataset.path={_jsonl(tmp_path)}",
            "--config.env.dataset.context_key=solution", "--config.env.dataset.eval_fraction=0.2"]
    out = ok(*args, "--config.teacher.context=Reference solution:\n{solution}").stdout
    assert "task: 8 train and 2 eval examples; verifier: exact" in out
    student, teacher = out.split("student prompt of example ")[1].split("teacher prompt of example ")
    assert "[user] What is" in student and "solution" not in student.lower()
    assert "[system] Reference solution:\n  [system] " in teacher and " = " in teacher
    out = ok("--config=configs/demo.py", "--config.env.name=dataset", f"--config.env.dataset.path={_csv(tmp_path)}",
             "--config.env.dataset.prompt_key=question", "--config.env.dataset.verifier=math").stdout
    assert "task: 9 train and 1 eval examples; verifier: math" in out


def test_bad_data_is_refused_in_one_line(tmp_path):
    base = ["--config=configs/demo.py", "--config.env.name=dataset"]
    assert refused(*base, f"--config.env.dataset.path={tmp_path}/none.jsonl") == (
        f"env.dataset.path: '{tmp_path}/none.jsonl' does not exist")
    path = _jsonl(tmp_path)
    assert refused(*base, f"--config.env.dataset.path={path}", "--config.env.dataset.answer_key=gold") == (
        f"env.dataset.answer_key: '{path}' has no column 'gold' (columns: prompt, answer, solution)")
    assert refused(*base, f"--config.env.dataset.path={path}", "--config.teacher.context={hint}").startswith(
        "teacher.context: {hint} is not a field of example 'qa.jsonl:")
    assert refused(*base, f"--config.env.dataset.path={path}", "--config.env.dataset.verifier=mine:f").startswith(
        "env.dataset.verifier: cannot import 'mine'")


def test_environment_class_outside_the_repository(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{_echo_module(tmp_path)}")
    out = ok("--config=configs/demo.py", "--config.env.name=my_tasks:Echo", "--config.env.args.word=apple",
             "--config.env.args.num_train=5", env=env).stdout
    assert "word: apple" in out and "task: 5 train and 2 eval examples; verifier: my_tasks.Echo.reward" in out
    assert "[system] Repeat the word you are given.\n  [user] Say apple" in out
    assert refused("--config.env.name=my_tasks:Nope", env=env) == (
        "env.name: 'my_tasks:Nope' is not a subclass of ctxd_jax.envs.Environment")


# Each case: (the task's flags, a folder for PYTHONPATH or None) from tmp_path.
TRAINS = {
    "jsonl-solution-exact": lambda tmp: ([
        "--config.env.name=dataset", f"--config.env.dataset.path={_jsonl(tmp)}",
        "--config.env.dataset.context_key=solution", "--config.teacher.context=Solution: {solution}"], None),
    "csv-math": lambda tmp: ([
        "--config.env.name=dataset", f"--config.env.dataset.path={_csv(tmp)}",
        "--config.env.dataset.prompt_key=question", "--config.env.dataset.verifier=math"], None),
    "class-outside": lambda tmp: (["--config.env.name=my_tasks:Echo", "--config.env.args.word=apple"],
                                  _echo_module(tmp)),
    # half its rewards NaN, scored 0 and counted (env.reward_errors=zero); every checkpoint finite
    "class-outside-nan-rewards": lambda tmp: ([
        "--config.env.name=my_tasks:Echo", "--config.env.args.broken=true", "--config.env.reward_errors=zero",
        "--config.teacher.eval_baseline=false", "--config.ckpt.interval=1"], _echo_module(tmp)),
    "verifiers-single-turn": lambda tmp: ([
        "--config.env.name=verifiers:halves-env", "--config.env.verifiers.context_key=info.hint",
        "--config.teacher.context=Hint: {context}"], _verifiers_module(tmp)),
}


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TRAINS))
def test_task_from_the_command_line_trains(case, tmp_path, tiny_model_dir, cli_env):
    """Two steps on the tiny model of each task a new user brings: a JSONL with per-example solution context and the
    exact verifier, a CSV with the math verifier, an environment class in a folder outside the repository, a verifiers
    single-turn taskset module there."""
    task, outside = TRAINS[case](tmp_path)
    env = dict(cli_env, PYTHONPATH=os.pathsep.join([ROOT] + ([outside] if outside else [])))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ctxd_jax.train", "--config=configs/demo.py", f"--config.model.path={tiny_model_dir}",
           f"--config.output_dir={out}",
           "--config.max_steps=2", "--config.seq_len=192", "--config.batch_size=4", "--config.rollouts_per_example=2",
           "--config.sampling.max_tokens=8", "--config.eval.interval=0", "--config.ckpt.interval=0",
           "--config.parity.num_prompts=0", "--config.trainer.micro_batch_rows=0", *task]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, "\n".join(line for line in r.stderr.splitlines() if "rror" in line)[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    if case.endswith("nan-rewards"):
        assert sum(row["reward/errors"] for row in rows) > 0, rows
        ckpt = Checkpointer(str(out / "checkpoints"))
        assert ckpt.steps() == [1, 2]
        for step in ckpt.steps():
            ckpt.check_arrays(step)  # raises where an array is not finite
        ckpt.close()
        return
    assert all(row["reward/errors"] == 0 for row in rows)
    assert "teacher" in json.loads((out / "eval_baseline.json").read_text())
