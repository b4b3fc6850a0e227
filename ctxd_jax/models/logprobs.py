"""Per-token log-probs and entropies (and optionally the top-k) from the final hidden states, in chunks of tokens.

Logits exist one chunk at a time ([chunk, V] float32) and each chunk is rematerialised in the backward pass, so
neither the forward nor the gradient holds [B*T, V] float32.
"""

import jax
import jax.numpy as jnp


def _chunk_stats(h, w, targets, temps, ids, topk, entropy=True):
    """h [C, D], w [D, V], targets [C], temps [C], ids [C, k] -> logprob [C], entropy [C] (if `entropy`), logprob
    at ids [C, k] [+ the `topk` most likely ids [C, topk] and their log-probs, best first]."""
    logits = jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32) / temps[:, None]
    lse = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - lse
    out = (logp,)
    if entropy:
        probs = jnp.exp(logits - lse[:, None])
        out += (lse - jnp.sum(probs * logits, axis=-1),)
    out += (jnp.take_along_axis(logits, ids, axis=-1) - lse[:, None],)
    if not topk:
        return out
    top_logits, top_ids = jax.lax.top_k(logits, topk)
    return out + (top_ids.astype(jnp.int32), top_logits - lse[:, None])


def _chunked_stats(h, head_kernel, targets, temps, ids, *, chunk_size: int, topk: int, entropy: bool = True):
    """_chunk_stats of n flat positions (h [n, D], targets [n], temps [n], ids [n, k]) in chunks of `chunk_size`:
    a tuple of [n, ...] arrays. Only one chunk's logits [chunk, V] exist at a time, in the forward and backward."""
    n, d = h.shape
    k = ids.shape[-1]
    chunk = max(1, min(chunk_size, n))
    pad = -n % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets, ids = jnp.pad(targets, (0, pad)), jnp.pad(ids, ((0, pad), (0, 0)))
        temps = jnp.pad(temps, (0, pad), constant_values=1.0)
    nc = (n + pad) // chunk
    # prevent_cse=False: inside lax.map (a scan) CSE cannot merge the recomputation anyway.
    body = jax.checkpoint(lambda xs: _chunk_stats(xs[0], head_kernel, xs[1], xs[2], xs[3], topk, entropy),
                          prevent_cse=False)
    out = jax.lax.map(body, (h.reshape(nc, chunk, d), targets.reshape(nc, chunk), temps.reshape(nc, chunk),
                             ids.reshape(nc, chunk, k)))
    return tuple(x.reshape((nc * chunk,) + x.shape[2:])[:n] for x in out)


def hidden_logprobs(hidden, head_kernel, tokens, segment_ids, temperatures, *, chunk_size: int = 1024,
                    gather_ids=None, topk: int = 0):
    """Like token_logprobs, from final hidden states [B, T, D] and the [D, V] head."""
    b, t, d = hidden.shape
    k = 0 if gather_ids is None else gather_ids.shape[-1]
    # Position t is predicted from hidden t-1, within the same (non-padding) segment.
    valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    n = b * (t - 1)
    ids = (jnp.zeros((b, t, 0), jnp.int32) if gather_ids is None else gather_ids)[:, 1:].reshape(n, k)
    logp, ent, at_ids, *top = _chunked_stats(
        hidden[:, :-1].reshape(n, d), head_kernel, tokens[:, 1:].reshape(n),
        temperatures[:, 1:].astype(jnp.float32).reshape(n), ids, chunk_size=chunk_size, topk=topk)

    def unflatten(x):  # [n, ...] -> [B, T, ...], zeros at t=0, invalid positions zeroed
        x = x.reshape((b, t - 1) + x.shape[1:])
        mask = valid.reshape(valid.shape + (1,) * (x.ndim - 2))
        x = jnp.where(mask, x, jnp.zeros((), x.dtype))
        return jnp.pad(x, ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2))

    out = unflatten(logp), unflatten(ent)
    out = out if gather_ids is None else out + (unflatten(at_ids),)
    return out + tuple(unflatten(x) for x in top)


def logprobs_at(hidden, head_kernel, tokens, temperatures, at, *, chunk_size: int = 1024, topk: int = 0):
    """(logprobs [B, P]) [+ top-k ids [B, P, topk] int32 and their logprobs [B, P, topk] when topk > 0] at the
    positions `at` [B, P] of each row only (each >= 1; other entries are whatever position max(at - 1, 0) predicts):
    token_logprobs's numbers there, without the LM head, softmax or top-k at any other position (a teacher prompt's
    tokens, padding). No entropy."""
    b, p = at.shape
    d = hidden.shape[-1]
    rows = jnp.arange(b)[:, None]
    h = hidden[rows, jnp.maximum(at - 1, 0)].reshape(b * p, d)  # position t is predicted from hidden t-1
    logp, _, *top = _chunked_stats(h, head_kernel, tokens[rows, at].reshape(b * p),
                                   temperatures[rows, at].astype(jnp.float32).reshape(b * p),
                                   jnp.zeros((b * p, 0), jnp.int32), chunk_size=chunk_size, topk=topk, entropy=False)
    return tuple(x.reshape((b, p) + x.shape[1:]) for x in (logp, *top))


def token_logprobs(model, tokens, positions, segment_ids, temperatures, *, chunk_size: int = 1024,
                   gather_ids=None, topk: int = 0, max_segments: int | None = None):
    """(logprobs [B,T], entropy [B,T]) [+ logprobs at gather_ids [B,T,k] when given] [+ top-k ids [B,T,topk] int32
    and their logprobs [B,T,topk], best first, when topk > 0].

    logprobs[b,t] = log softmax(logits_{t-1} / temperatures[b,t])[tokens[b,t]]; entropy[b,t] is that distribution's
    entropy; gather_ids[b,t] are candidate ids for position t (e.g. the teacher's top-k) scored by the same
    distribution; the top-k are the k most likely ids of that distribution. All are 0 at each segment's first token
    and at padding (segment 0). One chunked pass.
    max_segments: the model's bound on segments per row (attention.segment_bound; the cuDNN kernel needs it).
    """
    hidden = model(tokens, positions, segment_ids, max_segments=max_segments)
    return hidden_logprobs(hidden, model.lm_head_kernel(), tokens, segment_ids, temperatures,
                           chunk_size=chunk_size, gather_ids=gather_ids, topk=topk)
