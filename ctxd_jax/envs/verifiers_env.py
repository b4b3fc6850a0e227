"""`verifiers:ENV_ID`: a single-turn environment of the `verifiers` library (its classic API: `load_environment`,
`SingleTurnEnv`, `Parser`, `Rubric`; the 0.1 releases), loaded with `verifiers.load_environment(ENV_ID, **env.args)`.

Its train and eval datasets give the examples (their `prompt` column already holds the environment's system prompt);
the reward is the rubric's weighted sum of its reward functions (sync or async, each given what it names of
`completion`, `answer`, `info`, `state`, `parser`, `prompt`, ...). The library's `Rubric.score_rollout` turns a reward
function that raises into a logged 0; here each function is called by the library's own convention
(`maybe_call_with_named_args` over `Rubric.score_objects`), so that an error reaches env.reward_errors instead.
Multi-turn and tool environments, and group reward functions, are refused by name before anything starts.
`env.verifiers.context_key` names the dataset column (or `info.FIELD`) that is the example's own teacher context.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import importlib
import inspect
import json
import typing

from ctxd_jax.envs.base import VERIFIERS, Environment, Example, check_split
from ctxd_jax.rewards import problem


def _vf():
    try:
        import verifiers
        return verifiers, verifiers.SingleTurnEnv
    except (ImportError, AttributeError) as e:
        raise ValueError("env.name: verifiers environments need the `verifiers` library with its classic API "
                         f"(pip install 'ctxd-jax[verifiers]'; {type(e).__name__}: {e})") from e


def load_function(env_id: str):
    """The module's `load_environment`, found as verifiers.load_environment finds it (its module is ENV_ID with '-'
    as '_', the part after the last '/'), so that its keyword arguments are env.args."""
    module_name = env_id.replace("-", "_").split("/")[-1]
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # anything the user's module raises on import
        raise ValueError(f"env.name: cannot import {module_name!r} for {VERIFIERS}{env_id} ({type(e).__name__}: {e}); "
                         "is it installed or on PYTHONPATH?") from e
    if not callable(getattr(module, "load_environment", None)):
        raise ValueError(f"env.name: module {module_name!r} has no load_environment function")
    return module.load_environment


def _lookup(row: dict, key: str):
    """row[key], or row['info'][FIELD] for key 'info.FIELD' (info may be a JSON string, as verifiers allows)."""
    head, _, field = key.partition(".")
    value = row.get(head)
    if field:
        value = json.loads(value) if isinstance(value, str) else value
        value = value.get(field) if isinstance(value, dict) else None
    return value


def _rubrics(rubric) -> list:
    """The rubrics of a (possibly nested) RubricGroup, in order."""
    inner = getattr(rubric, "rubrics", None)
    return [r for sub in inner for r in _rubrics(sub)] if inner is not None else [rubric]


class VerifiersEnv(Environment):
    def __init__(self, env_id: str, context_key: str = "", **args):
        vf, single_turn = _vf()
        import datasets

        datasets.disable_progress_bars()  # the library maps its datasets; a bar per map would fill the console
        env = vf.load_environment(env_id, **args)
        name = f"{VERIFIERS}{env_id}"
        if not isinstance(env, single_turn) or env.tool_defs:
            raise ValueError(f"env.name: {name!r} is a {type(env).__name__}; only single-turn environments without "
                             "tools (verifiers.SingleTurnEnv) can be trained here")
        self.name, self._env_id, self._context_key = name, env_id, context_key
        self._parts = [(r, f, w) for r in _rubrics(env.rubric) for f, w in zip(r.funcs, r.weights) if w != 0]
        grouped = [type(r).__name__ for r in _rubrics(env.rubric) if r.has_group_rewards]
        if grouped:
            raise ValueError(f"env.name: {name!r} has group reward functions ({', '.join(grouped)}), which score a "
                             "whole group at once; only per-completion reward functions are supported")
        if not self._parts:
            raise ValueError(f"env.name: {name!r} has no reward function of nonzero weight")
        self.verifier = "rubric " + " + ".join(f"{w:g}*{getattr(f, '__name__', f)}" for _, f, w in self._parts)
        if env.build_dataset() is None:
            raise ValueError(f"env.name: {name!r} has no train dataset (only an eval_dataset)")
        # Without an eval_dataset, verifiers evaluates on the train dataset; so does this.
        rows = {"train": env.get_dataset(), "eval": env.get_eval_dataset()}
        self._examples = {split: [self._example(split, i, dict(r)) for i, r in enumerate(self._checked(split, r))]
                          for split, r in rows.items()}
        self._pool = concurrent.futures.ThreadPoolExecutor(1)  # its own event loop: reward() runs inside the run's

    def _checked(self, split: str, rows):
        if not len(rows):
            raise ValueError(f"env.name: {self.name!r} has no {split} examples")
        for i, row in enumerate(rows):
            prompt = row.get("prompt")
            if not (isinstance(prompt, list) and prompt and all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt)):
                raise ValueError(f"env.name: {self.name!r} {split} row {i + 1}: the prompt {str(prompt)[:80]!r} is "
                                 "not a list of text chat messages")
            if self._context_key and _lookup(row, self._context_key) is None:
                raise ValueError(f"env.verifiers.context_key: {self.name!r} {split} row {i + 1} has no "
                                 f"{self._context_key!r} (columns: {', '.join(row)})")
        return rows

    def _example(self, split: str, i: int, row: dict) -> Example:
        context = _lookup(row, self._context_key) if self._context_key else None
        messages = tuple({"role": m["role"], "content": m["content"]} for m in row["prompt"])
        return Example(id=f"{self._env_id}/{split}/{row.get('example_id', i)}", messages=messages, data=row,
                       context=None if context is None else str(context))

    def examples(self, split: str):
        check_split(split)
        return self._examples[split]

    def reward(self, example: Example, completion_text: str) -> float:
        return self._pool.submit(asyncio.run, self._score(example, completion_text)).result()

    async def _score(self, example: Example, completion_text: str) -> float:
        """The rubric's weighted score of one completion, from a state built as verifiers' init_state builds it."""
        import verifiers as vf
        from verifiers.types import flatten_task_input
        from verifiers.utils.async_utils import maybe_call_with_named_args
        from verifiers.utils.message_utils import normalize_messages

        row = copy.deepcopy(example.data)
        if isinstance(row.get("info"), str):
            row["info"] = json.loads(row["info"])
        task = flatten_task_input(row)
        state = vf.State(input=task)
        state.update(task=task, prompt=normalize_messages(row["prompt"], field_name="prompt"), trajectory=[],
                     completion=normalize_messages([{"role": "assistant", "content": completion_text}],
                                                   field_name="completion"))
        total = 0.0
        for rubric, func, weight in self._parts:
            value = await maybe_call_with_named_args(func, **rubric.score_objects(state))
            why = problem(value)
            if why:
                raise ValueError(f"{getattr(func, '__name__', func)} returned {value!r} ({why})")
            total += weight * float(value)
        return total


def environment_class(name: str) -> type[Environment]:
    """The Environment class of `verifiers:ENV_ID`: VerifiersEnv with the module's load_environment keyword arguments
    as its own (config.env.args, listed by --dry_run like any environment's)."""
    env_id = name.removeprefix(VERIFIERS)
    load = load_function(env_id)
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(load).parameters.values()
              if p.kind in keyword]

    def __init__(self, context_key: str = "", **args):
        VerifiersEnv.__init__(self, env_id, context_key, **args)

    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params])
    __init__.__annotations__ = {k: v for k, v in typing.get_type_hints(load).items() if k != "return"}
    return type(name, (VerifiersEnv,), {"__init__": __init__})
