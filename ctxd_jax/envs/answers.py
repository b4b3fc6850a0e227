"""The built-in verifiers of `env.name=dataset` (env.dataset.verifier): a completion against the example's answer.

    exact      the whole completion equals the answer, whitespace runs and case ignored ("42" is not "4")
    contains   the answer appears in the completion (whitespace and case ignored)
    regex      the answer is a regular expression that must match somewhere in the completion
    regex:PAT  PAT extracts the final answer (its last match; group 1 if it has groups), compared as `exact`
    choice     a multiple-choice letter: `\\boxed{B}`, "answer is (B)", "Answer: B", or a completion that is "B"/"(B)"
    math       equivalence by `math-verify` (LaTeX, \\boxed{}, fractions, decimals: 1/2 equals 0.5)
    none       reward 0 (pure distillation)
    pkg.module:function   any importable callable (completion_text, example) -> float

Each returns 1.0 or 0.0 (the user's function returns what it likes; ctxd_jax/rewards.py checks it).
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable

NEEDS_ANSWER = ("exact", "contains", "regex", "choice", "math")  # read the answer column
BUILT_IN = NEEDS_ANSWER + ("none",)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def exact(completion: str, answer: str) -> float:
    return float(_norm(completion) == _norm(answer))


def contains(completion: str, answer: str) -> float:
    return float(bool(_norm(answer)) and _norm(answer) in _norm(completion))


def regex(completion: str, answer: str) -> float:
    return float(re.search(answer, completion) is not None)


def extract(pattern: re.Pattern, completion: str) -> str | None:
    """The last match of `pattern` in `completion` (its group 1 when it has groups)."""
    matches = list(pattern.finditer(completion))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if pattern.groups else last.group(0)


_CHOICES = (re.compile(r"\\boxed\{\s*\(?([A-Za-z])\)?\s*\}"),
            re.compile(r"(?i:answer)(?:\s+is)?\s*[:=]?\s*\(?([A-Z])\)?(?![A-Za-z])"),
            re.compile(r"^\s*\(?([A-Z])(?:[.):]|\s*$)"))


def choice(completion: str, answer: str) -> float:
    gold = re.search(r"[A-Za-z]", answer)
    for pattern in _CHOICES:
        letter = extract(pattern, completion)
        if letter is not None:
            return float(gold is not None and letter.upper() == gold.group(0).upper())
    return 0.0


def math(completion: str, answer: str) -> float:
    from math_verify import parse, verify

    # math-verify times out with SIGALRM, which only the main thread may set
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold_text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
    gold = parse(gold_text, parsing_timeout=limit)
    pred = parse(completion, parsing_timeout=limit)
    return float(bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=limit))


def none(completion: str, answer: str) -> float:
    return 0.0


def load_function(spec: str, field: str) -> Callable:
    """The callable `pkg.module:function` (on PYTHONPATH); ValueError '{field}: ...' when it does not import."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # anything the user's module raises on import
        raise ValueError(f"{field}: cannot import {module_name!r} ({type(e).__name__}: {e}); is it on "
                         "PYTHONPATH?") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{field}: module {module_name!r} has no callable {attr!r}")
    return fn


def make_verifier(spec: str, answer_key: str) -> Callable:
    """`reward(completion_text, example) -> float` for env.dataset.verifier `spec`; ValueError 'env.verifier: ...'
    when `spec` is no verifier."""
    field = "env.verifier"
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:"):])
        except re.error as e:
            raise ValueError(f"{field}: {spec[6:]!r} is not a regular expression ({e})") from e

        def extracted(text, ex):
            found = extract(pattern, text)
            return 0.0 if found is None else exact(found, str(ex.data[answer_key]))

        return extracted
    if spec in BUILT_IN:
        check = globals()[spec]
        return lambda text, ex: check(text, str(ex.data.get(answer_key, "")))
    if ":" in spec and all(spec.partition(":")[::2]):
        return load_function(spec, field)
    raise ValueError(f"{field}: {spec!r} is not a verifier (one of {', '.join(BUILT_IN)}, regex:PATTERN, or an "
                     "importable module:function)")
