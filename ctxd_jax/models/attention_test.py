"""Packed-row descriptors for any number of segments, and the per-shard (shard_map) attention on fake devices.

The mesh checks run in a subprocess on 8 fake CPU devices (XLA_FLAGS must be set before jax starts): the same
shard_map path the GPU takes, with the XLA kernel inside, against one device; and the cuDNN path lowered for CUDA
(not run) under a mesh, which must leave no custom partitioner for XLA to call (the multi-GPU crash).
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxd_jax.models.attention import (MIN_SEGMENT_BOUND, attention, head_specs, segment_bound, segment_count,
                                       segment_mask, segment_offsets)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _row(t, lengths):
    ids = np.zeros(t, np.int32)
    start = 0
    for i, n in enumerate(lengths, 1):
        ids[start:start + n] = i
        start += n
    return ids


def _mask_from_descriptors(seqlens, offsets, t):
    """[B, T, T] what the packed kernel attends to: causal inside each described segment."""
    b = seqlens.shape[0]
    mask = np.zeros((b, t, t), bool)
    for r in range(b):
        for n, o in zip(seqlens[r], offsets[r]):
            if n > 0:
                mask[r, o:o + n, o:o + n] = np.tril(np.ones((n, n), bool))
    return mask


def test_segment_bound_buckets():
    assert segment_bound(np.ones((2, 16), np.int32)) == MIN_SEGMENT_BOUND
    ids = np.stack([_row(400, [3] * 100), _row(400, [2] * 150)])  # 100 + padding, 150 + padding runs
    assert segment_bound(ids) == 256
    assert segment_bound(_row(300, [1] * 128)[None]) == 256  # 128 runs and one of padding


@pytest.mark.parametrize("lengths", [[4096], [64] * 64, [63] * 65, [13] * 300, [1] * 4096])
def test_segment_offsets_cover_every_token(lengths):
    t = 4096
    ids = np.stack([_row(t, lengths), _row(t, [100, 200, 150])])
    bound = segment_bound(ids)
    seqlens, offsets = (np.asarray(x) for x in segment_offsets(jnp.asarray(ids), bound))
    assert seqlens.shape == (2, bound) and offsets.shape == (2, bound + 1)
    np.testing.assert_array_equal(np.asarray(segment_count(jnp.asarray(ids))), [
        len(lengths) + (sum(lengths) < t), 4])
    # The descriptors reproduce the dense causal & same-segment mask on every real token.
    want = np.asarray(segment_mask(jnp.asarray(ids)))[:, 0]
    got = _mask_from_descriptors(seqlens, offsets, t)
    real = ids > 0
    np.testing.assert_array_equal(got[real], want[real])


def test_head_specs():
    assert head_specs(8, 32, 8, {"fsdp": 2, "tp": 2}) == ("fsdp", "tp", "tp")
    assert head_specs(8, 32, 8, {"fsdp": 1, "tp": 16}) == ("fsdp", "tp", None)  # kv replicated, q split
    assert head_specs(3, 6, 2, {"fsdp": 2, "tp": 4}) == (None, None, None)  # nothing divides: all repeated
    assert head_specs(4, 4, 2, {"fsdp": 4}) == ("fsdp", None, None)


def _qkv(b, t, hq, hkv, hd=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, hq, hd))
    k, v = (jax.random.normal(kk, (b, t, hkv, hd)) for kk in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], (b, t, hq, hd))


def _attention_and_grads(q, k, v, w, seg):
    def loss(q, k, v):
        out = attention(q, k, v, seg)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x) for x in (out,) + grads]


def _check_attention_meshes():
    from ctxd_jax.sharding import make_mesh

    devices = jax.devices()
    t = 24
    seg = jnp.asarray(np.stack([_row(t, [5, 7, 4]), _row(t, [24]), _row(t, [1] * 20), _row(t, [10, 10])]))
    # (q heads, kv heads) x meshes (devices, tp); 12/4 on tp=6 takes one kv head per local q head, 4/2 on tp=4 one
    # kv head per shard, rows 4 on fsdp=8 are repeated.
    cases = [((4, 2), (2, 1)), ((4, 2), (4, 1)), ((4, 2), (4, 2)), ((4, 2), (8, 4)), ((4, 2), (8, 1)),
             ((12, 4), (6, 6)), ((8, 8), (8, 2))]
    for (hq, hkv), (n, tp) in cases:
        q, k, v, w = _qkv(4, t, hq, hkv)
        want = _attention_and_grads(q, k, v, w, seg)
        mesh = make_mesh(devices[:n], tp=tp)
        with jax.set_mesh(mesh):
            assert "shard_map" in str(jax.make_jaxpr(lambda *a: attention(*a))(q, k, v, seg))
            got = _attention_and_grads(q, k, v, w, seg)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{hq}/{hkv} heads, {n} devices, tp={tp}: {name}")


def _check_cudnn_lowering():
    """The cuDNN kernel under a (fsdp, tp) mesh lowers for CUDA to cuDNN calls inside the manual (shard_map) region.
    Before, it lowered to a CustomSPMDPartitioning call whose partitioner refused GQA's differing q/k/v shardings.
    cuDNN's version probe is answered with 9.1 so that lowering runs on this CPU host; nothing is executed."""
    from unittest import mock

    from jax._src.cudnn import fused_attention_stablehlo as fa

    from ctxd_jax.sharding import make_mesh

    t = 128
    seg = jnp.asarray(np.stack([_row(t, [t])] * 2 + [_row(t, [50, 60])] * 2))
    for n, tp in ((4, 2), (4, 4)):  # kv heads split over tp, and replicated (2 kv heads < tp 4)
        q, k, v, _ = _qkv(4, t, 8, 2, hd=64)
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))

        def loss(q, k, v):
            return jnp.sum(attention(q, k, v, seg, impl="cudnn", max_segments=64).astype(jnp.float32))

        with mock.patch.object(fa, "check_cudnn_version", lambda: 91000), \
                mock.patch.object(fa, "check_compute_capability", lambda capability: True), \
                jax.set_mesh(make_mesh(jax.devices()[:n], tp=tp)):
            text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(
                lowering_platforms=("cuda",)).as_text()
        calls = set(re.findall(r"custom_call @([\w$]+)", text))
        assert calls == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}, calls
        assert "sdy.manual_computation" in text or "Sharding = \"{manual}\"" in text


def _check_trainer_meshes(tiny_dir):
    """Loss, LoRA gradients and log-probs of the Trainer on 2 / 4 / (2 x tp 2) / (2 x tp 4) devices = 1 device."""
    from flax import nnx

    from ctxd_jax.models.hf import load_model
    from ctxd_jax.sharding import make_mesh
    from ctxd_jax.trainer import OptimConfig, StepConfig, Trainer, micro_batch_loss
    from ctxd_jax.trainer_test import _batch

    step = StepConfig(teacher_tau=0.3, student_tau=0.2, use_full_reward_baseline=False, micro_batch_rows=2,
                      chunk_size=8)
    batch = _batch(samples=12, row_multiple=8)

    def run(devices, tp):
        mesh = make_mesh(devices, tp=tp)
        model = load_model(tiny_dir, lora_rank=4, lora_alpha=8.0, seed=1, mesh=mesh)
        lora = nnx.state(model, nnx.LoRAParam)
        keys = iter(jax.random.split(jax.random.key(3), 64))
        nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), lora))
        trainer = Trainer(model, mesh, OptimConfig(lr=1e-2), step)
        loss, _, grads = trainer.grads(batch)
        if len(devices) > 1:  # the trainer's step goes through the per-shard kernel
            mb = {k: jnp.asarray(v) for k, v in batch._asdict().items() if v is not None}
            with jax.set_mesh(mesh):
                jaxpr = jax.make_jaxpr(lambda lo, re: micro_batch_loss(lo, re, mb, 1.0, graphdef=trainer.graphdef,
                                                                       step=step, max_segments=64))
                assert "shard_map" in str(jaxpr(trainer.lora, trainer.rest))
        return float(loss), trainer.logprobs(batch), {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}

    devices = jax.devices()
    want_loss, want_lp, want = run(devices[:1], 1)
    for n, tp in ((2, 1), (4, 1), (4, 2), (8, 4)):
        loss, lp, grads = run(devices[:n], tp)
        where = f"{n} devices, tp={tp}"
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=where)
        np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-5, err_msg=where)
        for path, g in grads.items():
            np.testing.assert_allclose(g, want[path], rtol=1e-4, atol=2e-6, err_msg=f"{where} {path}")
    assert all(np.abs(g).max() > 0 for p, g in want.items() if "k_proj" in p)  # attention's inputs get gradients


@pytest.mark.slow
def test_meshes_match_one_device(tmp_path):
    from ctxd_jax.tiny import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(str(tmp_path / "tiny"), "qwen3")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "ctxd_jax.models.attention_test", tiny], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    _check_attention_meshes()
    _check_cudnn_lowering()
    _check_trainer_meshes(sys.argv[1])
    print("OK")
