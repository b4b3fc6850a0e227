"""GPU check of packed attention: cuDNN (ours) against XLA's masked attention in float32, at any number of segments
per row; the per-shard (shard_map) kernel on all visible GPUs against one; then timings at 16k. Tables print last.

    python bench/attention_check.py [--seq_lens=4096,16384] [--segments=1,64,65,300]

Rows of T tokens hold n equal segments of T // n tokens, the rest padding. Inputs are bf16 (the reference runs on
the same values in float32). A token is wrong when its output's relative error (norm over heads and head dims)
exceeds --wrong_rel. Gradients: of sum(out * w) for a random w that is zero on padding.
On CPU, check the script itself: --impl=xla --seq_lens=256 --segments=1,3,40 --heads=4,2 --head_dim=16
(with XLA_FLAGS=--xla_force_host_platform_device_count=4 for the mesh part).
"""

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ctxd_jax.models.attention import attention, head_specs, segment_bound, segment_mask  # noqa: E402
from ctxd_jax.sharding import make_mesh  # noqa: E402


def segments(t, n):
    """[T] ids: n segments of T // n tokens, then padding (0)."""
    ids = np.zeros(t, np.int32)
    ids[:(t // n) * n] = np.repeat(np.arange(1, n + 1, dtype=np.int32), t // n)
    return ids


def inputs(key, b, t, hq, hkv, hd):
    """bf16 q [B,T,Hq,hd], k, v [B,T,Hkv,hd] and a float32 cotangent w like q."""
    kq, kk, kv, kw = jax.random.split(key, 4)
    return (jax.random.normal(kq, (b, t, hq, hd), jnp.bfloat16), jax.random.normal(kk, (b, t, hkv, hd), jnp.bfloat16),
            jax.random.normal(kv, (b, t, hkv, hd), jnp.bfloat16), jax.random.normal(kw, (b, t, hq, hd), jnp.float32))


def reference(q, k, v, seg, block=1024):
    """XLA attention with the dense causal & same-segment mask, one block of queries at a time (a [T, T] float32
    score matrix per head does not fit at 16k); each block is recomputed in the backward."""
    b, t, hq, hd = q.shape
    block = min(block, t)
    pos = jnp.arange(t)

    def one(i):
        qi = jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=1)
        si = jax.lax.dynamic_slice_in_dim(seg, i * block, block, axis=1)
        pi = i * block + jnp.arange(block)
        mask = (pi[:, None] >= pos[None]) & (si[:, :, None] == seg[:, None, :])
        return jax.nn.dot_product_attention(qi, k, v, mask=mask[:, None], implementation="xla")

    out = jax.lax.map(jax.checkpoint(one), jnp.arange(t // block))  # [T/block, B, block, H, hd]
    return jnp.moveaxis(out, 0, 1).reshape(b, t, hq, hd)


def out_and_grads(fn):
    """jit(q, k, v, w, seg) -> (out, (dq, dk, dv)) of sum(fn(q, k, v, seg) * w), all float32."""
    def loss(q, k, v, w, seg):
        out = fn(q, k, v, seg).astype(jnp.float32)
        return jnp.sum(out * w), out

    def run(q, k, v, w, seg):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, w, seg)
        return out, tuple(g.astype(jnp.float32) for g in grads)

    return jax.jit(run)


@functools.lru_cache(maxsize=None)  # one jitted function per (impl, bound): timings reuse the compiled step
def ours(impl, bound):
    return out_and_grads(lambda q, k, v, seg: attention(q, k, v, seg, impl=impl, max_segments=bound))


def compare(out, grads, want_out, want_grads, valid, wrong_rel):
    """max abs / relative error of the output on valid tokens, wrong tokens, worst gradient relative error."""
    d, r = (out - want_out)[valid], want_out[valid]
    tok = np.linalg.norm(d.reshape(d.shape[0], -1), axis=1) / np.maximum(
        np.linalg.norm(r.reshape(r.shape[0], -1), axis=1), 1e-30)
    grel = max(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)) for a, b in zip(grads, want_grads))
    finite = all(np.isfinite(g).all() for g in grads) and np.isfinite(out[valid]).all()
    return dict(max_abs=float(np.abs(d).max()), rel=float(np.linalg.norm(d) / np.linalg.norm(r)),
                wrong=int((tok > wrong_rel).sum()), valid=int(valid.sum()), grad_rel=grel, finite=bool(finite))


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def time_fn(f, *args, n=10):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def correctness(a, hq, hkv):
    rows = []
    for t in a.seq_lens:
        ref = out_and_grads(reference)
        for n in (n for n in a.segments if n <= t):
            seg = jnp.asarray(segments(t, n))[None]
            q, k, v, w = inputs(jax.random.key(n), 1, t, hq, hkv, a.head_dim)
            w = w * (seg > 0)[..., None, None]
            bound = segment_bound(seg)
            got = host(ours(a.impl, bound)(q, k, v, w, seg))
            want = host(ref(*(x.astype(jnp.float32) for x in (q, k, v)), w, seg))
            ms = time_fn(ours(a.impl, bound), q, k, v, w, seg, n=3) if a.timing else float("nan")
            row = compare(*got, *want, np.asarray(seg > 0), a.wrong_rel)
            rows.append(dict(row, t=t, n=n, bound=bound, ms=ms))
            print(rows[-1], flush=True)
    return rows


def mesh_cases(n, hkv):
    """(tp, kv heads) on all n devices: rows split, heads split, both (4+ devices), and one kv head replicated over
    tp (MQA: fewer kv heads than tp)."""
    out = [(1, hkv), (n, hkv)] + ([(2, hkv)] if n >= 4 and n % 2 == 0 else [])
    return out + [(n, 1)]


def sharded(a, hq, hkv):
    """The per-shard kernel on every visible device against the same rows on one device (and the reference)."""
    devices = jax.devices()
    if len(devices) < 2:
        return []
    rows = []
    for tp, kv_heads in mesh_cases(len(devices), hkv):
        rows.append(sharded_case(a, hq, kv_heads, devices, tp))
        print(rows[-1], flush=True)
    return rows


def sharded_case(a, hq, hkv, devices, tp):
    t, n = a.seq_lens[0], len(devices)
    counts = sorted(c for c in a.segments if c <= t)
    counts = counts[-1:] + counts[:-1]  # the most segments first, then the fewest: 2 rows already cover both
    seg = jnp.asarray(np.stack([segments(t, counts[i % len(counts)]) for i in range(n)]))  # a row a device
    q, k, v, w = inputs(jax.random.key(7), n, t, hq, hkv, a.head_dim)
    w = w * (seg > 0)[..., None, None]
    bound = segment_bound(seg)
    fn = ours(a.impl, bound)
    one = host(fn(q, k, v, w, seg))
    want = host(out_and_grads(reference)(*(x.astype(jnp.float32) for x in (q, k, v)), w, seg))
    mesh = make_mesh(devices, tp=tp)
    rows, heads, kv = head_specs(n, hq, hkv, dict(mesh.shape))
    specs = (P(rows, None, heads), P(rows, None, kv), P(rows, None, kv), P(rows, None, heads), P(rows))
    put = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip((q, k, v, w, seg), specs)]
    with jax.set_mesh(mesh):
        got = host(fn(*put))
        ms = time_fn(fn, *put, n=3) if a.timing else float("nan")
    diff = max(float(np.linalg.norm(x - y) / np.linalg.norm(y))  # output and gradients: worst relative difference
               for x, y in zip((got[0],) + got[1], (one[0],) + one[1]))
    return dict(compare(*got, *want, np.asarray(seg > 0), a.wrong_rel), mesh=f"fsdp={n // tp} tp={tp}",
                heads=f"{hq}/{hkv}", specs=f"{rows},{heads},{kv}", diff=diff, ms=ms, t=t, b=n, bound=bound,
                counts=counts)


def timings(a, hq, hkv):
    t = max(a.seq_lens)
    q, k, v, w = inputs(jax.random.key(0), 1, t, hq, hkv, a.head_dim)
    one, two = (jnp.asarray(segments(t, n))[None] for n in (1, 2))
    dense = out_and_grads(lambda q, k, v, seg: jax.nn.dot_product_attention(
        q, k, v, mask=segment_mask(seg), implementation="cudnn"))
    causal = out_and_grads(lambda q, k, v, seg: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"))
    return t, [("cudnn is_causal, 1 doc", time_fn(causal, q, k, v, w, one)),
               ("ours, 1 doc (causal branch)", time_fn(ours("cudnn", 64), q, k, v, w, one)),
               ("ours, 2 docs (packed branch)", time_fn(ours("cudnn", 64), q, k, v, w, two)),
               ("cudnn dense mask, 2 docs", time_fn(dense, q, k, v, w, two))]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq_lens", default="4096,16384")
    p.add_argument("--segments", default="1,64,65,300")
    p.add_argument("--heads", default="32,8", help="query, kv heads (Qwen3-4B)")
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--impl", default="cudnn")
    p.add_argument("--wrong_rel", type=float, default=0.05)
    p.add_argument("--timing", type=int, default=1, help="fwd+bwd ms of each case")
    p.add_argument("--variants", type=int, default=1, help="the 16k timing table of cuDNN variants")
    a = p.parse_args()
    a.seq_lens = [int(x) for x in a.seq_lens.split(",")]
    a.segments = [int(x) for x in a.segments.split(",")]
    hq, hkv = map(int, a.heads.split(","))
    kind = jax.devices()[0].device_kind
    rows = correctness(a, hq, hkv)
    mesh_rows = sharded(a, hq, hkv)
    timing = timings(a, hq, hkv) if a.variants and a.impl == "cudnn" else None

    print(f"\n{a.impl} vs XLA masked attention in float32; {hq} q / {hkv} kv heads, head {a.head_dim}, bf16 inputs; "
          f"wrong = token rel err > {a.wrong_rel} ({kind}, jax {jax.__version__})")
    print(f"{'T':>6} {'segs':>5} {'bound':>5} | {'max abs':>8} {'rel':>8} {'wrong/valid':>12} | {'grad rel':>8} "
          f"{'finite':>6} | {'ms f+b':>7}")
    for r in rows:
        print(f"{r['t']:>6} {r['n']:>5} {r['bound']:>5} | {r['max_abs']:8.2e} {r['rel']:8.2e} "
              f"{r['wrong']:>5}/{r['valid']:<6} | {r['grad_rel']:8.2e} {str(r['finite']):>6} | {r['ms']:7.2f}")
    if mesh_rows:
        r0 = mesh_rows[0]
        print(f"\nper-shard kernel on {len(jax.devices())} devices vs 1 device: {r0['b']} rows of {r0['t']} tokens "
              f"(segments cycling {r0['counts']}), bound {r0['bound']}")
        print(f"{'mesh':>12} {'q/kv':>5} {'rows,heads,kv':>14} | {'rel diff vs 1 device':>20} | {'rel vs ref':>10} "
              f"{'wrong/valid':>12} {'grad rel':>8} | {'ms f+b':>7}")
        for r in mesh_rows:
            print(f"{r['mesh']:>12} {r['heads']:>5} {r['specs']:>14} | {r['diff']:20.2e} | {r['rel']:10.2e} "
                  f"{r['wrong']:>5}/{r['valid']:<6} {r['grad_rel']:8.2e} | {r['ms']:7.2f}")
    else:
        print("\nper-shard kernel: one device visible, not checked")
    if timing:
        t, trows = timing
        print(f"\nfwd+bwd, T={t}, {hq} q / {hkv} kv heads, hd {a.head_dim}, bf16 ({kind})")
        for name, ms in trows:
            print(f"{name:28s} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
