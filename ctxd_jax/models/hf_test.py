"""HF weights in and out: the name map, load errors, sharded checkpoints, and round trips through transformers/PEFT
(float32, tiny random checkpoints, randomised non-zero LoRA)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from ctxd_jax.models import names
from ctxd_jax.models.config import ModelConfig
from ctxd_jax.models.hf import load_model, save_adapter, save_merged
from ctxd_jax.models.logprobs import token_logprobs
from ctxd_jax.tiny import ARCHS, random_weights, tiny_config, write_tiny_checkpoint

TOKENS = [1, 17, 40, 99, 23, 5, 300, 77, 12, 2, 60, 61, 250, 3]
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = write_tiny_checkpoint(str(tmp_path_factory.mktemp(arch)), arch, std=0.1)
        return cache[arch]

    return get


def randomise_lora(model, seed=1, std=0.05):
    """Non-zero A and B, so a wrong transpose or scale shows in the log-probs."""
    lora = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        treedef, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
    return model


def jax_logprobs(model, tokens=TOKENS):
    t = len(tokens)
    lp, _ = token_logprobs(model, jnp.asarray([tokens]), jnp.arange(t)[None], jnp.ones((1, t), jnp.int32),
                           jnp.ones((1, t)))
    return np.asarray(lp[0, 1:])


def torch_logprobs(model, tokens=TOKENS):
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_name_map_round_trip(arch):
    cfg_dict = tiny_config(arch)
    cfg = ModelConfig.from_dict(cfg_dict)
    hf = random_weights(cfg_dict)
    entries = names.base_entries(cfg)
    assert {k for e in entries for k in e.hf_keys(cfg.num_layers)} == set(hf)
    flat = {e.path: names.to_nnx(e, hf.__getitem__, cfg.num_layers) for e in entries}
    q = flat[("layers", "self_attn", "q_proj", "kernel")]
    assert q.shape == (cfg.num_layers, cfg.hidden_size, cfg.num_heads * cfg.head_dim)
    np.testing.assert_array_equal(q[1], hf["model.layers.1.self_attn.q_proj.weight"].T)
    back = names.flat_to_hf(entries, flat)
    assert set(back) == set(hf) and all(np.array_equal(back[k], hf[k]) for k in hf)


def test_lora_keys_are_peft_names():
    a, b = names.lora_entries(["q_proj"])
    assert a.hf.format(i=3) == "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    assert b.path == ("layers", "self_attn", "q_proj", "lora_b") and b.transpose


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merged_and_adapter_match_transformers_and_peft(ckpt, tmp_path, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = ckpt(arch)
    model = load_model(src, lora_rank=RANK, lora_alpha=ALPHA)
    randomise_lora(model)
    want = jax_logprobs(model)

    merged = save_merged(model, str(tmp_path / "merged"), src_dir=src)
    assert os.path.exists(os.path.join(merged, "tokenizer.json"))
    hf_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    np.testing.assert_allclose(torch_logprobs(hf_merged), want, atol=1e-4)

    adapter = save_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=src)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter)
    np.testing.assert_allclose(torch_logprobs(peft_model), want, atol=1e-4)

    # The adapter loads back bit-exactly.
    again = load_model(src, adapter_dir=adapter)
    np.testing.assert_array_equal(jax_logprobs(again), want)


def test_lora_init_is_peft_like_and_seeded(ckpt):
    m0, m1 = load_model(ckpt("qwen3"), lora_rank=RANK, seed=0), load_model(ckpt("qwen3"), lora_rank=RANK, seed=0)
    a, b = m0.layers.mlp.up_proj.lora_a[...], m0.layers.mlp.up_proj.lora_b[...]
    assert float(jnp.abs(a).max()) > 0 and float(jnp.abs(b).max()) == 0
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(a, m1.layers.mlp.up_proj.lora_a[...])
    m2 = load_model(ckpt("qwen3"), lora_rank=RANK, seed=1)
    assert not np.array_equal(a, m2.layers.mlp.up_proj.lora_a[...])


def test_index_shards_and_bf16(ckpt, tmp_path):
    src = ckpt("qwen2")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    out = tmp_path / "sharded"
    out.mkdir()
    weight_map = {}
    for n, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: tensors[k].astype(jnp.bfloat16) for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / f).write_text(open(os.path.join(src, f)).read())

    model = load_model(str(out), param_dtype=jnp.bfloat16)
    assert model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    merged = load_file(os.path.join(save_merged(model, str(tmp_path / "m"), src_dir=str(out)), "model.safetensors"))
    assert set(merged) == set(tensors)
    assert all(v.dtype == jnp.bfloat16 for v in merged.values())
    for k in keys:
        np.testing.assert_array_equal(merged[k], tensors[k].astype(jnp.bfloat16))

    # A merged export bigger than max_shard_bytes is split into shards + index, and loads back.
    split = save_merged(model, str(tmp_path / "split"), src_dir=str(out), max_shard_bytes=100_000)
    assert not os.path.exists(os.path.join(split, "model.safetensors"))
    with open(os.path.join(split, "model.safetensors.index.json")) as f:
        assert set(json.load(f)["weight_map"]) == set(tensors)
    np.testing.assert_array_equal(jax_logprobs(load_model(split)), jax_logprobs(load_model(str(out))))


def test_adapter_with_fewer_targets(ckpt, tmp_path):
    """A PEFT adapter on q/v only (as often trained elsewhere) loads; the other modules get a zero delta."""
    src = ckpt("qwen2")
    model = load_model(src, lora_rank=RANK, lora_alpha=ALPHA)
    randomise_lora(model)
    full = save_adapter(model, str(tmp_path / "full"), base_model_name_or_path=src)
    qv = tmp_path / "qv"
    qv.mkdir()
    tensors = load_file(os.path.join(full, "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".q_proj." in k or ".v_proj." in k},
              str(qv / "adapter_model.safetensors"))
    with open(os.path.join(full, "adapter_config.json")) as f:
        config = json.load(f)
    (qv / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=["v_proj", "q_proj"])))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), str(qv))
    loaded = load_model(src, adapter_dir=str(qv))
    assert float(jnp.abs(loaded.layers.mlp.up_proj.lora_b[...]).max()) == 0
    np.testing.assert_allclose(jax_logprobs(loaded), torch_logprobs(peft_model), atol=1e-4)


def _corrupt(src, dst, edit):
    os.makedirs(dst)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(src, f)) as a, open(os.path.join(dst, f), "w") as b:
            b.write(a.read())
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_errors_name_file_and_key(ckpt, tmp_path):
    src = ckpt("qwen3")
    missing = _corrupt(src, str(tmp_path / "missing"), lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(missing)
    extra = _corrupt(src, str(tmp_path / "extra"), lambda t: t.update(extra_weight=np.zeros(3, np.float32)))
    with pytest.raises(KeyError, match=r"unexpected.*extra_weight"):
        load_model(extra)

    def wrong(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 128), np.float32)

    bad = _corrupt(src, str(tmp_path / "shape"), wrong)
    with pytest.raises(ValueError, match=r"shape/model\.safetensors.*k_proj\.weight.*\(3, 128\)"):
        load_model(bad)
    adapter = save_adapter(load_model(src, lora_rank=RANK), str(tmp_path / "ad"), base_model_name_or_path=src)
    with pytest.raises(ValueError, match="lora_rank is 4, but 8"):
        load_model(src, lora_rank=8, adapter_dir=adapter)


_SHARDED = """
import jax, numpy as np
from ctxd_jax.models.hf import load_model
from ctxd_jax.sharding import make_mesh
assert len(jax.devices()) == 8
mesh = make_mesh(tp=2)
m1 = load_model({src!r}, lora_rank=4)
m8 = load_model({src!r}, lora_rank=4, mesh=mesh)
k = m8.layers.mlp.up_proj.kernel[...]
assert len(k.sharding.device_set) == 8 and k.addressable_shards[0].data.shape != k.shape, k.sharding
from ctxd_jax.models.hf_test import jax_logprobs, randomise_lora
randomise_lora(m1); randomise_lora(m8)
np.testing.assert_allclose(jax_logprobs(m8), jax_logprobs(m1), atol=1e-5)
print("OK", k.sharding.spec)
"""


def test_sharded_load_on_8_fake_devices(ckpt):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED.format(src=ckpt("qwen3"))], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
