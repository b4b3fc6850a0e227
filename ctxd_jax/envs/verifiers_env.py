"""`verifiers:ENV_ID`: a single-turn taskset of the `verifiers` library (its 0.4 API, `verifiers.v1`: a `Taskset`
yields `Task`s, each a `TaskData` row and `@vf.reward` methods), loaded as `verifiers.v1.load_taskset` loads it: ENV_ID
is the taskset's package (a hub id `owner/name@version` imports `name`, `-` as `_`), which exports one Taskset subclass;
the fields of that taskset's config class are env.args.

A taskset is one set of tasks (which split of its data it loads is one of its own config fields); a seeded
`env.verifiers.eval_fraction` of them is held out as the eval examples, disjoint from train. An example's messages are
the task's system_prompt and prompt (text, or text chat messages), its data the task's fields. The reward is the
task's own scoring, `Task.score`, offline as verifiers' `replay` rescores a trace: a trace of the prompt and the one
completion, and the weighted sum of the task's rewards (its `@vf.reward` methods and those its config plugs in, each
async, given what it names of `task`, `trace`). A reward that raises reaches env.reward_errors (Task.score raises a
TaskError that names its error). Refused by name before anything starts: what is not one chat reply scored offline:
tool servers, a taskset's own harness or Env (agents, user simulators), a task that needs a container, an infinite
taskset, judges (they call a model), rewards or metrics that need the task's runtime or are not async (verifiers
awaits each), no reward of nonzero weight. `env.verifiers.context_key` names the task field (or FIELD.KEY of a dict
field) that is the example's own teacher context.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect

from ctxd_jax.envs.base import VERIFIERS, Environment, Example, check_split, held_out
from ctxd_jax.rewards import problem


def _vf():
    try:
        import verifiers.v1 as vf
        return vf
    except ImportError as e:
        raise ValueError("env.name: verifiers environments need the `verifiers` library, 0.4 "
                         f"(pip install 'ctxd-jax[verifiers]'; {type(e).__name__}: {e})") from e


def taskset_class(env_id: str) -> type:
    """The Taskset subclass that package ENV_ID exports, found as verifiers finds it."""
    _vf()
    from verifiers.v1.utils.loaders import taskset_class as find

    try:
        return find(env_id)
    except Exception as e:  # anything the user's package raises on import, or what verifiers says it lacks
        raise ValueError(f"env.name: cannot load the taskset of {VERIFIERS}{env_id} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}); is it installed or on PYTHONPATH?") from e


def _config_type(cls: type) -> type:
    """The taskset's config class (its Taskset[Task, Config] parameter), as verifiers resolves it."""
    from verifiers.v1.configs.taskset import TasksetConfig
    from verifiers.v1.taskset import Taskset
    from verifiers.v1.utils.generic import concrete_type

    return concrete_type(cls, TasksetConfig, origin=Taskset) or TasksetConfig


def config_fields(cls: type) -> dict:
    """{name: pydantic FieldInfo} of the taskset's own config fields (not verifiers' `id`, `task`, `system_prompt`)."""
    from verifiers.v1.configs.taskset import TasksetConfig

    return {k: f for k, f in _config_type(cls).model_fields.items() if k not in TasksetConfig.model_fields}


def _lookup(data: dict, key: str):
    """data[key], or data[FIELD][KEY] for key 'FIELD.KEY' (None where absent)."""
    value = data
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _prompt(vf, data, where: str) -> list:
    """The task's prompt as verifiers messages: its system_prompt, then its prompt (text or text chat messages)."""
    if data.prompt is None:
        raise ValueError(f"env.name: {where} has no prompt (the user opens the conversation: a user simulator); only "
                         "tasks with a prompt can be trained here")
    system = [vf.SystemMessage(content=data.system_prompt)] if data.system_prompt else []
    messages = system + ([vf.UserMessage(content=data.prompt)] if isinstance(data.prompt, str) else list(data.prompt))
    for m in messages:
        if m.role not in ("system", "user", "assistant") or not isinstance(m.content, str):
            raise ValueError(f"env.name: {where}: the prompt's {m.role} message is not text "
                             f"({str(m.content)[:80]!r}); only text chat prompts can be trained here")
    return messages


def _unsupported(env_id: str, taskset, task) -> str | None:
    """Why the taskset is not one chat reply scored from the trace alone, or None."""
    from verifiers.v1.envs.single_agent import SingleAgentEnv
    from verifiers.v1.utils.loaders import default_harness_id, environment_class

    cls, task_cls = type(taskset), type(task)
    env_cls = environment_class(env_id)
    tools = [*cls.toolsets(taskset.config), *task_cls.toolsets(taskset.config.task)]
    if env_cls is not SingleAgentEnv:
        return f"has its own Env, {env_cls.__name__} (agents or a user simulator)"
    if default_harness_id(env_id) != "bash":  # the harness verifiers falls back to where a taskset ships none
        return "ships its own harness (a program the model runs in)"
    if tools:
        return f"has tool servers ({', '.join(type(t).__name__ for t in tools)})"
    if task_cls.NEEDS_CONTAINER:
        return "needs a container"
    if taskset.config.task.judges:
        return "has judges, which call a model"
    for kind in ("reward", "metric"):
        for fn in task.hooks(kind):
            runtime = inspect.signature(fn).parameters.get("runtime")
            if runtime is not None and runtime.default is inspect.Parameter.empty:  # as Task.score tells them apart
                return f"has a {kind}, {fn.__name__}, that scores in the task's runtime"
            if not inspect.iscoroutinefunction(inspect.unwrap(fn)):
                return f"has a {kind}, {fn.__name__}, that is not async (verifiers awaits each)"
    if not any(getattr(fn, "_vf_weight", 1.0) for fn in task.hooks("reward")):
        return "has no reward of nonzero weight"
    return None


class VerifiersEnv(Environment):
    def __init__(self, env_id: str, context_key: str = "", eval_fraction: float = 0.1, **args):
        self._vf = _vf()
        import pydantic

        name = f"{VERIFIERS}{env_id}"
        self.name, self._env_id, self._context_key = name, env_id, context_key
        cls = taskset_class(env_id)
        if cls.INFINITE:
            raise ValueError(f"env.name: {name!r} ({cls.__name__}) is infinite; only a finite taskset can be trained "
                             "here")
        try:
            config = _config_type(cls).model_validate({"id": env_id, **args})
        except pydantic.ValidationError as e:  # config.py names the field env.args.FIELD
            error = e.errors()[0]
            raise ValueError(f"env.{'.'.join(map(str, error['loc']))}: {error['msg']}") from e
        taskset = cls(config)
        try:
            tasks = list(taskset)
        except Exception as e:  # anything the user's load() raises
            raise ValueError(f"env.name: {name!r}: loading its tasks raised {type(e).__name__}: {e}") from e
        if not tasks:
            raise ValueError(f"env.name: {name!r} has no tasks")
        why = _unsupported(env_id, taskset, tasks[0])
        if why:
            raise ValueError(f"env.name: {name!r} ({cls.__name__}) {why}; only single-turn tasksets (one chat reply, "
                             "scored from the trace alone) can be trained here")
        self.verifier = "rewards " + " + ".join(
            f"{w:g}*{fn.__name__}" for fn in tasks[0].hooks("reward") if (w := getattr(fn, "_vf_weight", 1.0)))
        self._tasks = {}
        self._examples = {split: [self._example(split, tasks[i]) for i in idx]
                          for split, idx in zip(("train", "eval"), held_out(
                              len(tasks), eval_fraction, "env.verifiers.eval_fraction", f"tasks of {name!r}"))}
        self._pool = concurrent.futures.ThreadPoolExecutor(1)  # its own event loop: reward() runs inside the run's

    def _example(self, split: str, task) -> Example:
        where = f"{self.name!r} task {task.data.idx}"
        messages = tuple({"role": m.role, "content": m.content} for m in _prompt(self._vf, task.data, where))
        data = task.data.model_dump()
        context = _lookup(data, self._context_key) if self._context_key else None
        if self._context_key and context is None:
            own = [k for k in type(task.data).model_fields if k not in self._vf.TaskData.model_fields]
            raise ValueError(f"env.verifiers.context_key: {where} has no {self._context_key!r} (its own fields: "
                             f"{', '.join(own) or 'none'})")
        example = Example(id=f"{self._env_id}/{split}/{task.data.idx}", messages=messages, data=data,
                          context=None if context is None else str(context))
        self._tasks[example.id] = task
        return example

    def examples(self, split: str):
        check_split(split)
        return self._examples[split]

    def reward(self, example: Example, completion_text: str) -> float:
        return self._pool.submit(asyncio.run, self._score(self._tasks[example.id], completion_text)).result()

    async def _score(self, task, completion_text: str) -> float:
        """The task's weighted reward of one completion: Task.score on the trace of its prompt and that reply."""
        vf = self._vf
        messages = [*_prompt(vf, task.data, ""), vf.AssistantMessage(content=completion_text)]
        nodes = [vf.MessageNode(parent=i - 1 if i else None, message=m, sampled=i == len(messages) - 1)
                 for i, m in enumerate(messages)]
        trace = vf.Trace(task=vf.TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
                         agent=vf.AgentInfo(config=vf.AgentConfig()), nodes=nodes)
        await task.score(trace)
        for name, reward in trace.rewards.items():
            why = problem(reward.score)
            if why:
                raise ValueError(f"{name} returned {reward.score!r} ({why})")
        return trace.reward


def environment_class(name: str) -> type[Environment]:
    """The Environment class of `verifiers:ENV_ID`: VerifiersEnv with the taskset config's own fields as its keyword
    arguments (config.env.args, listed by --dry_run like any environment's)."""
    env_id = name.removeprefix(VERIFIERS)
    fields = config_fields(taskset_class(env_id))
    params = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, annotation=f.annotation,
                                **({} if f.is_required() else {"default": f.get_default(call_default_factory=True)}))
              for k, f in fields.items()]

    def __init__(self, context_key: str = "", eval_fraction: float = 0.1, **args):
        VerifiersEnv.__init__(self, env_id, context_key, eval_fraction, **args)

    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params])
    __init__.__annotations__ = {k: f.annotation for k, f in fields.items()}
    return type(name, (VerifiersEnv,), {"__init__": __init__})
