"""Adapter hand-off cost on the trainer side: save_adapter of a LoRA r16 (all seven projections) on a random
Qwen3 of a real shape. Prints seconds and MB per shape (median of 5)."""

import os
import statistics
import sys
import tempfile
import time

import jax.numpy as jnp
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from shapes import hf_config  # noqa: E402

from ctxd_jax.models.config import ModelConfig  # noqa: E402
from ctxd_jax.models.hf import save_adapter  # noqa: E402
from ctxd_jax.models.transformer import Transformer  # noqa: E402

for shape in sys.argv[1:] or ["0.6b", "4b"]:
    model = Transformer(ModelConfig.from_dict(hf_config(shape)), lora_rank=16, lora_alpha=64, dtype=jnp.bfloat16,
                        param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    times = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(6):
            t = time.perf_counter()
            path = save_adapter(model, os.path.join(d, f"step_{i}"), base_model_name_or_path="base")
            times.append(time.perf_counter() - t)
        mb = os.path.getsize(os.path.join(path, "adapter_model.safetensors")) / 2**20
    print(f"{shape}: save_adapter {statistics.median(times[1:]):.3f} s for {mb:.0f} MB")
