"""The importance-weighted policy-gradient loss with off-policy masking, per-token KL and top-k distillation.

Math: docs/reference.md, "Loss". All per-token inputs are [R, T]: R rows that are either one sample each
(`segment_ids=None`) or packed rows of several samples told apart by `segment_ids` (0 = padding; a row's samples
carry distinct ids in 1..T, e.g. 1, 2, 3, ...). Per-sample reductions (geometric and sequence masks,
teacher_seq_kl, the sequence ratio and its token count) are segment reductions over a flattened (row, segment) id,
so packed and unpacked batches give the same loss and gradients for the same `loss_scale` (the default one counts
rows with sequence ratios, so there it differs). Per-sample scalars (advantages, kl_gates) come already broadcast
to every token. Inputs may be float32 or bfloat16; the math is done in float32.
"""

import functools

import jax
import jax.numpy as jnp

from ctxd_jax.allowed import RATIO_TYPES
from ctxd_jax.divergence import token_divergence

_NEG = -1e9  # stands in for -inf log-probs so that 0 * log 0 stays 0 (and its gradient finite)
_SEQ_LOG_RATIO_MAX = 10.0  # a sample's summed log-ratio is capped here before exp (as the reference does): finite


def _f32(x):
    return None if x is None else jnp.asarray(x).astype(jnp.float32)


def _sample_index(shape, segment_ids):
    """Each token's sample within its row [R, T] and the samples a row can hold: one per row, or one per segment id
    (0..T). Samples never span rows, so per-sample reductions run row by row: rows sharded over devices stay local."""
    if segment_ids is None:
        return jnp.zeros(shape, jnp.int32), 1
    if segment_ids.shape != shape:
        raise ValueError(f"segment_ids: shape {segment_ids.shape} does not match the per-token inputs {shape}")
    return jnp.asarray(segment_ids).astype(jnp.int32), shape[1] + 1


def default_loss_scale(loss_mask, segment_ids=None, *, ratio_type: str = "token"):
    """The loss's default divisor (at least 1): the number of loss-mask tokens with token ratios; with sequence
    ratios, whose samples are already token means, the number of rows holding any (the reference divides by its
    packed micro-batches, one row each). Takes numpy (the trainer, whole batch) or jax arrays."""
    return jnp.maximum(jnp.asarray(loss_count(loss_mask, segment_ids, ratio_type=ratio_type), jnp.float32), 1.0)


def loss_count(loss_mask, segment_ids=None, *, ratio_type: str = "token"):
    """What default_loss_scale counts (rows of a batch add up: several processes sum their rows' counts)."""
    m = loss_mask if segment_ids is None else loss_mask & (segment_ids > 0)
    return m.any(axis=1).sum() if ratio_type == "sequence" else m.sum()


def gather_topk(logits, topk_ids):
    """Values of `logits` [R, T, V] at `topk_ids` [R, T, k] -> [R, T, k].

    Raw logits suffice for `topk_kl` (renormalising on the support cancels the softmax normaliser), so the trainer
    can also form them as hidden @ unembedding[topk_ids] without the [R, T, V] tensor.
    """
    return jnp.take_along_axis(logits, topk_ids.astype(jnp.int32), axis=-1)


@functools.partial(jax.jit, static_argnames=("direction",))
def topk_kl(student_topk_logprobs, teacher_topk_logprobs, mask, *, direction: str = "forward", beta=0.5):
    """Per-token divergence on the teacher's top-k support, both distributions renormalised on it: [R, T] float32.

    forward = KL(teacher || student) (mode covering), reverse = KL(student || teacher), jsd = the generalised JSD
    with weight `beta` (ctxd_jax.divergence). The teacher side is stop-gradient. Tokens outside `mask` are 0 and
    their inputs may hold anything (even -inf or NaN).
    """
    if student_topk_logprobs.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"student_topk_logprobs {student_topk_logprobs.shape} and teacher_topk_logprobs "
                         f"{teacher_topk_logprobs.shape} differ")
    m = jnp.asarray(mask).astype(bool)[..., None]
    s = jnp.where(m, jnp.maximum(_f32(student_topk_logprobs), _NEG), 0.0)
    t = jnp.where(m, jnp.maximum(_f32(jax.lax.stop_gradient(teacher_topk_logprobs)), _NEG), 0.0)
    s = jax.nn.log_softmax(s, axis=-1)
    t = jax.nn.log_softmax(t, axis=-1)
    return jnp.where(m[..., 0], token_divergence(s, t, direction=direction, beta=beta), 0.0)


@functools.partial(jax.jit, static_argnames=("use_full_reward_baseline", "topk_direction", "ratio_type"))
def compute_loss(trainer_logprobs, inference_logprobs, teacher_logprobs, advantages, kl_gates, loss_mask, *,
                 teacher_tau, student_tau, use_full_reward_baseline: bool,
                 token_mask_low=0.125, token_mask_high=8.0, geo_mask_low=0.1, geo_mask_high=10.0,
                 sequence_mask_low=0.0, sequence_mask_high=100.0,
                 segment_ids=None, loss_scale=None,
                 student_topk_logprobs=None, teacher_topk_logprobs=None, topk_tau=0.0,
                 topk_direction: str = "forward", ratio_type: str = "token", sequence_clip_high=10.0, kl_tau=0.0,
                 jsd_beta=0.5, full_vocab_kl=None):
    """Loss (scalar float32) and metrics (dict of float32 scalars) for one micro-batch of [R, T] tokens.

    Metrics are means over this call's loss-mask tokens (or samples, for geo_seq_ratio, sequence_ratio and
    teacher_seq_kl);
    num_loss_tokens and num_samples are returned so that callers can weight them across micro-batches.

    trainer_logprobs carry the gradient; inference_logprobs are vLLM's sampling log-probs; teacher_logprobs
    (or None) the teacher's; advantages the per-sample A (already scaled by adv_tau) broadcast per token;
    kl_gates (or None = 1) per token; loss_mask marks completion tokens that are trained on.

    Per-token advantage: A with the full reward baseline (kl_gates unused), else
    A + g*(teacher_tau*lpT - student_tau*sg(lp)) (no KL term at all when teacher_logprobs is None).
    Gradient: -sum over kept tokens of c*grad(lp), c = ratio*(Ahat - kl_tau*log r), divided by `loss_scale`
    (default `default_loss_scale` of this call: its loss-mask tokens, dropped ones included; pass the whole batch's
    when accumulating micro-batches). ratio_type 'token': ratio = r per token; 'sequence': one stop-gradient ratio
    per sample, min(exp(min(sum of its log r, 10)), sequence_clip_high), and c divided by the sample's loss-mask
    token count.
    Optional top-k distillation adds topk_tau * sum over loss-mask tokens of topk_kl / loss_scale (each token's
    topk_kl over its sample's loss-token count with sequence ratios), differentiated directly through
    student_topk_logprobs. `full_vocab_kl` [R, T] (the divergence over the whole vocabulary per token, differentiable
    in the student: ctxd_jax.divergence.hidden_divergence) takes the top-k divergence's place.
    """
    lp = _f32(trainer_logprobs)
    shape = lp.shape
    if lp.ndim != 2:
        raise ValueError(f"trainer_logprobs: expected [R, T], got {shape}")
    for name, x in (("inference_logprobs", inference_logprobs), ("teacher_logprobs", teacher_logprobs),
                    ("loss_mask", loss_mask), ("advantages", advantages), ("kl_gates", kl_gates)):
        if x is not None and jnp.shape(x) != shape:
            raise ValueError(f"{name}: shape {jnp.shape(x)} does not match trainer_logprobs {shape}")
    if (student_topk_logprobs is None) != (teacher_topk_logprobs is None):
        raise ValueError("student_topk_logprobs and teacher_topk_logprobs: pass both or neither")

    if ratio_type not in RATIO_TYPES:
        raise ValueError(f"ratio_type: {ratio_type!r} is not one of {RATIO_TYPES}")

    m = jnp.asarray(loss_mask).astype(bool)
    if segment_ids is not None:
        m = m & (jnp.asarray(segment_ids) > 0)
    mf = m.astype(jnp.float32)
    n_tokens = mf.sum()
    denom = jnp.maximum(n_tokens, 1.0)
    if loss_scale is None:
        scale = default_loss_scale(m, ratio_type=ratio_type)
    else:
        scale = jnp.asarray(loss_scale, jnp.float32)
    ids, n_ids = _sample_index(shape, segment_ids)

    def per_sample(values, reduce=jax.ops.segment_sum):  # [R, T] -> [R, samples a row can hold]
        return jax.vmap(lambda v, i: reduce(v, i, num_segments=n_ids))(values, ids)

    def per_token(sample_values):
        return jnp.take_along_axis(sample_values, ids, axis=1)

    def token_mean(x):
        return jnp.sum(jnp.where(m, x, 0.0)) / denom

    # Off-policy masks: masked-out (non loss-mask) tokens never trigger, their log-ratio is zeroed first.
    log_ratio = jnp.where(m, jax.lax.stop_gradient(lp) - _f32(inference_logprobs), 0.0)
    ratio = jnp.exp(log_ratio)
    token_low = m & (ratio < token_mask_low)
    token_high = m & (ratio > token_mask_high)
    count = per_sample(mf)
    geo_ratio = jnp.exp(per_sample(log_ratio) / jnp.maximum(count, 1.0))
    geo_bad = (count > 0) & ((geo_ratio < geo_mask_low) | (geo_ratio > geo_mask_high))
    r_min = per_sample(jnp.where(m, ratio, jnp.inf), jax.ops.segment_min)
    r_max = per_sample(jnp.where(m, ratio, -jnp.inf), jax.ops.segment_max)
    seq_bad = (count > 0) & ((r_min < sequence_mask_low) | (r_max > sequence_mask_high))
    geo_masked = m & per_token(geo_bad)
    seq_masked = m & per_token(seq_bad)
    keep = m & ~(token_low | token_high | geo_masked | seq_masked)

    task_adv = _f32(advantages)
    kl_term = jnp.zeros(shape, jnp.float32)
    teacher_lp = _f32(teacher_logprobs)
    if not use_full_reward_baseline and teacher_lp is not None:
        gate = 1.0 if kl_gates is None else _f32(kl_gates)
        kl_term = gate * (teacher_tau * teacher_lp - student_tau * jax.lax.stop_gradient(lp))
    adv_hat = task_adv + kl_term

    # With sequence ratios a sample's loss (top-k term included) is a mean over its loss tokens.
    per_token_share = per_token(1.0 / jnp.maximum(count, 1.0)) if ratio_type == "sequence" else 1.0
    if ratio_type == "sequence":
        seq_ratio = jnp.minimum(jnp.exp(jnp.minimum(per_sample(log_ratio), _SEQ_LOG_RATIO_MAX)), sequence_clip_high)
        weight = per_token(seq_ratio) * per_token_share
    else:
        weight = ratio
    coeff = jax.lax.stop_gradient(jnp.where(keep, weight * (adv_hat - kl_tau * log_ratio), 0.0))
    loss = -jnp.sum(jnp.where(keep, coeff * lp, 0.0)) / scale

    n_samples = jnp.sum(count > 0).astype(jnp.float32)  # samples with at least one loss-mask token
    metrics = {
        "num_loss_tokens": n_tokens,
        "num_samples": n_samples,
        "mismatch_kl": token_mean(ratio - log_ratio - 1.0),
        "ratio_mean": token_mean(ratio),
        "masked_token_low": token_mean(token_low.astype(jnp.float32)),
        "masked_token_high": token_mean(token_high.astype(jnp.float32)),
        "masked_geo": token_mean(geo_masked.astype(jnp.float32)),
        "masked_sequence": token_mean(seq_masked.astype(jnp.float32)),
        "masked_total": token_mean((m & ~keep).astype(jnp.float32)),
        "geo_seq_ratio": jnp.sum(jnp.where(count > 0, geo_ratio, 0.0)) / jnp.maximum(n_samples, 1.0),
        "combined_advantage": token_mean(adv_hat),
        "task_adv_abs": token_mean(jnp.abs(task_adv)),
        "kl_contrib_abs": token_mean(jnp.abs(kl_term)),
    }
    if ratio_type == "sequence":  # the capped per-sample ratio, mean over samples
        metrics["sequence_ratio"] = jnp.sum(jnp.where(count > 0, seq_ratio, 0.0)) / jnp.maximum(n_samples, 1.0)
    if teacher_lp is not None:
        diff = jnp.sum(jnp.where(m, teacher_lp - jax.lax.stop_gradient(lp), 0.0))
        metrics["teacher_kl"] = diff / denom
        metrics["teacher_seq_kl"] = diff / jnp.maximum(n_samples, 1.0)  # mean over samples of the sums
    kl = None
    if student_topk_logprobs is not None:
        kl = topk_kl(student_topk_logprobs, teacher_topk_logprobs, m, direction=topk_direction, beta=jsd_beta)
    elif full_vocab_kl is not None:
        kl = jnp.where(m, _f32(full_vocab_kl), 0.0)
    if kl is not None:
        loss = loss + topk_tau * jnp.sum(kl * per_token_share) / scale
        metrics["topk_kl"] = jnp.sum(kl) / denom
    return loss, metrics
