"""GPU check and timing of packed attention: cuDNN packed layout vs XLA with a dense mask (correctness, small T),
then cuDNN packed vs cuDNN dense-mask vs plain causal at long T (forward + backward). Table printed last."""

import statistics
import sys
import time
import os

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ctxd_jax.models.attention import attention, segment_mask  # noqa: E402


def segments(t, lengths):
    ids = np.zeros(t, np.int32)
    start = 0
    for i, n in enumerate(lengths, 1):
        ids[start:start + n] = i
        start += n
    return jnp.asarray(ids)[None]


def qkv(key, t, hq=32, hkv=8, hd=128, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (1, t, hq, hd), dtype), jax.random.normal(kk, (1, t, hkv, hd), dtype),
            jax.random.normal(kv, (1, t, hkv, hd), dtype))


def fwd_bwd(impl):
    def loss(q, k, v, seg):
        return jnp.sum(attention(q, k, v, seg, impl=impl).astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def check(lengths=(100, 200, 150)):
    t = 512
    seg = segments(t, list(lengths))  # lengths adding up to less than t leave padding at the end
    q, k, v = qkv(jax.random.key(1), t)  # cuDNN takes bf16; the reference runs on the same values in f32
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out_c = attention(q, k, v, seg, impl="cudnn").astype(jnp.float32)
    out_x = attention(*f32, seg, impl="xla")
    valid = np.asarray(seg[0] > 0)
    rel = float(jnp.linalg.norm((out_c - out_x)[:, valid]) / jnp.linalg.norm(out_x[:, valid]))
    (_, gc), (_, gx) = fwd_bwd("cudnn")(q, k, v, seg), fwd_bwd("xla")(*f32, seg)
    gc = [g.astype(jnp.float32) for g in gc]
    # Gradients at valid positions only: padding's self-attention differs between the two by construction.
    grel = max(float(jnp.linalg.norm((a - b)[:, valid]) / jnp.linalg.norm(b[:, valid])) for a, b in zip(gc, gx))
    finite = all(bool(jnp.all(jnp.isfinite(g))) for g in gc)
    return rel, grel, finite


def time_fn(f, *args, n=10):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    for lengths in ((100, 200, 150), (512,)):
        rel, grel, finite = check(lengths)
        print(f"cudnn vs xla masked, segments {lengths} (bf16 inputs; reference in f32): out rel {rel:.2e}, "
              f"grad rel {grel:.2e}, grads finite {finite}")
    t = 16384
    q, k, v = qkv(jax.random.key(0), t)
    one, two = segments(t, [t]), segments(t, [t // 2, t // 2])
    dense = jax.jit(jax.value_and_grad(lambda q, k, v, m: jnp.sum(jax.nn.dot_product_attention(
        q, k, v, mask=m, implementation="cudnn").astype(jnp.float32) ** 2), argnums=(0, 1, 2)))
    causal = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn").astype(jnp.float32) ** 2), argnums=(0, 1, 2)))
    rows = [("cudnn is_causal, 1 doc", time_fn(causal, q, k, v)),
            ("ours, 1 doc (causal branch)", time_fn(fwd_bwd("cudnn"), q, k, v, one)),
            ("ours, 2 docs (packed branch)", time_fn(fwd_bwd("cudnn"), q, k, v, two)),
            ("cudnn dense mask, 2 docs", time_fn(dense, q, k, v, segment_mask(two)))]
    print(f"\nfwd+bwd, T={t}, 32 q / 8 kv heads, hd 128, bf16 ({jax.devices()[0].device_kind})")
    for name, ms in rows:
        print(f"{name:28s} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
