"""Records that cross module borders: what the student server returns and what the trainer packs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Completion:
    """One sampled completion as the student server returns it."""

    token_ids: list[int]
    logprobs: list[float] | None  # None when not asked for
    finish_reason: str


@dataclass
class Rollout:
    """One sample of a step: prompt, completion, sampling log-probs, reward and teacher log-probs.

    `group` is the index of the prompt within the step; a batch is contiguous groups of rollouts_per_example.
    Teacher fields are aligned with `completion_ids` (one entry per completion token).
    """

    example_id: str
    group: int
    prompt_ids: list[int]
    completion_ids: list[int]
    sampling_logprobs: list[float]
    finish_reason: str
    temperature: float = 1.0
    reward: float = 0.0
    reward_error: bool = False  # the reward function failed and the sample scored 0 (env.reward_errors='zero')
    policy_version: int = 0
    teacher_logprobs: list[float] | None = None
    # [n][k] lists from a vLLM teacher, [n, k] numpy arrays from the trainer's (packing takes either).
    teacher_topk_ids: list[list[int]] | np.ndarray | None = None
    teacher_topk_logprobs: list[list[float]] | np.ndarray | None = None
    # The teacher's prompt, where the trainer runs the teacher inside the train step (full-vocabulary KL).
    teacher_prompt_ids: list[int] | None = None
