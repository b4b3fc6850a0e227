"""Teacher scoring: the teacher's log-probs of the student's completion tokens under the teacher prompt.

The teacher prompt is the student's chat with the example's teacher context (config.teacher.context rendered for it,
envs.render_context) as the system message (the environment decides how: `Environment.teacher_messages`); without a
context the teacher scores the student's own prompt ids (plain on-policy distillation). Prompts are rendered here with the HF tokenizer's chat template and sent as token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ctxd_jax.envs import render_context
from ctxd_jax.inference.client import Client


@dataclass
class TeacherScores:
    """Aligned with the student's completion tokens: one entry per completion token."""

    logprobs: list[float]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


def render_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Chat-template token ids of `messages` followed by the assistant header (transformers 5 API)."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
    return [int(i) for i in ids]


def teacher_prompt_ids(tokenizer, env, example, context: str | None, student_prompt_ids: Sequence[int]) -> list[int]:
    """The teacher's prompt: the student's own ids without a context, else the env's teacher messages rendered.
    `context` is config.teacher.context, a template for the example's own."""
    context = render_context(context, example)
    if not context:
        return list(student_prompt_ids)
    return render_prompt(tokenizer, env.teacher_messages(example, context))


async def score_completion(client: Client, *, model: str, teacher_prompt_ids: Sequence[int],
                           completion_ids: Sequence[int], topk: int = 0) -> TeacherScores:
    """Teacher log-probs of `completion_ids` following `teacher_prompt_ids` (prompt_logprobs, one request)."""
    if not completion_ids:
        return TeacherScores([], [] if topk else None, [] if topk else None)
    if not teacher_prompt_ids:
        raise ValueError("teacher prompt is empty: the first completion token would have no log-prob")
    ids = list(teacher_prompt_ids) + list(completion_ids)
    logprobs, top = await client.score(ids, len(teacher_prompt_ids), model=model, topk=topk)
    return TeacherScores(logprobs, *(top if top else (None, None)))
