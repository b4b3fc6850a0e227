"""Producing one step's rollouts: seeded prompts, student samples, verification, teacher log-probs, advantages.

Prompts are drawn by a data position (prompts consumed so far) through one seeded permutation per epoch, and each
group's sampling seed comes from the run's RNG key folded with the step, so a resumed run draws exactly what an
uninterrupted one would. The batch is contiguous groups of `rollouts_per_example` (prime-rl-notes §10.1).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np

from ctxd_jax.advantage import compute_advantages, kl_gates
from ctxd_jax.envs import Environment, Example
from ctxd_jax.inference.client import Client
from ctxd_jax.inference.teacher import render_prompt, score_completion, teacher_prompt_ids
from ctxd_jax.records import Rollout


@dataclass
class Sources:
    """Everything rollouts are made from; built once per run by the loop."""

    env: Environment
    tokenizer: object
    train: Sequence[Example]
    student: Client
    student_model: str
    teacher: Client | None
    teacher_model: str | None
    context: str
    max_tokens: int
    temperature: float
    group_size: int
    prompts_per_step: int
    seed: int
    topk: int = 0
    skip_verification: bool = False


def prompt_indices(position: int, count: int, num_examples: int, seed: int) -> list[int]:
    """Indices into the train split of the prompts at data positions [position, position + count): each epoch
    of `num_examples` prompts is one permutation seeded by (seed, epoch)."""
    out, perms = [], {}
    for p in range(position, position + count):
        epoch, i = divmod(p, num_examples)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(num_examples)
        out.append(int(perms[epoch][i]))
    return out


def group_seeds(rng_key, step: int, count: int) -> list[int]:
    """One vLLM sampling seed per group of `step`, from the run's RNG key."""
    key = jax.random.fold_in(rng_key, step)
    return [int(s) for s in jax.random.randint(key, (count,), 0, 2**31 - 1)]


def step_examples(src: Sources, position: int) -> list[Example]:
    """The train examples of one step: the `prompts_per_step` prompts at data `position`."""
    return [src.train[i] for i in prompt_indices(position, src.prompts_per_step, len(src.train), src.seed)]


async def sample(src: Sources, examples: Sequence[Example], seeds: Sequence[int], *, version: int) -> list[Rollout]:
    """`group_size` student samples of each example (one request each, n = group_size, seeded)."""
    prompts = [render_prompt(src.tokenizer, ex.messages) for ex in examples]
    groups = await asyncio.gather(*(
        src.student.sample(p, src.group_size, model=src.student_model, max_tokens=src.max_tokens,
                           temperature=src.temperature, seed=s) for p, s in zip(prompts, seeds)))
    return [Rollout(example_id=ex.id, group=g, prompt_ids=p, completion_ids=c.token_ids, sampling_logprobs=c.logprobs,
                    finish_reason=c.finish_reason, temperature=src.temperature, policy_version=version)
            for g, (ex, p, comps) in enumerate(zip(examples, prompts, groups)) for c in comps]


def verify(src: Sources, examples: Sequence[Example], rollouts: list[Rollout]) -> None:
    """Sets each rollout's task reward (0 for all with skip_verification)."""
    for r in rollouts:
        if src.skip_verification:
            r.reward = 0.0
        else:
            text = src.tokenizer.decode(r.completion_ids, skip_special_tokens=True)
            r.reward = float(src.env.reward(examples[r.group], text))


async def score_teacher(src: Sources, examples: Sequence[Example], rollouts: list[Rollout]) -> None:
    """Fills teacher log-probs (and top-k) of every rollout's completion under the teacher prompt."""
    if src.teacher is None:
        return
    prompts = [teacher_prompt_ids(src.tokenizer, src.env, ex, src.context, r.prompt_ids)
               for ex, r in zip(examples, rollouts[::src.group_size])]
    # The client bounds the requests in flight (and serialises them where the server needs it).
    scores = await asyncio.gather(*(
        score_completion(src.teacher, model=src.teacher_model, teacher_prompt_ids=prompts[r.group],
                         completion_ids=r.completion_ids, topk=src.topk) for r in rollouts))
    for r, s in zip(rollouts, scores):
        r.teacher_logprobs, r.teacher_topk_ids, r.teacher_topk_logprobs = s.logprobs, s.topk_ids, s.topk_logprobs


async def produce(src: Sources, rng_key, step: int, position: int, *,
                  version: int) -> tuple[list[Rollout], dict[str, float]]:
    """The rollouts of `step` from the prompts at data `position`: sampled, verified, teacher-scored; and the
    seconds each phase took ({'time/sample', 'time/verify', 'time/teacher'})."""
    examples = step_examples(src, position)
    t0 = time.perf_counter()
    rollouts = await sample(src, examples, group_seeds(rng_key, step, len(examples)), version=version)
    t1 = time.perf_counter()
    verify(src, examples, rollouts)
    t2 = time.perf_counter()
    await score_teacher(src, examples, rollouts)
    times = {"time/sample": t1 - t0, "time/verify": t2 - t1, "time/teacher": time.perf_counter() - t2}
    return rollouts, times


def advantages(rollouts: Sequence[Rollout], *, group_size: int, loss, advantage) -> tuple[np.ndarray, np.ndarray]:
    """(advantages [B], kl gates [B]) from config.loss / config.advantage (jitted math of ctxd_jax.advantage)."""
    rewards = np.asarray([r.reward for r in rollouts], np.float32)
    teacher = rollouts[0].teacher_logprobs is not None
    t_sums = np.asarray([sum(r.teacher_logprobs) for r in rollouts], np.float32) if teacher else None
    s_sums = np.asarray([sum(r.sampling_logprobs) for r in rollouts], np.float32)
    lengths = np.asarray([len(r.completion_ids) for r in rollouts], np.float32)
    adv = compute_advantages(rewards, t_sums, s_sums, group_size=group_size, adv_tau=loss.adv_tau,
                             teacher_tau=loss.teacher_tau, student_tau=loss.student_tau,
                             use_full_reward_baseline=advantage.use_full_reward_baseline,
                             kl_only_incorrect=advantage.kl_only_incorrect, completion_lengths=lengths,
                             length_weighted_mean=advantage.length_weighted_mean)
    gates = kl_gates(rewards, group_size=group_size) if advantage.kl_only_incorrect else np.ones_like(rewards)
    return np.asarray(adv), np.asarray(gates)


def rollout_metrics(rollouts: Sequence[Rollout], group_size: int) -> dict[str, float]:
    """Task reward (mean, per-group solve rates), completion lengths, truncation, sequence teacher KL."""
    rewards = np.asarray([r.reward for r in rollouts], np.float64).reshape(-1, group_size)
    lengths = np.asarray([len(r.completion_ids) for r in rollouts], np.float64)
    out = {"reward/mean": rewards.mean(), "reward/std": rewards.std(),
           "reward/group_any_solved": float(np.mean((rewards > 0).any(axis=1))),
           "reward/group_all_solved": float(np.mean((rewards > 0).all(axis=1))),
           "completion_len/mean": lengths.mean(), "completion_len/max": lengths.max(),
           "truncated_frac": float(np.mean([r.finish_reason == "length" for r in rollouts]))}
    if rollouts[0].teacher_logprobs is not None:
        # sum over the completion of (lp_sampling - lp_teacher): a one-sample estimate of KL(student || teacher)
        gaps = [sum(r.sampling_logprobs) - sum(r.teacher_logprobs) for r in rollouts]
        out["teacher_kl/seq"] = float(np.mean(gaps))
    return {k: float(v) for k, v in out.items()}
