"""Why is sampling slow in the GPU end-to-end run? One vLLM server on a random model, the same batch of requests
with and without per-token log-probs, through the base model and through a LoRA adapter. Table printed last.

    python bench/sampling_probe.py MODEL_DIR [--requests=64 --n=4 --max_tokens=256]
"""

import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctxd_jax.inference.client import Client  # noqa: E402
from ctxd_jax.inference.server import VLLMServer  # noqa: E402


async def timed(client: Client, *, model: str, logprobs: bool, requests: int, n: int, max_tokens: int) -> float:
    body = {"model": model, "prompt": list(range(3, 200)), "n": n, "max_tokens": max_tokens, "temperature": 1.0,
            "ignore_eos": True, "return_token_ids": True}
    if logprobs:
        body["logprobs"] = 0
    t = time.perf_counter()
    await asyncio.gather(*(client.request("POST", "/v1/completions", json=body) for _ in range(requests)))
    return requests * n * max_tokens / (time.perf_counter() - t)


async def probe(server: VLLMServer, adapter: str, a) -> list[tuple[str, float]]:
    client = Client.for_server(server)
    await client.load_adapter("student", adapter)
    rows = []
    for model in ("base", "student"):
        for logprobs in (False, True):
            await timed(client, model=model, logprobs=logprobs, requests=4, n=1, max_tokens=16)  # warm-up
            tps = await timed(client, model=model, logprobs=logprobs, requests=a.requests, n=a.n,
                              max_tokens=a.max_tokens)
            rows.append((f"{'LoRA adapter' if model == 'student' else 'base model'}, logprobs={logprobs}", tps))
    await client.aclose()
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max_tokens", type=int, default=256)
    a = p.parse_args()
    import jax.numpy as jnp

    from ctxd_jax.models.hf import load_model, save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_adapter(load_model(a.model, lora_rank=16, lora_alpha=64, dtype=jnp.bfloat16,
                                          param_dtype=jnp.bfloat16), os.path.join(tmp, "adapter"),
                               base_model_name_or_path=a.model)
        server = VLLMServer(a.model, name="probe", served_name="base", gpu_ids=(0,), lora_rank=16,
                            gpu_memory_utilization=0.6, log_dir=tmp, max_model_len=2048)
        with server:
            rows = asyncio.run(probe(server, adapter, a))
    print(f"\n{a.requests} requests x n={a.n} x {a.max_tokens} tokens, generated tokens/s:")
    for name, tps in rows:
        print(f"{name:36s} {tps:10.0f}")


if __name__ == "__main__":
    main()
