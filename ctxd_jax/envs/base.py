"""The environment interface: a seeded dataset of chat prompts with disjoint train/eval splits, a verifier and a default
teacher context; plus the registry that `config.env.name` picks from.

Teacher contexts are plain strings (config.teacher.context). They may carry worked example turns, which small models
need (SmolLM2-135M ignores an instruction alone, see envs/persona.py): a line that is exactly `<<user>>` or
`<<assistant>>` starts a turn with that role; the text before the first marker is the system message.

    Start every answer with "Ahoy!".
    <<user>>
    What color is a banana?
    <<assistant>>
    Ahoy! A banana is yellow when it is ripe.

The default `teacher_messages` puts that system message in place of the student's system message, then the demo
turns, then the student's other messages (the reference's behaviour: the context replaces the system prompt).

An example may carry its own teacher context (`Example.context`: its worked solution, a document, a hint), which the
student never sees. `config.teacher.context` is then a template rendered per example (`render_context`): `{name}`
takes the field `name` of the example's `data`, `{context}` the example's own context, `{{` and `}}` are literal
braces; a template without placeholders is used as it is, and an empty one means the example's own context.
Adding an environment is one file in this package that decorates its class with `@register("name")`, or a class
anywhere on PYTHONPATH named as `env.name=pkg.module:Class` (its keyword arguments are then config.env.args).
"""

import dataclasses
import importlib
import inspect
import pkgutil
import re
import types
import typing
from collections.abc import Callable, Sequence

import numpy as np

TURN_MARKERS = {"<<user>>": "user", "<<assistant>>": "assistant"}
_MARKER_LINE = re.compile(r"^(<<user>>|<<assistant>>)[ \t]*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    messages: tuple[dict, ...]  # the student's chat messages (system? + user)
    data: dict  # whatever the verifier needs; the fields a teacher context template may name
    context: str | None = None  # this example's own teacher context (privileged: never in the student's prompt)


def parse_context(context: str) -> list[dict]:
    """The teacher context as chat messages: [system (if any text), demo turns...]."""
    pieces = _MARKER_LINE.split(context)
    system = pieces[0].strip()
    msgs = [{"role": "system", "content": system}] if system else []
    for marker, text in zip(pieces[1::2], pieces[2::2]):
        msgs.append({"role": TURN_MARKERS[marker], "content": text.strip()})
    return msgs


# `{{`, `}}`, or a `{name}` placeholder (the name is a data field, or `context`).
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][\w.-]*)\}")


def context_fields(template: str) -> list[str]:
    """The placeholders of a teacher context template, in order."""
    return [m.group(1) for m in _TEMPLATE_TOKEN.finditer(template) if m.group(1)]


def render_context(template: str | None, example: Example) -> str:
    """The teacher context of `example`: `template` with its placeholders filled from the example (see the module
    docstring); '' when there is none (the teacher then sees the student's prompt)."""
    if not template:
        return example.context or ""
    if not context_fields(template):
        return template

    def fill(m: re.Match) -> str:
        name = m.group(1)
        if name is None:
            return m.group(0)[0]
        if name == "context":
            return example.context or ""
        if name not in example.data:
            raise ValueError(f"teacher.context: {{{name}}} is not a field of example {example.id!r} (fields: "
                             f"{', '.join(sorted(example.data)) or 'none'})")
        return str(example.data[name])

    return _TEMPLATE_TOKEN.sub(fill, template)


def check_context(template: str | None, env: "Environment") -> None:
    """Raises ValueError (naming the field) when the template names a field that the first example of a split lacks,
    or `{context}` while it has no context of its own; before anything starts."""
    for split in ("train", "eval"):
        examples = env.examples(split)
        if len(examples) and template and "context" in context_fields(template) and examples[0].context is None:
            raise ValueError(f"teacher.context: {{context}} but the {split} examples have no context of their own")
        if len(examples):
            render_context(template, examples[0])


def describe(env: "Environment", template: str | None) -> str:
    """What a dry run shows of the task: split sizes, the verifier, and the first train example's student and teacher
    chat messages."""
    train, ev = env.examples("train"), env.examples("eval")
    verifier = getattr(env, "verifier", None) or f"{type(env).__module__}.{type(env).__qualname__}.reward"
    lines = [f"task: {len(train)} train and {len(ev)} eval examples; verifier: {verifier}"]
    if len(train):
        ex, context = train[0], render_context(template, train[0])
        teacher = env.teacher_messages(ex, context) if context else list(ex.messages)
        for who, msgs in (("student", ex.messages), ("teacher", teacher)):
            lines.append(f"{who} prompt of example {ex.id!r}:")
            lines += [f"  [{m['role']}] {line}" for m in msgs for line in m["content"].splitlines() or [""]]
    return "\n".join(lines)


def format_context(system: str, demos: Sequence[tuple[str, str]]) -> str:
    """The inverse of parse_context: a rule and (user, assistant) demo pairs as one context string."""
    parts = [system.strip()]
    for user, assistant in demos:
        parts += ["<<user>>", user.strip(), "<<assistant>>", assistant.strip()]
    return "\n".join(parts)


class LazyExamples(Sequence):
    """A fixed-length sequence whose items are built on first access (Sokoban's 16k puzzles are not built up front)."""

    def __init__(self, n: int, make: Callable[[int], Example]):
        self._n, self._make, self._cache = n, make, {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"example index {i} out of range ({self._n})")
        if i not in self._cache:
            self._cache[i] = self._make(i)
        return self._cache[i]


class Environment:
    name: str = ""
    default_context: str = ""

    def examples(self, split: str) -> Sequence[Example]:
        raise NotImplementedError

    def reward(self, example: Example, completion_text: str) -> float:
        raise NotImplementedError

    def teacher_messages(self, example: Example, context: str) -> list[dict]:
        return parse_context(context) + [m for m in example.messages if m["role"] != "system"]


def check_split(split: str) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


_REGISTRY: dict[str, Callable[..., Environment]] = {}
RESERVED_NAMES = ("name", "args", "reward_errors", "verifiers")  # keys of config.env that are not environments
VERIFIERS = "verifiers:"  # env.name of an environment of the `verifiers` library: verifiers:ENV_ID (verifiers_env.py)


def register(name: str):
    if name in RESERVED_NAMES:
        raise ValueError(f"environment name {name!r} is reserved (a key of config.env)")

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"environment {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def _import_all() -> None:
    import ctxd_jax.envs as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if not m.name.endswith("_test"):
            importlib.import_module(f"{pkg.__name__}.{m.name}")


def env_names() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def section(name: str) -> str:
    """The key of config.env that holds environment `name`'s keyword arguments."""
    return "args" if ":" in name else name


def _load_outside(name: str) -> None:
    """Registers the Environment subclass `pkg.module:Class`, or the adapter of `verifiers:ENV_ID`, under its own name."""
    if name.startswith(VERIFIERS):
        from ctxd_jax.envs.verifiers_env import environment_class

        _REGISTRY[name] = environment_class(name)
        return
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # anything the user's module raises on import
        raise ValueError(f"env.name: cannot import {module_name!r} ({type(e).__name__}: {e}); is it on PYTHONPATH?") \
            from e
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ValueError(f"env.name: {name!r} is not a subclass of ctxd_jax.envs.Environment")
    _REGISTRY[name] = cls


def _cls(name: str) -> Callable[..., Environment]:
    if name not in _REGISTRY and ":" in name:
        _load_outside(name)
    if name not in _REGISTRY:
        _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"env.name: unknown environment {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def get_env(name: str, **kwargs) -> Environment:
    """The environment `name` (config.env.name), built with `kwargs` (config.env.args)."""
    return _cls(name)(**kwargs)


def held_out(n: int, eval_fraction: float, field: str, what: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The sorted indices of the train and the eval examples of n: a seeded eval_fraction held out (at least one when
    it is > 0), the rest train. `field` names the fraction in errors, `what` the n examples."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"{field}: {eval_fraction} must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    n_eval = max(int(round(eval_fraction * n)), int(eval_fraction > 0))
    if n_eval >= n:
        raise ValueError(f"{field}: {eval_fraction} leaves no train example of the {n} {what}")
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def settings(name: str, env_section) -> dict:
    """Keyword arguments of environment `name` from config.env besides its own section: a `verifiers` environment's
    context_key and eval_fraction (config.env.verifiers)."""
    if name.startswith(VERIFIERS) and "verifiers" in env_section:
        return env_section.verifiers.to_dict()
    return {}


def env_from_config(config) -> Environment:
    """The run's environment: config.env.name with config.env.args (validation fills them in; a bench's config may
    have none, which means the defaults)."""
    args = config.env.get("args")
    return get_env(config.env.name, **(args.to_dict() if args is not None else {}), **settings(config.env.name,
                                                                                                config.env))


def default_args(name: str) -> dict[str, tuple[object, type]]:
    """{argument: (default, type)} of environment `name`'s keyword arguments, read from its __init__ (the one place
    they are written). The type of an `X | None = None` argument is X."""
    init = _cls(name).__init__
    hints = typing.get_type_hints(init)
    out = {}
    for p in list(inspect.signature(init).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        kind = hints.get(p.name, type(p.default))
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        out[p.name] = (p.default, kind)
    return out
