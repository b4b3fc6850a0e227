"""`dataset`: a task from a file, no code. Rows of a local JSONL, JSON, CSV or Parquet file, or a folder saved with
Hugging Face `datasets` (`save_to_disk`), read with the `datasets` library.

Each row gives the student's prompt (`prompt_key`: a string, or a list of chat messages), the answer the verifier
checks (`answer_key`), and optionally the example's own teacher context (`context_key`: a worked solution, a
document, a hint, which only the teacher sees). Every column is a field that `teacher.context` may name
(`"Reference solution:\\n{solution}"`, envs/base.py). The eval split is `eval_path`, else a seeded
`eval_fraction` of the rows (disjoint from train). Bad data is refused before anything starts, naming the file, the
column or the row. See docs/tasks.md.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ctxd_jax.envs.answers import NEEDS_ANSWER, make_verifier
from ctxd_jax.envs.base import Environment, Example, LazyExamples, check_split, held_out, register

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant")


def load_rows(path: str, field: str):
    """The rows of `path` as a `datasets.Dataset`; ValueError '{field}: ...' when there are none to read."""
    logging.getLogger("datasets").setLevel(logging.WARNING)  # its import logs which frameworks it found
    import datasets

    datasets.disable_progress_bars()
    if not path:
        raise ValueError(f"{field}: is empty (give a JSONL, CSV or Parquet file, or a save_to_disk folder)")
    full = os.path.expanduser(path)
    if not os.path.exists(full):
        raise ValueError(f"{field}: {path!r} does not exist")
    if os.path.isfile(full):
        with open(full, "rb") as f:
            if not f.read(4096).strip():  # datasets fails on an empty file with a bare StopIteration
                raise ValueError(f"{field}: {path!r} has no rows")
    try:
        if os.path.isdir(full):
            rows = datasets.load_from_disk(full)
            if isinstance(rows, datasets.DatasetDict):
                if "train" not in rows:
                    raise ValueError(f"{field}: {path!r} holds splits {sorted(rows)} but no 'train'")
                rows = rows["train"]
        else:
            kind = FORMATS.get(os.path.splitext(full)[1].lower())
            if kind is None:
                raise ValueError(f"{field}: {path!r} is not one of {', '.join(FORMATS)} nor a save_to_disk folder")
            rows = datasets.load_dataset(kind, data_files=full, split="train")
    except ValueError:
        raise
    except Exception as e:  # datasets/pyarrow raise many kinds for a file they cannot parse
        raise ValueError(f"{field}: cannot read {path!r} ({type(e).__name__}: {' '.join(str(e).split())[:300]})") \
            from e
    if len(rows) == 0:
        raise ValueError(f"{field}: {path!r} has no rows")
    return rows


def _require_columns(rows, path: str, keys: dict[str, str]) -> None:
    for field, key in keys.items():
        if key and key not in rows.column_names:
            raise ValueError(f"env.{field}: {path!r} has no column {key!r} (columns: {', '.join(rows.column_names)})")


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value)


def _check_prompts(rows, path: str, key: str) -> None:
    for i, prompt in enumerate(rows[key]):
        if not (isinstance(prompt, str) and prompt.strip()) and not _is_messages(prompt):
            raise ValueError(f"env.prompt_key: {path!r} row {i + 1}: {key!r} is {str(prompt)[:80]!r}, not a "
                             "non-empty string or a list of chat messages ({'role', 'content'})")


@register("dataset")
class DatasetEnv(Environment):
    def __init__(self, path: str = "", eval_path: str = "", eval_fraction: float = 0.1, prompt_key: str = "prompt",
                 system_prompt: str = "", answer_key: str = "answer", context_key: str = "",
                 verifier: str = "exact", seed: int = 0):
        self.name = "dataset"
        self.verifier = verifier
        self._system, self._context_key = system_prompt, context_key
        self._verify = make_verifier(verifier, answer_key)
        keys = {"prompt_key": prompt_key, "context_key": context_key,
                "answer_key": answer_key if verifier in NEEDS_ANSWER or verifier.startswith("regex:") else ""}
        rows = load_rows(path, "env.path")
        _require_columns(rows, path, keys)
        _check_prompts(rows, path, prompt_key)
        self._prompt_key = prompt_key
        if eval_path:
            eval_rows = load_rows(eval_path, "env.eval_path")
            _require_columns(eval_rows, eval_path, keys)
            _check_prompts(eval_rows, eval_path, prompt_key)
            self._splits = {"train": (rows, path, np.arange(len(rows))),
                            "eval": (eval_rows, eval_path, np.arange(len(eval_rows)))}
        else:
            train, held = held_out(len(rows), eval_fraction, "env.eval_fraction", f"rows in {path!r}", seed)
            self._splits = {"train": (rows, path, train), "eval": (rows, path, held)}
        self._examples = {split: LazyExamples(len(idx), lambda i, s=split: self._example(s, i))
                          for split, (_, _, idx) in self._splits.items()}

    def _example(self, split: str, i: int) -> Example:
        rows, path, idx = self._splits[split]
        row_number = int(idx[i]) + 1
        row = rows[int(idx[i])]
        prompt = row[self._prompt_key]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
            [{"role": m["role"], "content": m["content"]} for m in prompt]
        if self._system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self._system})
        context = row.get(self._context_key) if self._context_key else None
        return Example(id=f"{os.path.basename(path.rstrip('/'))}:{row_number}", messages=tuple(messages), data=row,
                       context=None if context is None else str(context))

    def examples(self, split: str):
        check_split(split)
        return self._examples[split]

    def reward(self, example: Example, completion_text: str) -> float:
        return self._verify(completion_text, example)
