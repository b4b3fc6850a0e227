"""Evaluation on the eval split: the student (no context) and the teacher (with its context), `samples` samples a
prompt (one sample is a noisy reading of a prompt)."""

from __future__ import annotations

import asyncio
from typing import Sequence

import numpy as np

from ctxd_jax.envs import Example
from ctxd_jax.inference.client import Client
from ctxd_jax.inference.teacher import render_prompt, teacher_prompt_ids
from ctxd_jax.rewards import score


async def evaluate(env, tokenizer, examples: Sequence[Example], client: Client, *, model: str, max_tokens: int,
                   temperature: float, seed: int, context: str | None = None, samples: int = 1,
                   reward_errors: str = "stop") -> dict[str, float]:
    """Mean task reward of `samples` samples per example; with `context` (config.teacher.context: a template, '' for
    the examples' own contexts), under the teacher prompt."""
    prompts = [render_prompt(tokenizer, ex.messages) for ex in examples]
    if context is not None:
        prompts = [teacher_prompt_ids(tokenizer, env, ex, context, p) for ex, p in zip(examples, prompts)]
    outs = await asyncio.gather(*(client.sample(p, samples, model=model, max_tokens=max_tokens, temperature=temperature,
                                                seed=seed + i) for i, p in enumerate(prompts)))
    rewards = [score(env, ex, tokenizer.decode(c.token_ids, skip_special_tokens=True), reward_errors)[0]
               for ex, o in zip(examples, outs) for c in o]
    lengths = [len(c.token_ids) for o in outs for c in o]
    return {"reward": float(np.mean(rewards)), "completion_len": float(np.mean(lengths)), "n": len(examples)}


def baseline_table(results: dict[str, dict[str, float]]) -> str:
    """A small text table of {who: {'reward', 'completion_len', 'n'}}."""
    lines = [f"{'eval baseline':<28}{'reward':>8}{'len':>8}{'n':>6}"]
    for who, r in results.items():
        lines.append(f"{who:<28}{r['reward']:>8.3f}{r['completion_len']:>8.1f}{r['n']:>6d}")
    return "\n".join(lines)
