"""The scoring tool: packed scoring equals transformers/PEFT, the CLI, and the real SmolLM2 checkpoint."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ctxd_jax.models.hf import load_model, save_adapter
from ctxd_jax.models.hf_test import randomise_lora, torch_logprobs
from ctxd_jax.score_cli import read_sequences, score
from ctxd_jax.tiny import write_tiny_checkpoint

SEQS = [[1, 17, 40, 99, 23, 5, 300, 77], [5], [2, 60, 61], list(range(3, 200)), [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    base = write_tiny_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama", std=0.1)
    model = load_model(base, lora_rank=4, lora_alpha=8)
    randomise_lora(model)
    adapter = save_adapter(model, str(tmp_path_factory.mktemp("adapter")), base_model_name_or_path=base)
    return base, adapter, model


def _peft_logprobs(base, adapter, seqs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return [torch_logprobs(hf, s) if len(s) > 1 else np.zeros(0) for s in seqs]


def test_packed_scores_match_peft(base_and_adapter):
    base, adapter, model = base_and_adapter
    # batch_tokens=256 -> rows of 256 tokens, one row per call: several calls, several sequences per row.
    got = score(model, SEQS, batch_tokens=256)
    want = _peft_logprobs(base, adapter, SEQS)
    for s, g, w in zip(SEQS, got, want):
        assert g.shape == (len(s) - 1,)
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_cli(base_and_adapter, tmp_path):
    base, adapter, model = base_and_adapter
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"tokens": s}) + "\n" for s in SEQS))
    cmd = [sys.executable, "-m", "ctxd_jax.score_cli", f"--model={base}", f"--adapter={adapter}", f"--input={inp}",
           f"--output={out}", "--batch_tokens=512"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line)["logprobs"] for line in out.read_text().splitlines()]
    assert [len(x) for x in lines] == [len(s) - 1 for s in SEQS]
    for got, want in zip(lines, score(model, SEQS)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_read_sequences_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": [1, 2]}\n{"tokens": []}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_sequences(str(bad))


@nnx.jit
def _next_token(model, tokens, length):
    # Fixed shape [1, T]: real tokens then padding (segment 0), so one compilation serves every step.
    t = tokens.shape[1]
    segments = (jnp.arange(t) < length).astype(jnp.int32)[None]
    hidden = model(tokens, jnp.arange(t)[None], segments)
    return jnp.argmax(hidden[0, length - 1] @ model.lm_head_kernel())


def test_smollm2_chat_matches_transformers_and_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctxd_jax.models.smollm2 import ensure_smollm2

    path = ensure_smollm2(os.path.expanduser("~/.cache/ctxd_jax"))
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    answer = tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    model = load_model(path)

    # Scoring the prompt + answer: JAX log-probs equal transformers' (float32).
    seq = list(prompt) + list(answer)
    got = score(model, [seq])[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    np.testing.assert_allclose(got, torch_logprobs(hf, seq), atol=1e-4)
    del hf

    # A few greedy tokens from the JAX logits answer the question.
    tokens = np.zeros((1, 64), np.int32)
    tokens[0, :len(prompt)] = prompt
    n = len(prompt)
    for _ in range(8):
        tokens[0, n] = int(_next_token(model, jnp.asarray(tokens), n))
        n += 1
    text = tok.decode(tokens[0, len(prompt):n])
    assert "Paris" in text, text
