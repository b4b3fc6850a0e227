"""Rollouts -> TrainBatch: samples packed first-fit-decreasing into rows of `seq_len` (numpy only).

Alignment (the reference's, docs/reference.md): position t of a row holds log p(token_t | earlier tokens of its
sample), so the sampling and teacher log-probs of completion token i sit at the position of that token, and the loss
mask is true on completion tokens only. Segment id 0 marks padding; positions restart at 0 for every sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from ctxd_jax.models.attention import MIN_SEGMENT_BOUND
from ctxd_jax.records import Rollout

# At most this many samples share a row, so a row's runs of segment ids (with its padding) fit the attention
# kernel's smallest segment bound. cuDNN's packed attention on GPU needs memory in proportion to the bound times the
# row length (a bound of 512 at 16k tokens asked for 258 GiB on an H200) and its gradients drifted from XLA's past
# 64 segments (relative error 0.18 at 65 segments in a 16k row, 0.55 at 300 in a 4k row; outputs stayed exact), so
# rows of many short samples are split instead (bench/attention_check.py, BENCHMARKS.md).
MAX_SAMPLES_PER_ROW = MIN_SEGMENT_BOUND - 1
TEACHER_ROW_MULTIPLE = 128  # teacher rows longer than seq_len round up to this: few compiled shapes


class TrainBatch(NamedTuple):
    """Plain arrays [rows, seq_len] (top-k: [rows, seq_len, k]); None where the run has no teacher / no top-k."""

    tokens: np.ndarray             # int32
    positions: np.ndarray          # int32
    segment_ids: np.ndarray        # int32, 0 = padding
    loss_mask: np.ndarray          # bool, completion tokens only
    sampling_logprobs: np.ndarray  # float32
    advantages: np.ndarray         # float32, the sample's advantage on each of its tokens
    kl_gates: np.ndarray           # float32
    temperatures: np.ndarray       # float32 (1 on padding)
    teacher_logprobs: np.ndarray | None = None       # float32
    teacher_topk_ids: np.ndarray | None = None       # int32
    teacher_topk_logprobs: np.ndarray | None = None  # float32
    # The teacher's rows (full-vocabulary KL: the trainer runs the teacher): each row holds the teacher prompt +
    # completion of the same samples as the student's row, [rows, teacher_len]; teacher_index [rows, seq_len] is
    # where each completion token of the student's row sits in the teacher's (0 elsewhere).
    teacher_tokens: np.ndarray | None = None         # int32
    teacher_positions: np.ndarray | None = None      # int32
    teacher_segment_ids: np.ndarray | None = None    # int32
    teacher_index: np.ndarray | None = None          # int32


@dataclass(frozen=True)
class PackStats:
    samples: int
    rows: int          # including filler rows
    filler_rows: int
    truncated: int     # samples cut to seq_len
    tokens: int        # real tokens (prompt + completion) in the batch
    loss_tokens: int
    seq_len: int

    @property
    def fill(self) -> float:
        """Fraction of the row slots holding real tokens."""
        return self.tokens / (self.rows * self.seq_len)


def first_fit_decreasing(lengths: Sequence[int], capacity: int,
                         max_items: int = MAX_SAMPLES_PER_ROW) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` tokens and `max_items` items, longest first; ties
    keep input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"sample {i} has {lengths[i]} tokens > seq_len {capacity}; truncate first")
        for b, free in enumerate(room):
            if lengths[i] <= free and len(bins[b]) < max_items:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def placements(bins: Sequence[Sequence[int]], lengths: Sequence[int]):
    """(row, segment id, index, start offset) of every sequence in `bins`: laid end to end, segment ids from 1."""
    for row, members in enumerate(bins):
        start = 0
        for seg, i in enumerate(members, start=1):
            yield row, seg, i, start
            start += lengths[i]


def pack(rollouts: Sequence[Rollout], advantages, kl_gates=None, *, seq_len: int, row_multiple: int = 1,
         topk: int = 0, min_rows: int = 0, teacher_rows: bool = False) -> tuple[TrainBatch, PackStats]:
    """Packs `rollouts` (with their per-sample `advantages` and `kl_gates`) into a TrainBatch.

    Samples longer than `seq_len` keep their first `seq_len` tokens. The row count is padded up to a multiple of
    `row_multiple` (data-parallel size x micro-batch rows) with filler rows: all padding, zero loss mask, so every
    data-parallel rank runs the same number of identical-shape micro-batches.
    `min_rows` pads with filler rows up to at least that many rows (fewer distinct shapes to compile).
    `topk` > 0 packs the teacher's top-k ids/log-probs (rollouts must carry at least k of them per token).
    `teacher_rows` packs the teacher's rows from each rollout's teacher_prompt_ids (see TrainBatch).
    """
    if not rollouts:
        raise ValueError("pack: no rollouts")
    if seq_len < 2 or row_multiple < 1:
        raise ValueError(f"pack: bad seq_len={seq_len} / row_multiple={row_multiple}")
    n = len(rollouts)
    advantages = np.asarray(advantages, np.float32).reshape(-1)
    kl_gates = np.ones(n, np.float32) if kl_gates is None else np.asarray(kl_gates, np.float32).reshape(-1)
    if advantages.shape[0] != n or kl_gates.shape[0] != n:
        raise ValueError(f"pack: {n} rollouts but {advantages.shape[0]} advantages / {kl_gates.shape[0]} kl gates")
    has_teacher = [r.teacher_logprobs is not None for r in rollouts]
    if any(has_teacher) and not all(has_teacher):
        raise ValueError("pack: some rollouts have teacher_logprobs and some do not")
    for r in rollouts:
        if len(r.sampling_logprobs) != len(r.completion_ids):
            raise ValueError(f"pack: rollout {r.example_id}/{r.group}: {len(r.sampling_logprobs)} sampling logprobs "
                             f"for {len(r.completion_ids)} completion tokens")
        if r.teacher_logprobs is not None and len(r.teacher_logprobs) != len(r.completion_ids):
            raise ValueError(f"pack: rollout {r.example_id}/{r.group}: {len(r.teacher_logprobs)} teacher logprobs "
                             f"for {len(r.completion_ids)} completion tokens")
        if topk and (r.teacher_topk_ids is None or len(r.teacher_topk_ids) != len(r.completion_ids)):
            raise ValueError(f"pack: rollout {r.example_id}/{r.group}: top-k={topk} needs teacher_topk_ids per token")

    full = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
    lengths = [min(f, seq_len) for f in full]
    bins = first_fit_decreasing(lengths, seq_len)
    rows = -(-max(len(bins), min_rows) // row_multiple) * row_multiple
    shape = (rows, seq_len)
    b = dict(tokens=np.zeros(shape, np.int32), positions=np.zeros(shape, np.int32),
             segment_ids=np.zeros(shape, np.int32), loss_mask=np.zeros(shape, bool),
             sampling_logprobs=np.zeros(shape, np.float32), advantages=np.zeros(shape, np.float32),
             kl_gates=np.zeros(shape, np.float32), temperatures=np.ones(shape, np.float32))
    if all(has_teacher):
        b["teacher_logprobs"] = np.zeros(shape, np.float32)
    if topk:
        b["teacher_topk_ids"] = np.zeros(shape + (topk,), np.int32)
        b["teacher_topk_logprobs"] = np.zeros(shape + (topk,), np.float32)
    for row, seg, i, start in placements(bins, lengths):
        r, length = rollouts[i], lengths[i]
        p = len(r.prompt_ids)
        sl = slice(start, start + length)
        b["tokens"][row, sl] = (list(r.prompt_ids) + list(r.completion_ids))[:length]
        b["positions"][row, sl] = np.arange(length)
        b["segment_ids"][row, sl] = seg
        b["advantages"][row, sl] = advantages[i]
        b["kl_gates"][row, sl] = kl_gates[i]
        b["temperatures"][row, sl] = r.temperature
        c = max(0, length - p)  # completion tokens that survived truncation
        if c:
            cs = slice(start + p, start + p + c)
            b["loss_mask"][row, cs] = True
            b["sampling_logprobs"][row, cs] = r.sampling_logprobs[:c]
            if "teacher_logprobs" in b:
                b["teacher_logprobs"][row, cs] = r.teacher_logprobs[:c]
            if topk:
                b["teacher_topk_ids"][row, cs] = np.asarray(r.teacher_topk_ids[:c], np.int32)[:, :topk]
                b["teacher_topk_logprobs"][row, cs] = np.asarray(r.teacher_topk_logprobs[:c], np.float32)[:, :topk]
    if teacher_rows:
        b.update(_teacher_rows(rollouts, bins, lengths, rows, seq_len))
    stats = PackStats(samples=n, rows=rows, filler_rows=rows - len(bins), truncated=sum(f > seq_len for f in full),
                      tokens=sum(lengths), loss_tokens=int(b["loss_mask"].sum()), seq_len=seq_len)
    return TrainBatch(**b), stats


def _teacher_rows(rollouts: Sequence[Rollout], bins, lengths, rows: int, seq_len: int) -> dict:
    """TrainBatch's teacher_* fields: each sample's teacher prompt + its (possibly truncated) completion, laid out in
    the same rows and order as its student sequence. The rows are seq_len long, or longer (a multiple of
    TEACHER_ROW_MULTIPLE) where the teacher's prompts make them so."""
    for r in rollouts:
        if not r.teacher_prompt_ids:
            raise ValueError(f"pack: rollout {r.example_id}/{r.group}: the teacher's rows need its teacher_prompt_ids")
    kept = [max(0, lengths[i] - len(r.prompt_ids)) for i, r in enumerate(rollouts)]
    t_lengths = [len(r.teacher_prompt_ids) + c for r, c in zip(rollouts, kept)]
    need = max(sum(t_lengths[i] for i in members) for members in bins)
    width = seq_len if need <= seq_len else -(-need // TEACHER_ROW_MULTIPLE) * TEACHER_ROW_MULTIPLE
    out = {k: np.zeros((rows, width), np.int32) for k in ("teacher_tokens", "teacher_positions", "teacher_segment_ids")}
    out["teacher_index"] = np.zeros((rows, seq_len), np.int32)
    student_starts = {i: start for _, _, i, start in placements(bins, lengths)}
    for row, seg, i, start in placements(bins, t_lengths):
        r, tp, c = rollouts[i], len(rollouts[i].teacher_prompt_ids), kept[i]
        sl = slice(start, start + t_lengths[i])
        out["teacher_tokens"][row, sl] = list(r.teacher_prompt_ids) + list(r.completion_ids[:c])
        out["teacher_positions"][row, sl] = np.arange(t_lengths[i])
        out["teacher_segment_ids"][row, sl] = seg
        first = student_starts[i] + len(r.prompt_ids)
        out["teacher_index"][row, first:first + c] = np.arange(start + tp, start + tp + c)
    return out
