"""Per-token log-probs and entropies (and optionally the top-k) from the final hidden states, in chunks of tokens.

Logits exist one chunk at a time ([chunk, V] float32) and each chunk is rematerialised in the backward pass, so
neither the forward nor the gradient holds [B*T, V] float32.
"""

import jax
import jax.numpy as jnp


def _chunk_stats(h, w, targets, temps, ids, topk, entropy=True):
    """h [..., C, D], w [D, V], targets [..., C], temps [..., C], ids [..., C, k] -> logprob [..., C], entropy
    [..., C] (if `entropy`), logprob at ids [..., C, k] [+ the `topk` most likely ids [..., C, topk] and their
    log-probs, best first]."""
    logits = jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32) / temps[..., None]
    lse = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse
    out = (logp,)
    if entropy:
        probs = jnp.exp(logits - lse[..., None])
        out += (lse - jnp.sum(probs * logits, axis=-1),)
    out += (jnp.take_along_axis(logits, ids, axis=-1) - lse[..., None],)
    if not topk:
        return out
    top_logits, top_ids = jax.lax.top_k(logits, topk)
    return out + (top_ids.astype(jnp.int32), top_logits - lse[..., None])


def _local_rows(rows: int) -> int:
    """Rows of a [rows, ...] batch on one device: batches shard their rows over 'fsdp' (ctxd_jax/sharding.py) of
    the mesh set around the call, if any."""
    mesh = jax.sharding.get_abstract_mesh()
    fsdp = 1 if mesh.empty else dict(mesh.shape).get("fsdp", 1)
    return rows // fsdp if rows % fsdp == 0 else rows


def map_row_chunks(body, xs, *, chunk_size: int, pad_values=None):
    """body(*chunk) over chunks along L of the arrays `xs` (each [B, L, ...]): a tuple of [B, L, ...] arrays. A chunk
    holds the same positions of every row, about `chunk_size` tokens a device, and is rematerialised in the backward
    pass, so only one chunk's intermediates (e.g. its logits) exist at a time, in the forward and the backward.
    `pad_values` (one per x, default 0) fill the last chunk's padding.

    The rows stay a dimension of every chunk because batches shard their rows over the devices: each device then
    computes the head of its own rows. Chunks of the flattened rows would cut across devices; XLA then gathers
    every row's hidden states onto every device and each computes the head of the whole batch (work that grows
    with the device count)."""
    b, n = xs[0].shape[:2]
    nc = max(1, -(-n // max(1, chunk_size // _local_rows(b))))
    chunk = -(-n // nc)  # nc even chunks: less than one position a chunk of padding
    pad = nc * chunk - n
    if pad:  # along L, which no mesh axis splits
        pad_values = pad_values or (0,) * len(xs)
        xs = tuple(jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=v)
                   for x, v in zip(xs, pad_values))

    def split(x):  # [B, nc * chunk, ...] -> [nc, B, chunk, ...]
        return jnp.moveaxis(x.reshape((b, nc, chunk) + x.shape[2:]), 1, 0)

    # prevent_cse=False: inside lax.map (a scan) CSE cannot merge the recomputation anyway.
    out = jax.lax.map(jax.checkpoint(lambda c: body(*c), prevent_cse=False), tuple(split(x) for x in xs))
    return tuple(jnp.moveaxis(x, 0, 1).reshape((b, nc * chunk) + x.shape[3:])[:, :n] for x in out)


def _chunked_stats(h, head_kernel, targets, temps, ids, *, chunk_size: int, topk: int, entropy: bool = True):
    """_chunk_stats of rows of positions (h [B, L, D], targets [B, L], temps [B, L], ids [B, L, k]) in chunks along
    L (map_row_chunks): a tuple of [B, L, ...] arrays."""
    return map_row_chunks(lambda *c: _chunk_stats(c[0], head_kernel, *c[1:], topk, entropy), (h, targets, temps, ids),
                          chunk_size=chunk_size, pad_values=(0, 0, 1.0, 0))


def hidden_logprobs(hidden, head_kernel, tokens, segment_ids, temperatures, *, chunk_size: int = 1024,
                    gather_ids=None, topk: int = 0):
    """Like token_logprobs, from final hidden states [B, T, D] and the [D, V] head."""
    b, t, d = hidden.shape
    # Position t is predicted from hidden t-1, within the same (non-padding) segment.
    valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    ids = (jnp.zeros((b, t, 0), jnp.int32) if gather_ids is None else gather_ids)[:, 1:]
    logp, ent, at_ids, *top = _chunked_stats(
        hidden[:, :-1], head_kernel, tokens[:, 1:], temperatures[:, 1:].astype(jnp.float32), ids,
        chunk_size=chunk_size, topk=topk)

    def unflatten(x):  # [B, T - 1, ...] -> [B, T, ...], zeros at t=0, invalid positions zeroed
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
    # Gathers along each row, not by (row, position) pairs: rows sharded over devices stay on them.
    h = jnp.take_along_axis(hidden, jnp.maximum(at - 1, 0)[..., None], axis=1)  # t is predicted from hidden t-1
    logp, _, *top = _chunked_stats(h, head_kernel, jnp.take_along_axis(tokens, at, axis=1),
                                   jnp.take_along_axis(temperatures, at, axis=1).astype(jnp.float32),
                                   jnp.zeros((b, p, 0), jnp.int32), chunk_size=chunk_size, topk=topk, entropy=False)
    return (logp, *top)


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
