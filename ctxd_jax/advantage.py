"""Sequence-level reward composition and group-baseline advantages (the reference's math: docs/reference.md).

The batch is contiguous groups of `group_size` samples of one prompt each. Everything is computed in float32
whatever the input dtype (sums of hundreds of log-probs lose too much in bfloat16). Taus are traced, so changing
them does not recompile; `group_size` and the booleans are static.

Deliberate difference from the fork: `adv_tau` always scales the task reward, teacher or not.
"""

import functools

import jax
import jax.numpy as jnp

from ctxd_jax.allowed import KL_NORMALIZE


def _f32(x):
    return None if x is None else jnp.asarray(x).astype(jnp.float32)


def _groups(x, group_size: int, name: str):
    if x.ndim != 1:
        raise ValueError(f"{name}: expected shape [B], got {x.shape}")
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"{name}: batch of {x.shape[0]} is not a whole number of groups of group_size={group_size}")
    return x.astype(jnp.float32).reshape(-1, group_size)


def _group_mean(x):
    """[P, G] -> [P, 1], the per-group mean kept broadcastable."""
    return x.mean(axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("group_size",))
def kl_gates(task_rewards, *, group_size: int):
    """1 - mean task reward of the sample's group, for every sample: [B] float32.

    Rewards are assumed in [0, 1] (then gates are in [0, 1]); all-incorrect groups get 1, all-correct 0.
    """
    r = _groups(task_rewards, group_size, "task_rewards")
    return jnp.broadcast_to(1.0 - _group_mean(r), r.shape).reshape(-1)


def _baseline(reward, lengths):
    """[P, G] -> [P, 1]: the group mean, or sum(R*L)/sum(L) when `lengths` is given (the plain mean for a group
    whose lengths are all 0, which has nothing to weight by)."""
    if lengths is None:
        return _group_mean(reward)
    total = lengths.sum(axis=1, keepdims=True)
    weighted = (reward * lengths).sum(axis=1, keepdims=True) / jnp.maximum(total, 1.0)
    return jnp.where(total > 0, weighted, _group_mean(reward))


def sequence_kl_terms(teacher_logprob_sums, inference_logprob_sums, completion_lengths, *, kl_normalize: str):
    """The per-sample sums (sum lpT, sum lpS) as the sequence reward uses them: unchanged ('sum', the reference), or
    divided by the completion length ('mean': per-token rates, so a longer answer pays no more KL than a short one
    at the same rate; an empty completion's terms are 0)."""
    if kl_normalize not in KL_NORMALIZE:
        raise ValueError(f"kl_normalize: {kl_normalize!r} is not one of {KL_NORMALIZE}")
    if kl_normalize == "sum":
        return teacher_logprob_sums, inference_logprob_sums
    if completion_lengths is None:
        raise ValueError("completion_lengths: required with kl_normalize='mean'")
    n = jnp.maximum(completion_lengths.astype(jnp.float32), 1.0)
    return teacher_logprob_sums / n, inference_logprob_sums / n


@functools.partial(jax.jit, static_argnames=("group_size", "use_full_reward_baseline", "kl_only_incorrect",
                                             "length_weighted_mean", "kl_normalize"))
def compute_advantages(task_rewards, teacher_logprob_sums, inference_logprob_sums, *, group_size: int,
                       adv_tau, teacher_tau, student_tau, use_full_reward_baseline: bool, kl_only_incorrect: bool,
                       completion_lengths=None, length_weighted_mean: bool = False, kl_normalize: str = "sum"):
    """Per-sample advantages A = R - b, no std normalisation: [B] float32.

    R = adv_tau*r + g*(teacher_tau*sum lpT - student_tau*sum lpS) when `use_full_reward_baseline` and a teacher
    is present (`teacher_logprob_sums` not None), else R = adv_tau*r. g = 1 - group mean(r) with
    `kl_only_incorrect`, else 1. The sums are over all completion tokens; lpS are the sampling (vLLM) log-probs.
    Without the full baseline the KL enters per token in the loss instead (see loss.compute_loss).
    b is the group mean of R, or with `length_weighted_mean` sum(R*L)/sum(L) over the group, L =
    `completion_lengths` [B] (then sum(L*A) is 0 within a group, not sum(A)).
    `kl_normalize`='mean' divides both sums by L first (sequence_kl_terms).
    """
    r = _groups(task_rewards, group_size, "task_rewards")
    reward = adv_tau * r
    if use_full_reward_baseline and teacher_logprob_sums is not None:
        if inference_logprob_sums is None:
            raise ValueError("inference_logprob_sums: required with teacher_logprob_sums and the full reward baseline")
        s_t, s_s = sequence_kl_terms(_f32(teacher_logprob_sums), _f32(inference_logprob_sums),
                                     _f32(completion_lengths), kl_normalize=kl_normalize)
        s_t = _groups(s_t, group_size, "teacher_logprob_sums")
        s_s = _groups(s_s, group_size, "inference_logprob_sums")
        if s_t.shape != r.shape or s_s.shape != r.shape:
            raise ValueError(f"logprob sums {s_t.shape}/{s_s.shape} do not match task_rewards {r.shape}")
        gate = 1.0 - _group_mean(r) if kl_only_incorrect else 1.0
        reward = reward + gate * (teacher_tau * s_t - student_tau * s_s)
    lengths = None
    if length_weighted_mean:
        if completion_lengths is None:
            raise ValueError("completion_lengths: required with length_weighted_mean")
        lengths = _groups(completion_lengths, group_size, "completion_lengths")
        if lengths.shape != r.shape:
            raise ValueError(f"completion_lengths {lengths.shape} do not match task_rewards {r.shape}")
    return (reward - _baseline(reward, lengths)).reshape(-1)
