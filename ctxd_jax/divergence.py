"""Distillation divergences between the teacher's and the student's next-token distributions, over the whole
vocabulary (or any support the caller normalised on): forward KL(teacher || student), reverse KL(student || teacher),
and the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024),

    JSD_beta = beta * KL(teacher || M) + (1 - beta) * KL(student || M),   M = beta * teacher + (1 - beta) * student,

which is 0 only when the two agree and at most the entropy of a beta coin, -beta log beta - (1 - beta) log(1 - beta);
JSD_beta / beta tends to the forward KL as beta -> 0 and JSD_beta / (1 - beta) to the reverse KL as beta -> 1.

The teacher side is always stop-gradient. `hidden_divergence` forms both distributions from final hidden states
and the LM head in chunks of positions (ctxd_jax.models.logprobs.map_row_chunks), so neither [tokens, vocab] array
exists at once, in the forward or the backward pass.
"""

import functools

import jax
import jax.numpy as jnp

from ctxd_jax.allowed import TOPK_DIRECTIONS
from ctxd_jax.models.logprobs import map_row_chunks


def token_divergence(student_logprobs, teacher_logprobs, *, direction: str, beta=0.5):
    """Per position divergence of normalised log-probs [..., V] (float32): [...]. `beta` in (0, 1), jsd only."""
    if direction not in TOPK_DIRECTIONS:
        raise ValueError(f"direction: {direction!r} is not one of {TOPK_DIRECTIONS}")
    s = student_logprobs.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_logprobs.astype(jnp.float32))

    def kl(lp, lq):  # KL(p || q) from log-probs
        return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)

    if direction == "forward":
        return kl(t, s)
    if direction == "reverse":
        return kl(s, t)
    log_m = jnp.logaddexp(jnp.log(beta) + t, jnp.log1p(-beta) + s)
    return beta * kl(t, log_m) + (1.0 - beta) * kl(s, log_m)


@functools.partial(jax.jit, static_argnames=("direction",))
def logits_divergence(student_logits, teacher_logits, *, direction: str, beta=0.5):
    """token_divergence of the softmax of raw logits [..., V]."""
    return token_divergence(jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1),
                            jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1),
                            direction=direction, beta=beta)


def hidden_divergence(student_hidden, teacher_hidden, head_kernel, temperatures, teacher_index, *, chunk_size: int,
                      direction: str, beta=0.5):
    """Full-vocabulary divergence at every position of packed student rows: [B, T] float32.

    student_hidden [B, T, D] (the student's rows: position t is predicted from hidden t-1 at temperatures[b, t]);
    teacher_hidden [B, Tt, D] (the teacher's rows: its prompt + the same completions, at temperature 1);
    teacher_index [B, T]: where student token t sits in the teacher's row (>= 1), 0 where there is nothing to
    compare (prompt, padding). Zero at t = 0 and wherever teacher_index is 0."""
    at = teacher_index[:, 1:]
    hs = student_hidden[:, :-1]
    # Gathers along each row, not by (row, position) pairs: rows sharded over devices stay on them.
    ht = jnp.take_along_axis(jax.lax.stop_gradient(teacher_hidden), jnp.maximum(at - 1, 0)[..., None], axis=1)
    w = head_kernel

    def body(hs, ht, temps):
        ls = jnp.dot(hs, w.astype(hs.dtype), preferred_element_type=jnp.float32) / temps[..., None]
        lt = jnp.dot(ht, w.astype(ht.dtype), preferred_element_type=jnp.float32)
        return (logits_divergence(ls, lt, direction=direction, beta=beta),)

    (d,) = map_row_chunks(body, (hs, ht, temperatures[:, 1:].astype(jnp.float32)), chunk_size=chunk_size,
                          pad_values=(0, 0, 1.0))
    return jnp.pad(jnp.where(at > 0, d, 0.0), ((0, 0), (1, 0)))
