"""Log-probs (and the top-k) of token sequences under the model with a given LoRA state, packed several to a row.

One piece of code for every scorer: `python -m ctxd_jax.score_cli`, `Trainer.logprobs`, and the trainer-side scores of
the rollout pipeline:

- teacher: when the teacher is the student's base model with a context in its prompt (`teacher.scorer` resolves to
  'trainer'), the trainer scores the teacher prompt + completion itself with a LoRA state of zeros (every adapter
  adds exactly 0, so the model is the base model) at temperature 1, top-k included: what a vLLM teacher server's
  prompt_logprobs give, without the server, the JSON of k entries per position, or a second copy of the weights;
- behaviour: the log-probs of the policy version that sampled a rollout, from a snapshot of that version's LoRA
  state (`Trainer.snapshot_lora`), at the rollout's sampling temperature.

Sequences are packed first-fit-decreasing into rows. Row length and rows per call come from a ladder of sizes (four
per octave): repeated calls reuse a few compiled shapes and pad by at most a quarter. The model runs over whole rows
(a completion attends to its prompt) but the LM head, softmax and top-k only at the scored positions (t >= start: a
teacher's completion, not its prompt), gathered per row to a width from the same ladder, in chunks
(ctxd_jax.models.logprobs), so no call holds [tokens, vocab] float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from ctxd_jax.inference.teacher import teacher_prompt_ids
from ctxd_jax.models.logprobs import logprobs_at, token_logprobs
from ctxd_jax.packing import first_fit_decreasing, placements

MIN_ROW = 128
MIN_WIDTH = 16  # scored positions per row, at least
ROW_KEYS = ("tokens", "positions", "segment_ids", "temperatures")


@dataclass
class Scores:
    """One sequence's scores at its tokens t in [start, len): log p(seq[t] | seq[:t]) and the top-k there."""

    logprobs: np.ndarray                     # [n] float32
    topk_ids: np.ndarray | None = None       # [n, k] int32, most likely first
    topk_logprobs: np.ndarray | None = None  # [n, k] float32


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest size >= max(n, minimum) of the ladder 1..8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ..."""
    n = max(n, minimum)
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 3)  # n lies in [4 step, 8 step): four sizes per octave
    return -(-n // step) * step


def rows_per_call(num_rows: int, row_len: int, *, batch_tokens: int, row_multiple: int = 1) -> int:
    """All `num_rows` rows (bucketed) when they fit in `batch_tokens`, else as many as fit; a multiple of
    `row_multiple` (at least one)."""
    cap = max(row_multiple, batch_tokens // row_len // row_multiple * row_multiple)
    return min(cap, -(-bucket(num_rows) // row_multiple) * row_multiple)


def score_rows(lora, rest, rows: dict, *, graphdef, chunk_size: int, topk: int = 0, max_segments: int | None = None):
    """Scores of packed `rows` (a dict of ROW_KEYS arrays [R, T], other keys ignored but "at") under the model
    nnx.merge(graphdef, lora, rest): (log-probs,) + (top-k ids [..., k], top-k log-probs [..., k]) if topk. With
    rows["at"] [R, P] (positions >= 1 of each row) only at those positions, [R, P]: the LM head, softmax and top-k
    run nowhere else; without it at every position, [R, T]. Call under `jax.set_mesh` with `max_segments` =
    attention.segment_bound of the rows where the model runs on a mesh."""
    model = nnx.merge(graphdef, lora, rest)
    tokens, positions, segment_ids, temperatures = (rows[k] for k in ROW_KEYS)
    if "at" in rows:
        hidden = model(tokens, positions, segment_ids, max_segments=max_segments)
        return logprobs_at(hidden, model.lm_head_kernel(), tokens, temperatures, rows["at"], chunk_size=chunk_size,
                           topk=topk)
    out = token_logprobs(model, tokens, positions, segment_ids, temperatures, chunk_size=chunk_size, topk=topk,
                         max_segments=max_segments)
    return (out[0],) + tuple(out[2:])  # no entropy


# Model structures (GraphDefs) are hashable and compare by structure: one cache for every model of a shape.
score_rows_jit = jax.jit(score_rows, static_argnames=("graphdef", "chunk_size", "topk", "max_segments"))


def _pack_rows(seqs, lengths, starts, temperatures, spans, *, rows: int, row_len: int, width: int) -> dict:
    """ROW_KEYS arrays [rows, row_len] of the sequences placed at `spans`, and "at" [rows, width]: the positions of
    each row that are scored (t >= start of its sequence), in span order, 0 after them."""
    out = {k: np.zeros((rows, row_len), np.int32) for k in ROW_KEYS[:3]}
    out["temperatures"] = np.ones((rows, row_len), np.float32)
    out["at"] = np.zeros((rows, width), np.int32)
    filled = [0] * rows
    for row, seg, i, at in spans:
        span = slice(at, at + lengths[i])
        out["tokens"][row, span] = seqs[i]
        out["positions"][row, span] = np.arange(lengths[i])
        out["segment_ids"][row, span] = seg
        out["temperatures"][row, span] = temperatures[i]
        n = lengths[i] - starts[i]
        out["at"][row, filled[row]:filled[row] + n] = np.arange(at + starts[i], at + lengths[i])
        filled[row] += n
    return out


def score_sequences(run: Callable[[dict], Sequence], seqs: Sequence[Sequence[int]], *,
                    starts: Sequence[int] | None = None, temperatures: Sequence[float] | None = None,
                    batch_tokens: int = 8192, row_multiple: int = 1,
                    fetch: Callable[[object], np.ndarray] = np.asarray,
                    agree: Callable[[list[int]], list[int]] | None = None) -> list[Scores]:
    """Scores of every sequence at its tokens t >= starts[i] (default 1), at temperatures[i] (default 1).

    `run(rows)` scores one call's rows (a dict of ROW_KEYS numpy arrays [R, T] and "at" [R, P]) and returns arrays
    as score_rows does; R is a multiple of `row_multiple` (the data-parallel size). Every call is dispatched before
    the first result is fetched (`fetch(array)` -> numpy, in call order), so packing the next rows and copying
    results to the host overlap the device's work. `agree([row length, width, rows])` -> the largest of every
    process's (several processes, each scoring its own `seqs`: one shape and one number of calls for all)."""
    if not seqs and agree is None:
        return []
    lengths = [len(s) for s in seqs]
    starts = [1] * len(seqs) if starts is None else list(starts)
    temperatures = [1.0] * len(seqs) if temperatures is None else list(temperatures)
    for i, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        if not 1 <= start <= n:
            raise ValueError(f"sequence {i}: start {start} is not in [1, {n}] (token 0 has no log-prob)")
    row_len = bucket(max(lengths, default=0), MIN_ROW)
    bins = first_fit_decreasing(lengths, row_len)
    # Scored positions per row, from the same ladder: one width for every call of this batch, few across batches.
    width = bucket(max((sum(lengths[i] - starts[i] for i in members) for members in bins), default=0), MIN_WIDTH)
    row_len, width, num_rows = (row_len, width, len(bins)) if agree is None else agree([row_len, width, len(bins)])
    per_call = rows_per_call(num_rows, row_len, batch_tokens=batch_tokens, row_multiple=row_multiple)
    calls = []
    for first in range(0, num_rows, per_call):
        spans = list(placements(bins[first:first + per_call], lengths))
        rows = _pack_rows(seqs, lengths, starts, temperatures, spans, rows=per_call, row_len=row_len,
                          width=width)
        calls.append((spans, run(rows)))
    out: list[Scores | None] = [None] * len(seqs)
    for spans, got in calls:
        got = [fetch(x) for x in got]
        offset = {}
        for row, _, i, _ in spans:
            at, n = offset.get(row, 0), lengths[i] - starts[i]
            out[i] = Scores(*(x[row, at:at + n] for x in got))
            offset[row] = at + n
    return out


def every_position(run: Callable[[dict], Sequence]) -> Callable[[dict], list[np.ndarray]]:
    """A `run` for score_sequences that scores every position of the rows (LM head, softmax and top-k over the whole
    row, [R, T, k] to the host) and keeps the scored ones there: the straightforward computation, for tests and
    benchmarks to compare against."""

    def scored(rows):
        got = run({k: v for k, v in rows.items() if k != "at"})
        return [np.asarray(x)[np.arange(len(rows["at"]))[:, None], rows["at"]] for x in got]

    return scored


def set_teacher_prompts(tokenizer, env, examples, rollouts, context: str | None) -> None:
    """Sets every rollout's teacher_prompt_ids (one prompt per group). `examples[r.group]` is rollout r's example
    (a list indexed by group, or a dict)."""
    prompts: dict[int, list[int]] = {}
    for r in rollouts:
        if r.group not in prompts:
            prompts[r.group] = teacher_prompt_ids(tokenizer, env, examples[r.group], context, r.prompt_ids)
            if not prompts[r.group]:
                raise ValueError("teacher prompt is empty: the first completion token would have no log-prob")
        r.teacher_prompt_ids = prompts[r.group]


def score_teacher_in_trainer(trainer, tokenizer, env, examples, rollouts, context: str | None,
                             topk: int = 0, lora=None) -> None:
    """Fills every rollout's teacher_prompt_ids, teacher_logprobs (and teacher_topk_ids / teacher_topk_logprobs when
    topk > 0): the log-probs of its completion under the teacher prompt, at temperature 1, scored by `trainer` with
    the LoRA state `lora` (default: LoRA off, the base model: the same numbers as orchestrator.score_teacher with a
    vLLM server serving the base model).

    `examples[r.group]` is rollout r's example (a list indexed by group, or a dict). Reads only the trainer's
    frozen weights and `lora`, never its train state, so a worker thread may call it between train steps."""
    set_teacher_prompts(tokenizer, env, examples, rollouts, context)
    score_teacher_prompts(trainer, rollouts, topk, lora)


def score_teacher_prompts(trainer, rollouts, topk: int = 0, lora=None) -> None:
    """score_teacher_in_trainer for rollouts whose teacher_prompt_ids are set already."""
    seqs = [r.teacher_prompt_ids + list(r.completion_ids) for r in rollouts]
    scores = trainer.score(seqs, lora=trainer.base_lora() if lora is None else lora,
                           starts=[len(r.teacher_prompt_ids) for r in rollouts], topk=topk)
    for r, s in zip(rollouts, scores):
        r.teacher_logprobs = s.logprobs.tolist()
        # The top-k stay numpy arrays [n, k]: as lists (k Python numbers per token) they cost seconds a batch to
        # make and again to pack.
        r.teacher_topk_ids, r.teacher_topk_logprobs = s.topk_ids, s.topk_logprobs


def behaviour_logprobs(trainer, rollouts, lora) -> list[list[float]]:
    """Per rollout, the log-probs of its completion tokens under its own prompt at its sampling temperature, with
    the LoRA state `lora` (a `Trainer.snapshot_lora()` of the policy version that sampled it)."""
    seqs = [list(r.prompt_ids) + list(r.completion_ids) for r in rollouts]
    scores = trainer.score(seqs, lora=lora, starts=[len(r.prompt_ids) for r in rollouts],
                           temperatures=[r.temperature for r in rollouts])
    return [s.logprobs.tolist() for s in scores]
