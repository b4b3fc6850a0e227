"""RoPE types and config.json layouts against transformers (float32): checkpoints that transformers itself writes,
scored through ctxd_jax.score_cli and the trainer's token_logprobs; configs not built are refused, naming the field."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ctxd_jax.models.config import ModelConfig
from ctxd_jax.models.hf import load_model
from ctxd_jax.models.hf_test import jax_logprobs, torch_logprobs
from ctxd_jax.models.transformer import rope_sin_cos
from ctxd_jax.score_cli import score
from ctxd_jax.score_cli_test import SEQS
from ctxd_jax.tiny import write_tokenizer

# GQA (4 query heads, 2 kv heads) everywhere.
SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=256, max_position_embeddings=1024)
LLAMA3 = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
# Qwen's long-context recipe: max_position_embeddings = factor x original (vLLM caches that many positions).
YARN = dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=256)
# name: (model_type, config fields given to transformers, layout). "v5": the config.json transformers 5 writes
# (rope_parameters); "v4": rewritten to transformers 4's layout (top-level rope_theta, rope_scaling with "type").
CASES = {
    "qwen3_default": ("qwen3", dict(rope_parameters=dict(rope_type="default", rope_theta=1e6)), "v5"),
    "qwen2_default": ("qwen2", dict(rope_parameters=dict(rope_type="default", rope_theta=1e6)), "v5"),
    "llama_default_tied": ("llama", dict(rope_theta=1e5, tie_word_embeddings=True), "v5"),
    "qwen3_yarn_tied": ("qwen3", dict(rope_parameters=YARN, tie_word_embeddings=True, head_dim=64), "v5"),
    "qwen2_yarn": ("qwen2", dict(rope_parameters=YARN), "v4"),
    "llama3_tied": ("llama", dict(rope_parameters=LLAMA3, tie_word_embeddings=True), "v5"),
    "llama3_biases": ("llama", dict(rope_parameters=LLAMA3, attention_bias=True, mlp_bias=True), "v4"),
    "llama_linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=4.0)), "v5"),
    "qwen3_dynamic": ("qwen3", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=4.0)), "v5"),
}


def to_v4(config: dict) -> dict:
    """transformers 5's config.json in transformers 4's layout (what older fine-tunes carry)."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    if rope_type != "default":
        config["rope_scaling"] = dict(rope, type=rope_type)
    config.pop("layer_types", None)  # transformers 4 derived it from the sliding-window fields
    return config


def hf_checkpoint(out_dir: str, model_type: str, fields: dict, layout: str = "v5", seed: int = 0) -> str:
    """A random checkpoint written by transformers' save_pretrained (+ a tokenizer, for vLLM): std 0.1 weights,
    norms 1 + noise, so that RoPE and weight errors show in log-probs."""
    os.makedirs(out_dir, exist_ok=True)
    config = AutoConfig.for_model(model_type, **SHAPE, vocab_size=write_tokenizer(out_dir, 384), **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=gen)
            p.copy_(1 + noise if "norm" in name else noise)
    model.save_pretrained(out_dir)
    if layout == "v4":
        path = os.path.join(out_dir, "config.json")
        with open(path) as f:
            config = to_v4(json.load(f))
        with open(path, "w") as f:
            json.dump(config, f, indent=1)
    return out_dir


def default_rope_logprobs(hf_model, tokens) -> np.ndarray:
    """transformers' log-probs with the checkpoint's RoPE replaced by plain RoPE of the same theta: what a loader
    that ignores the RoPE type would compute."""
    rotary = hf_model.model.rotary_emb
    dim = rotary.inv_freq.shape[0] * 2
    theta = hf_model.config.rope_parameters["rope_theta"]
    rotary.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    rotary.attention_scaling = 1.0
    return torch_logprobs(hf_model, tokens)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = hf_checkpoint(str(tmp_path_factory.mktemp(name)), *CASES[name])
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_scores_match_transformers(ckpt, name):
    src = ckpt(name)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model = load_model(src)
    rope = model.cfg.rope
    assert rope.rope_type == CASES[name][1].get("rope_parameters", {}).get("rope_type", "default")
    np.testing.assert_allclose(rope.inv_freq, hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    assert rope.attention_scaling == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-7)

    want = [torch_logprobs(hf, s) if len(s) > 1 else np.zeros(0) for s in SEQS]
    for seq, got, w in zip(SEQS, score(model, SEQS, batch_tokens=512), want):  # packed rows, as ctxd_jax.score_cli
        np.testing.assert_allclose(got, w, atol=1e-4)
    long = SEQS[3]
    np.testing.assert_allclose(jax_logprobs(model, long), want[3], atol=1e-4)  # one row, as the trainer
    if rope.rope_type not in ("default", "dynamic"):  # the type matters: loading it as default RoPE would fail
        assert np.max(np.abs(default_rope_logprobs(hf, long) - want[3])) > 1e-2


def test_score_cli_reads_a_transformers5_config(ckpt, tmp_path):
    """A checkpoint saved by transformers 5 keeps rope_theta inside rope_parameters only."""
    src = ckpt("qwen3_default")
    assert "rope_theta" not in json.load(open(os.path.join(src, "config.json")))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"tokens": s}) + "\n" for s in SEQS))
    cmd = [sys.executable, "-m", "ctxd_jax.score_cli", f"--model={src}", f"--input={inp}", f"--output={out}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for line, seq in zip(out.read_text().splitlines(), SEQS):
        if len(seq) > 1:
            np.testing.assert_allclose(json.loads(line)["logprobs"], torch_logprobs(hf, seq), atol=1e-4)


# Config layouts and RoPE keys beyond the checkpoints above: frequencies as transformers builds them.
_BASE = dict(model_type="llama", vocab_size=64, **SHAPE)
LAYOUTS = {
    "no_rope_keys": {},
    "v4_top_level_original_max": dict(rope_theta=5e5, original_max_position_embeddings=32,
                                      rope_scaling=dict(LLAMA3, rope_type=None, type="llama3")),
    "rope_scaling_wins_over_rope_parameters": dict(rope_scaling=dict(rope_type="linear", factor=2.0),
                                                   rope_parameters=dict(rope_type="llama3"), rope_theta=3e4),
    "theta_beside_rope_parameters": dict(rope_parameters=dict(rope_type="linear", factor=2.0), rope_theta=3e4),
    "theta_in_both": dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=7e3), rope_theta=3e4),
    "yarn_mscale_betas_no_truncate": dict(rope_parameters=dict(
        YARN, mscale=0.9, mscale_all_dim=0.7, beta_fast=16, beta_slow=2, truncate=False)),
    "yarn_attention_factor": dict(rope_parameters=dict(YARN, attention_factor=1.3)),
    "yarn_defaults_original_max": dict(rope_parameters=dict(rope_type="yarn", factor=2.0)),
    "qwen3_default_head_dim": dict(model_type="qwen3", head_dim=None, rope_theta=1e6),
    "dynamic_within_max_positions": dict(rope_scaling=dict(type="dynamic", factor=3.0)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_read_like_transformers(tmp_path, name):
    config = {k: v for k, v in dict(_BASE, **LAYOUTS[name]).items() if v is not None}
    for key in ("rope_scaling", "rope_parameters"):
        if key in config:
            config[key] = {k: v for k, v in config[key].items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    rotary = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path)).model.rotary_emb
    rope = ModelConfig.from_hf(str(tmp_path)).rope
    np.testing.assert_allclose(rope.inv_freq, rotary.inv_freq.numpy(), rtol=1e-6)
    assert rope.attention_scaling == pytest.approx(rotary.attention_scaling, rel=1e-7)


def test_dynamic_refuses_rows_past_max_positions(ckpt):
    rope = ModelConfig.from_hf(ckpt("qwen3_dynamic")).rope
    rope_sin_cos(jnp.zeros((1, 1024), jnp.int32), rope)
    with pytest.raises(ValueError, match=r"'dynamic'.*1025 tokens.*max_position_embeddings 1024"):
        rope_sin_cos(jnp.zeros((1, 1025), jnp.int32), rope)


_QWEN = dict(model_type="qwen3", vocab_size=64, head_dim=32, **SHAPE)
REFUSED = {
    "longrope": (dict(rope_parameters=dict(rope_type="longrope", short_factor=[1.0] * 16, long_factor=[2.0] * 16)),
                 r"rope_parameters\.rope_type 'longrope' is not supported"),
    "proportional": (dict(rope_parameters=dict(rope_type="proportional", rope_theta=1e4)),
                     r"rope_type 'proportional' is not supported"),
    "legacy_unknown": (dict(rope_scaling=dict(type="su", factor=2.0)), r"rope_scaling\.rope_type 'su'"),
    "vllm_only_key": (dict(rope_parameters=dict(rope_type="default", mrope_section=[8, 4, 4])),
                      r"rope_parameters\.mrope_section: unknown RoPE key"),
    "missing_key": (dict(rope_scaling=dict(rope_type="llama3", factor=8.0, high_freq_factor=4.0)),
                    r"rope_scaling\.low_freq_factor: required by rope_type 'llama3'"),
    "type_conflict": (dict(rope_scaling=dict(type="yarn", rope_type="linear", factor=2.0)), r"disagree"),
    "per_layer_type": (dict(rope_parameters=dict(full_attention=dict(rope_type="default"))), r"per layer type"),
    "partial_rotary_top": (dict(partial_rotary_factor=0.5), r"partial_rotary_factor 0\.5"),
    "partial_rotary_in_rope": (dict(rope_parameters=dict(rope_type="default", partial_rotary_factor=0.25)),
                               r"partial_rotary_factor 0\.25"),
    "activation": (dict(hidden_act="gelu"), r"hidden_act 'gelu'"),
    "quantized": (dict(quantization_config=dict(quant_method="awq")), r"quantization_config"),
    "qwen3_attention_bias": (dict(attention_bias=True), r"attention_bias true is not supported for qwen3"),
    "sliding_window": (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1),
                       r"use_sliding_window true.*max_window_layers 1.*sliding_window 64"),
    "sliding_layer_types": (dict(layer_types=["full_attention", "sliding_attention"]), r"layer_types"),
    "family": (dict(model_type="mistral"), r"model_type 'mistral'"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_the_field_named(name):
    fields, message = REFUSED[name]
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(dict(_QWEN, **fields), source="ckpt/config.json")


def test_accepted_fields():
    # Qwen2.5's published sliding-window fields with use_sliding_window off; Qwen2's attention_bias is ignored by
    # transformers (its q/k/v always have biases); llama's biases.
    qwen25 = ModelConfig.from_dict(dict(_QWEN, model_type="qwen2", use_sliding_window=False, sliding_window=131072,
                                        max_window_layers=1, attention_bias=False))
    assert qwen25.biases == ("q_proj", "k_proj", "v_proj")
    llama = ModelConfig.from_dict(dict(_QWEN, model_type="llama", attention_bias=True, head_dim=None))
    assert llama.biases == ("q_proj", "k_proj", "v_proj", "o_proj") and llama.head_dim == 32
    assert ModelConfig.from_dict(dict(_QWEN, head_dim=None)).head_dim == 128  # transformers' Qwen3 default
