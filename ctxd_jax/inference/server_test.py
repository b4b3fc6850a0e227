"""Server command lines and environments, and process-group scanning (no vLLM started)."""

import os

import pytest

from ctxd_jax.inference.server import group_members, server_args, server_env, vllm_lora_rank


def test_vllm_lora_rank():
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 16, 33, 64)] == [1, 8, 8, 16, 16, 64, 64]
    with pytest.raises(ValueError, match="lora rank 1000"):
        vllm_lora_rank(1000)


def test_server_args_cpu_and_gpu():
    common = dict(served_name="base", port=8000, api_key="k", tp=2, dp=3, gpu_memory_utilization=0.45,
                  dtype=None, max_model_len=1024, lora_rank=12, max_loras=2, enforce_eager=False)
    cpu = server_args("/m", gpu=False, **common)
    assert cpu[cpu.index("--dtype") + 1] == "float32" and "--enforce-eager" in cpu
    assert "--tensor-parallel-size" not in cpu and cpu[cpu.index("--max-lora-rank") + 1] == "16"
    assert cpu[cpu.index("--api-key") + 1] == "k" and cpu[cpu.index("--host") + 1] == "127.0.0.1"
    assert cpu[cpu.index("--logprobs-mode") + 1] == "processed_logprobs"
    gpu = server_args("/m", gpu=True, **common)
    assert gpu[gpu.index("--tensor-parallel-size") + 1] == "2" and gpu[gpu.index("--data-parallel-size") + 1] == "3"
    assert gpu[gpu.index("--gpu-memory-utilization") + 1] == "0.45" and "--enforce-eager" not in gpu
    no_key = server_args("/m", gpu=True, **{**common, "api_key": None, "lora_rank": 0})
    assert "--api-key" not in no_key and "--enable-lora" not in no_key


def test_server_env():
    cpu = server_env(gpu_ids=None, cpu_core=1, kv_cache_gib=2, lora=True, dev_mode=False, cache_dir="/c",
                     base={"CUDA_VISIBLE_DEVICES": "0"})
    assert cpu["VLLM_CPU_OMP_THREADS_BIND"] == "1" and cpu["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "CUDA_VISIBLE_DEVICES" not in cpu and cpu["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert cpu["HF_HUB_OFFLINE"] == "1" and cpu["VLLM_CACHE_ROOT"] == "/c/vllm" and "VLLM_SERVER_DEV_MODE" not in cpu
    gpu = server_env(gpu_ids=(2, 3), cpu_core=None, kv_cache_gib=1, lora=False, dev_mode=True, cache_dir=None,
                     base={})
    assert gpu["CUDA_VISIBLE_DEVICES"] == "2,3" and gpu["VLLM_SERVER_DEV_MODE"] == "1"
    assert gpu["VLLM_USE_FLASHINFER_SAMPLER"] == "0" and "VLLM_CPU_KVCACHE_SPACE" not in gpu


def test_group_members_sees_own_group():
    assert os.getpid() in group_members(os.getpgrp())
