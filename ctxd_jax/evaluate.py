"""Evaluation on the eval split: the student (no context) and the teacher (with its context), `samples` samples a
prompt (one sample is a noisy reading of a prompt). Several processes evaluate by blocks of the examples and average
over all of them."""

from __future__ import annotations

import asyncio
from typing import Sequence

import jax
import numpy as np

from ctxd_jax import distributed

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


def block(examples, seed: int) -> tuple[list, int]:
    """Several processes evaluate by blocks: this process's block of `examples`, and the seed one process gives its
    first example."""
    size = -(-len(examples) // jax.process_count())
    first = jax.process_index() * size
    return list(examples[first:first + size]), seed + first


async def mean_over_processes(results: dict[str, dict]) -> dict[str, dict]:
    """evaluate's means ({} for an empty block) of every process's block, as one process's over all the examples."""
    keys = ("reward", "completion_len")
    sums = {f"{name}/{k}": r.get(k, 0.0) * r.get("n", 0) for name, r in results.items() for k in keys}
    sums.update({f"{name}/n": r.get("n", 0) for name, r in results.items()})
    total = await asyncio.to_thread(distributed.reduce, sums)
    return {name: {**{k: total[f"{name}/{k}"] / total[f"{name}/n"] for k in keys}, "n": int(total[f"{name}/n"])}
            for name in results}


async def eval_baseline(config, src, examples, student_model: str,
                        teacher_sampler: tuple | None) -> dict[str, dict[str, float]]:
    """The student without context (its initial adapter is the identity) and, if there is one, the teacher with its
    context (`teacher_sampler`: its client and model name)."""
    runs = {"student": (src.student, student_model, None)}
    if teacher_sampler is not None:
        runs["teacher"] = (*teacher_sampler, src.context)
    return await evaluate_over_processes(config, src, examples, runs)


async def evaluate_over_processes(config, src, examples, runs: dict[str, tuple]) -> dict[str, dict[str, float]]:
    """evaluate's means of each of `runs` ({name: (client, model, context)}) over `examples`, at the run's sampling
    settings; several processes: each evaluates its block of the examples, and every one gets the means over all."""
    mine, seed = block(examples, config.seed)
    kw = dict(max_tokens=config.sampling.max_tokens, temperature=config.sampling.temperature, seed=seed,
              samples=config.eval.samples, reward_errors=src.reward_errors)
    results = {name: {} for name in runs}  # an empty block: nothing to evaluate here
    if mine:
        done = await asyncio.gather(*(evaluate(src.env, src.tokenizer, mine, client, model=model, context=context,
                                               **kw) for client, model, context in runs.values()))
        results = dict(zip(runs, done))
    return await mean_over_processes(results)
