"""Causal attention over packed rows (several samples per row, told apart by segment ids).

Two implementations of the same function:
- "xla" (CPU, tests, any backend): jax.nn.dot_product_attention with a dense causal & same-segment mask.
- "cudnn" (GPU): cuDNN's fused flash attention in its packed ("THD") layout: per row, the start offset and length of
  each segment, with a padding-causal mask. A dense [T, T] mask through cuDNN costs 2.2x at 16k tokens (measured),
  and XLA's own attention does not fit in memory there, so packing goes through segment offsets instead.

Under a mesh (`jax.set_mesh`; the trainer sets its own) both run per shard inside `shard_map`: rows over 'fsdp',
heads over 'tp', each device seeing its local [B/fsdp, T, H/tp, hd] block and its rows' segment ids. cuDNN's own
partitioner refuses q, k, v of different shardings (GQA k/v shard differently from q under the model's rules), and
the XLA kernel takes the same path so that CPU tests on fake devices exercise it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

# Smallest segment bound of the cuDNN packed layout. cuDNN's softmax statistics hold B x bound x heads x T float32
# (kept for the backward: 128 MiB a layer per 64 slots for a 16k row of 32 heads), so the bound follows the batch
# rather than the worst case T; powers of two from 64 keep it to a handful of compiled shapes per run (rows of up
# to 63 samples, the usual RL batch, all share one). The trainer's packing keeps rows within the smallest bound
# (ctxd_jax/packing.py says why); larger bounds are for other callers' rows.
MIN_SEGMENT_BOUND = 64
# jax before 0.11.1 strides packed k/v offsets by the QUERY head count: under GQA the kernel reads the wrong keys
# without an error. There, k and v get one head per query head before the packed call.
_PACKED_GQA_OK = jax.__version_info__ >= (0, 11, 1)


def segment_mask(segment_ids):
    """[B, 1, T, T] bool: causal and same segment. Padding (segment 0) attends to earlier padding, so no row is
    fully masked (no NaN in any implementation); its outputs are never used."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def segment_bound(segment_ids) -> int:
    """Host-side (numpy) bound for `max_segments`: the most runs of equal ids in a row (padding counts as a run),
    rounded up to a power of two, at least MIN_SEGMENT_BOUND."""
    ids = np.asarray(segment_ids)
    runs = 1 + int(np.max(np.count_nonzero(ids[:, 1:] != ids[:, :-1], axis=1), initial=0))
    return max(MIN_SEGMENT_BOUND, 1 << (runs - 1).bit_length())


def _run_starts(segment_ids):
    b = segment_ids.shape[0]
    return jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def segment_count(segment_ids):
    """[B] int32: runs of equal ids per row, padding included (the slots segment_offsets needs)."""
    return jnp.sum(_run_starts(segment_ids), axis=1, dtype=jnp.int32)


def segment_offsets(segment_ids, max_segments: int):
    """Packed-layout descriptors from segment ids [B, T] (contiguous runs; padding 0 anywhere after them).

    Returns (seqlens [B, M], offsets [B, M + 1]) with M = max_segments, -1 in unused slots. Every run of equal ids
    is one segment, padding included, so every token sits in a segment and no output is left unwritten. Runs past
    the M-th are dropped: M must be at least segment_count (segment_bound gives one).
    """
    b, t = segment_ids.shape
    index = jnp.minimum(jnp.cumsum(_run_starts(segment_ids), axis=1) - 1, max_segments)  # overflow -> slot M
    rows = jnp.arange(b)[:, None]
    lengths = jnp.zeros((b, max_segments + 1), jnp.int32).at[rows, index].add(1)[:, :max_segments]
    first = jnp.full((b, max_segments + 1), t, jnp.int32).at[rows, index].min(jnp.arange(t)[None])[:, :max_segments]
    used = lengths > 0
    seqlens = jnp.where(used, lengths, -1)
    offsets = jnp.concatenate([jnp.where(used, first, -1), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return seqlens, offsets


def _cudnn(q, k, v, segment_ids, max_segments):
    if max_segments is None:
        raise ValueError("attention: the cuDNN kernel needs max_segments (segment_bound of the batch's segment ids)")
    # Private module, public in spirit: jax.nn.dot_product_attention does not expose the packed layout.
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    def packed():
        kp, vp = k, v
        if not _PACKED_GQA_OK and k.shape[2] != q.shape[2]:
            kp, vp = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
        seqlens, offsets = segment_offsets(segment_ids, max_segments)
        out = dot_product_attention(q, kp, vp, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets,
                                    kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
                                    mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
        # A bound below a row's segment count drops segments: make that row NaN (a NaN loss) rather than wrong.
        overflow = segment_count(segment_ids) > max_segments
        return jnp.where(overflow[:, None, None, None], jnp.nan, out).astype(out.dtype)

    def causal():
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    # Rows holding one sample and no padding (long rollouts fill whole rows) take cuDNN's plain causal kernel,
    # 15% faster than the packed one on a single segment (BENCHMARKS.md).
    one_segment = jnp.all(segment_ids == segment_ids[:, :1])
    return jax.lax.cond(one_segment, causal, packed)


def _kernel(q, k, v, segment_ids, *, impl, max_segments):
    if impl == "cudnn":
        return _cudnn(q, k, v, segment_ids, max_segments)
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids), implementation=impl)


def head_specs(batch: int, q_heads: int, kv_heads: int, sizes: dict) -> tuple[str | None, str | None, str | None]:
    """Mesh axes of (rows, q heads, kv heads) for the per-shard kernel. An axis that does not divide its dim is
    left out (that work is repeated on its devices). kv heads fewer than (or not a multiple of) tp are replicated:
    each shard then takes the kv heads of its own q heads (GQA needs no refusal, k/v are the small operands)."""
    def axis(name, dim):
        return name if name in sizes and dim % sizes[name] == 0 else None

    heads = axis("tp", q_heads)
    return axis("fsdp", batch), heads, heads and axis("tp", kv_heads)


def _local_kv(k, v, q_heads: int, tp: int):
    """k/v [B, T, Hkv, hd] replicated over 'tp' -> the kv heads of this shard's q heads (q head h uses kv head
    h // group)."""
    local, group = q_heads // tp, q_heads // k.shape[2]
    first = jax.lax.axis_index("tp") * local
    # Whole shard inside one kv group: its one kv head; otherwise one kv head per local q head.
    idx = first // group + jnp.arange(1) if group % local == 0 else (first + jnp.arange(local)) // group
    return jnp.take(k, idx, axis=2), jnp.take(v, idx, axis=2)


def attention(q, k, v, segment_ids, *, impl: str | None = None, max_segments: int | None = None):
    """q [B, T, Hq, hd], k/v [B, T, Hkv, hd] (GQA: Hq a multiple of Hkv) -> [B, T, Hq, hd].

    `max_segments`: static bound on segments per row for the cuDNN packed layout (segment_bound of the host batch;
    required there, ignored by XLA).
    """
    kernel = functools.partial(_kernel, impl=impl, max_segments=max_segments)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, segment_ids)
    sizes = dict(mesh.shape)
    q_heads = q.shape[2]
    rows, heads, kv = head_specs(q.shape[0], q_heads, k.shape[2], sizes)

    def local(q, k, v, segment_ids):
        if heads and not kv:
            k, v = _local_kv(k, v, q_heads, sizes["tp"])
        return kernel(q, k, v, segment_ids)

    q_spec, kv_spec = P(rows, None, heads, None), P(rows, None, kv, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(rows, None)),
                         out_specs=q_spec)(q, k, v, segment_ids)
