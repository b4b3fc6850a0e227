"""Parity with transformers' PyTorch models (float32, tiny random checkpoints), packing and LoRA semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from ctxd_jax.models.hf import load_model
from ctxd_jax.models.logprobs import token_logprobs
from ctxd_jax.tiny import write_tiny_checkpoint

# GQA everywhere (4 query heads, 2 kv heads) except llama_mha.
CHECKPOINTS = {
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "qwen3_tied": dict(arch="qwen3_tied"),
    "llama": dict(arch="llama"),
    "llama_mha": dict(arch="llama", num_kv_heads=4),
}
# std 0.1 makes the random model's distributions far from uniform, so errors show in log-probs.
STD = 0.1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            kw = dict(CHECKPOINTS[name])
            cache[name] = write_tiny_checkpoint(str(tmp_path_factory.mktemp(name)), std=STD, **kw)
        return cache[name]

    return get


# Jitted: eager scans compile every primitive separately, which is slower on 2 cores than one compile.
_logprobs = nnx.jit(lambda model, *args, chunk_size=1024: token_logprobs(model, *args, chunk_size=chunk_size)[0],
                    static_argnames="chunk_size")


def _sequences(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).astype(np.int32) for n in lengths]


def _single_row(seq):
    t = len(seq)
    return (jnp.asarray(seq)[None], jnp.arange(t, dtype=jnp.int32)[None], jnp.ones((1, t), jnp.int32))


def _torch_logprobs(model_dir, seq, temperature=1.0):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        out = model(torch.tensor(seq)[None].long(), output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0, :-1].double() / temperature, -1)
    picked = logp.gather(-1, torch.tensor(seq[1:]).long()[:, None])[:, 0]
    return picked.numpy(), [h[0].numpy() for h in out.hidden_states]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_parity_with_transformers(ckpt, name):
    model_dir = ckpt(name)
    model = load_model(model_dir, lora_rank=0)
    (seq,) = _sequences(model.cfg.vocab_size, [24])
    temperature = 0.7
    want, hidden = _torch_logprobs(model_dir, seq, temperature)
    tokens, positions, segs = _single_row(seq)
    h, layer_outs = model(tokens, positions, segs, return_layer_outputs=True)
    # hidden_states[i] is layer i-1's output; the last one is after the final norm.
    for i in range(model.cfg.num_layers - 1):
        np.testing.assert_allclose(layer_outs[i, 0], hidden[i + 1], atol=1e-4, err_msg=f"layer {i}")
    np.testing.assert_allclose(h[0], hidden[-1], atol=1e-4, err_msg="final norm")
    logp = _logprobs(model, tokens, positions, segs, jnp.full(tokens.shape, temperature), chunk_size=16)
    assert logp[0, 0] == 0.0
    assert np.max(np.abs(np.asarray(logp[0, 1:]) - want)) <= 1e-4


def test_packed_rows_equal_separate_samples(ckpt):
    model = load_model(ckpt("qwen3"), lora_rank=0)
    a, b = _sequences(model.cfg.vocab_size, [9, 6], seed=1)
    t = 20  # 5 padding tokens at the end
    tokens = np.zeros((1, t), np.int32)
    tokens[0, :9], tokens[0, 9:15] = a, b
    positions = np.zeros((1, t), np.int32)
    positions[0, :9], positions[0, 9:15] = np.arange(9), np.arange(6)
    segs = np.zeros((1, t), np.int32)
    segs[0, :9], segs[0, 9:15] = 1, 2
    temps = jnp.ones((1, t))
    packed = _logprobs(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segs), temps)
    alone_a = _logprobs(model, *_single_row(a), jnp.ones((1, 9)))
    alone_b = _logprobs(model, *_single_row(b), jnp.ones((1, 6)))
    np.testing.assert_allclose(packed[0, :9], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 9:15], alone_b[0], atol=1e-5)
    assert packed[0, 9] == 0.0 and np.all(np.asarray(packed[0, 15:]) == 0.0)


def test_lora_equals_merged_weights(ckpt):
    model_dir = ckpt("qwen2")
    rank, alpha = 4, 16.0
    model = load_model(model_dir, lora_rank=rank, lora_alpha=alpha)
    base = load_model(model_dir, lora_rank=0)
    (seq,) = _sequences(model.cfg.vocab_size, [16], seed=2)
    args = _single_row(seq)
    temps = jnp.ones((1, len(seq)))
    # B starts at zero: the adapter is the identity.
    unadapted = _logprobs(base, *args, temps)
    np.testing.assert_allclose(_logprobs(model, *args, temps), unadapted, atol=1e-6)
    lora = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(3), 64))
    nnx.update(model, jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) * 0.05, lora))
    # Manual merge: W + (alpha / r) A @ B on every adapted kernel of the rank-0 model.
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    base_flat = dict(nnx.to_flat_state(nnx.state(base)))
    for path, var in base_flat.items():
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in flat:
            a, b = flat[path[:-1] + ("lora_a",)][...], flat[path[:-1] + ("lora_b",)][...]
            var.set_value(var[...] + (alpha / rank) * jnp.matmul(a, b))
    nnx.update(base, nnx.from_flat_state(base_flat))
    with_lora = _logprobs(model, *args, temps)
    merged = _logprobs(base, *args, temps)
    assert np.max(np.abs(np.asarray(with_lora - unadapted))) > 1e-2
    np.testing.assert_allclose(with_lora, merged, atol=1e-4)


@pytest.mark.parametrize("policy", ["nothing_saveable", "save_mlp", "save_attention"])
def test_remat_same_values_and_lora_grads(ckpt, policy):
    model_dir = ckpt("qwen3_tied")
    (seq,) = _sequences(384, [12], seed=4)
    args = _single_row(seq)
    temps = jnp.ones((1, len(seq)))

    def loss_and_grad(remat):
        model = load_model(model_dir, lora_rank=2, lora_alpha=4.0, remat=remat, remat_policy=policy)
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

        def loss(lora):
            return -jnp.sum(token_logprobs(nnx.merge(graphdef, lora, rest), *args, temps, chunk_size=5)[0])

        return jax.jit(jax.value_and_grad(loss))(lora)

    (l0, g0), (l1, g1) = loss_and_grad(False), loss_and_grad(True)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), g0, g1)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g0))
