"""The parts of one step's rollouts: seeded prompts, student samples, verification, teacher log-probs, advantages.

Prompts are drawn by a data position (prompts consumed so far) through one seeded permutation per epoch, and each
group's sampling seed comes from the run's RNG key folded with the step, so a resumed run draws exactly what an
uninterrupted one would. The batch is contiguous groups of `rollouts_per_example`. Each group is sampled, verified
and scored on its own (ctxd_jax/pipeline.py streams them).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np

from ctxd_jax.advantage import compute_advantages, kl_gates
from ctxd_jax.envs import Environment, Example
from ctxd_jax.inference.client import Client
from ctxd_jax.inference.teacher import render_prompt, score_completion, teacher_prompt_ids
from ctxd_jax.records import Rollout
from ctxd_jax.rewards import score


@dataclass
class Sources:
    """Everything rollouts are made from; built once per run by the loop."""

    env: Environment
    tokenizer: object
    train: Sequence[Example]
    student: Client
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
    vllm_logprobs: bool = True  # False: the trainer computes the behaviour log-probs (sampling.logprobs='trainer')
    reward_errors: str = "stop"  # env.reward_errors: what a failed reward does (ctxd_jax/rewards.py)


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


async def sample_group(src: Sources, example: Example, group: int, seed: int, *, model: str, version: int,
                       logprobs: bool = True) -> list[Rollout]:
    """`group_size` student samples of one example (one request, n = group_size, seeded) from `model`; without
    `logprobs`, their sampling_logprobs are None (for the trainer to fill)."""
    prompt = render_prompt(src.tokenizer, example.messages)
    comps = await src.student.sample(prompt, src.group_size, model=model, max_tokens=src.max_tokens,
                                     temperature=src.temperature, seed=seed, logprobs=logprobs)
    return [Rollout(example_id=example.id, group=group, prompt_ids=prompt, completion_ids=c.token_ids,
                    sampling_logprobs=c.logprobs, finish_reason=c.finish_reason, temperature=src.temperature,
                    policy_version=version) for c in comps]


async def sample(src: Sources, examples: Sequence[Example], seeds: Sequence[int], *, model: str,
                 version: int) -> list[Rollout]:
    """The groups of `examples`, sampled concurrently, in order."""
    groups = await asyncio.gather(*(sample_group(src, ex, g, s, model=model, version=version)
                                    for g, (ex, s) in enumerate(zip(examples, seeds))))
    return [r for group in groups for r in group]


def verify(src: Sources, example: Example, rollouts: Sequence[Rollout]) -> None:
    """Sets the task reward of each rollout of `example`'s group (0 for all with skip_verification); a failed reward
    raises RewardError or scores 0 (src.reward_errors)."""
    for r in rollouts:
        if not src.skip_verification:
            text = src.tokenizer.decode(r.completion_ids, skip_special_tokens=True)
            r.reward, r.reward_error = score(src.env, example, text, src.reward_errors)


async def score_group(src: Sources, example: Example, rollouts: Sequence[Rollout]) -> None:
    """Fills the teacher log-probs (and top-k) of one group's completions under the teacher prompt (vLLM)."""
    prompt = teacher_prompt_ids(src.tokenizer, src.env, example, src.context, rollouts[0].prompt_ids)
    # The client bounds the requests in flight (and serialises them where the server needs it).
    scores = await asyncio.gather(*(
        score_completion(src.teacher, model=src.teacher_model, teacher_prompt_ids=prompt,
                         completion_ids=r.completion_ids, topk=src.topk) for r in rollouts))
    for r, s in zip(rollouts, scores):
        r.teacher_logprobs, r.teacher_topk_ids, r.teacher_topk_logprobs = s.logprobs, s.topk_ids, s.topk_logprobs


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
                             length_weighted_mean=advantage.length_weighted_mean,
                             kl_normalize=advantage.kl_normalize)
    gates = kl_gates(rewards, group_size=group_size) if advantage.kl_only_incorrect else np.ones_like(rewards)
    return np.asarray(adv), np.asarray(gates)


def rollout_totals(rollouts: Sequence[Rollout], group_size: int) -> dict[str, float]:
    """The sums that rollout_metrics reads (and the longest completion, "length_max"): several processes add up
    theirs (ctxd_jax/distributed.py `reduce`), a fixed handful of numbers whatever the batch."""
    rewards = np.asarray([r.reward for r in rollouts], np.float64).reshape(-1, group_size)
    lengths = np.asarray([len(r.completion_ids) for r in rollouts], np.float64)
    out = {"samples": rewards.size, "groups": rewards.shape[0], "reward": rewards.sum(),
           "reward_sq": np.square(rewards).sum(), "any_solved": (rewards > 0).any(axis=1).sum(),
           "all_solved": (rewards > 0).all(axis=1).sum(), "length": lengths.sum(), "length_max": lengths.max(),
           "truncated": sum(r.finish_reason == "length" for r in rollouts),
           "errors": sum(r.reward_error for r in rollouts)}
    if rollouts[0].teacher_logprobs is not None:
        # sum over the completion of (lp_sampling - lp_teacher): a one-sample estimate of KL(student || teacher)
        out["kl_gap"] = sum(sum(r.sampling_logprobs) - sum(r.teacher_logprobs) for r in rollouts)
    return {k: float(v) for k, v in out.items()}


def rollout_metrics(rollouts: Sequence[Rollout], group_size: int, totals: dict | None = None) -> dict[str, float]:
    """Task reward (mean, per-group solve rates), completion lengths, truncation, sequence teacher KL; of
    `totals` (rollout_totals, summed over processes) where given."""
    t = rollout_totals(rollouts, group_size) if totals is None else totals
    n, groups = t["samples"], t["groups"]
    mean = t["reward"] / n
    out = {"reward/mean": mean, "reward/std": np.sqrt(max(t["reward_sq"] / n - mean * mean, 0.0)),
           "reward/group_any_solved": t["any_solved"] / groups, "reward/group_all_solved": t["all_solved"] / groups,
           "completion_len/mean": t["length"] / n, "completion_len/max": t["length_max"],
           "truncated_frac": t["truncated"] / n, "reward/errors": t["errors"]}
    if "kl_gap" in t:
        out["teacher_kl/seq"] = t["kl_gap"] / n
    return {k: float(v) for k, v in out.items()}
