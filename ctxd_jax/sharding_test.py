"""Same loss and LoRA gradients on 1 device and on 8 fake CPU devices (fsdp=8 and fsdp=4 x tp=2).

The 8-device check runs in a subprocess (XLA_FLAGS must be set before jax starts), so this pytest process keeps
its own devices.
"""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from ctxd_jax import sharding
from ctxd_jax.models.config import ModelConfig
from ctxd_jax.models.logprobs import token_logprobs
from ctxd_jax.models.transformer import Transformer
from ctxd_jax.tiny import tiny_config


def test_param_spec_rules():
    assert sharding.param_spec(("norm", "scale"), (128,)) == P()
    assert sharding.param_spec(("layers", "self_attn", "q_proj", "lora_a"), (2, 128, 4)) == P()
    assert sharding.param_spec(("embed_tokens", "embedding"), (384, 128)) == P("fsdp", None)
    assert sharding.param_spec(("layers", "mlp", "down_proj", "kernel"), (2, 256, 128)) == P(None, "fsdp", None)
    # replicated frozen weights: nothing over fsdp
    assert sharding.param_spec(("layers", "mlp", "down_proj", "kernel"), (2, 256, 128), shard_weights=False) == P(None, None, None)


def test_indivisible_dims_fall_back():
    mesh = types.SimpleNamespace(shape={"fsdp": 8, "tp": 2})  # param_spec reads only the axis sizes
    # vocab 385 divides neither axis: fsdp moves to the hidden dim, tp is dropped.
    assert sharding.param_spec(("lm_head", "kernel"), (128, 385), mesh) == P("fsdp", None)
    k_proj = ("layers", "self_attn", "k_proj", "kernel")
    assert sharding.param_spec(k_proj, (2, 128, 64), mesh) == P(None, "fsdp", "tp")
    assert sharding.param_spec(("layers", "mlp", "down_proj", "kernel"), (2, 6, 12), mesh) == P(None, "tp", None)


def _loss_and_grads(mesh):
    cfg = ModelConfig.from_dict(tiny_config("qwen2"))
    model = Transformer(cfg, lora_rank=2, lora_alpha=4.0, rngs=nnx.Rngs(0))
    lora = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    nnx.update(model, jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) * 0.05, lora))
    sharding.shard_model(model, mesh)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    rng = np.random.default_rng(0)
    b, t = 8, 16
    tokens = rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
    segs = np.repeat(np.array([[1] * 7 + [2] * 6 + [0] * 3]), b, 0).astype(np.int32)
    positions = np.repeat(np.array([list(range(7)) + list(range(6)) + [0] * 3]), b, 0).astype(np.int32)
    temps = np.full((b, t), 0.8, np.float32)
    batch = [sharding.shard_batch(jnp.asarray(x), mesh) for x in (tokens, positions, segs, temps)]

    @jax.jit
    def loss_and_grad(lora, rest, batch):
        def loss(lora):
            logp, ent = token_logprobs(nnx.merge(graphdef, lora, rest), *batch, chunk_size=24)
            return -jnp.mean(logp) - 0.1 * jnp.mean(ent)

        return jax.value_and_grad(loss)(lora)

    loss, grads = loss_and_grad(lora, rest, batch)
    return float(loss), {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}


def _check_devices():
    devices = jax.devices()
    assert len(devices) == 8, devices
    want_loss, want = _loss_and_grads(sharding.make_mesh(devices[:1]))
    for tp in (1, 2):
        mesh = sharding.make_mesh(devices, tp=tp)
        loss, grads = _loss_and_grads(mesh)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=f"tp={tp}")
        for path, g in grads.items():
            np.testing.assert_allclose(g, want[path], atol=2e-6, rtol=1e-4, err_msg=f"tp={tp} {path}")
    print("OK", want_loss)


def test_one_and_eight_devices_agree():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "ctxd_jax.sharding_test"], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    _check_devices()
