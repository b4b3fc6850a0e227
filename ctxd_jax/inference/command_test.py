"""Server command lines and environments (no vLLM started)."""

import pytest

from ctxd_jax.inference.command import server_args, server_env, vllm_lora_rank


def test_vllm_lora_rank():
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 16, 33, 64)] == [1, 8, 8, 16, 16, 64, 64]
    with pytest.raises(ValueError, match="lora rank 1000"):
        vllm_lora_rank(1000)


def _opts(args):
    """{flag: value} of `--flag=value` words, True for a bare `--switch`; every word after the module is an option."""
    words = args[args.index("vllm.entrypoints.openai.api_server") + 1:]
    assert all(w.startswith("--") for w in words), words
    return dict((w[2:].split("=", 1) + [True])[:2] for w in words)


def test_server_args_cpu_and_gpu():
    common = dict(served_name="base", port=8000, tp=2, dp=3, gpu_memory_utilization=0.45,
                  dtype=None, max_model_len=1024, lora_rank=12, max_loras=2, enforce_eager=False)
    cpu = _opts(server_args("/m", gpu=False, **common))
    assert cpu["dtype"] == "float32" and cpu["enforce-eager"] is True
    assert "tensor-parallel-size" not in cpu and cpu["max-lora-rank"] == "16"
    assert cpu["host"] == "127.0.0.1" and cpu["port"] == "8000"
    assert cpu["logprobs-mode"] == "processed_logprobs" and cpu["max-logprobs"] == "20"
    gpu = _opts(server_args("/m", gpu=True, **common))
    assert gpu["tensor-parallel-size"] == "2" and gpu["data-parallel-size"] == "3"
    assert gpu["gpu-memory-utilization"] == "0.45" and "enforce-eager" not in gpu
    assert "enable-lora" not in _opts(server_args("/m", gpu=True, **{**common, "lora_rank": 0}))


def test_values_cannot_be_read_as_flags():
    # A path or name may start with '-'. Each is glued to its flag.
    args = server_args("-model dir", served_name="--served", port=None, gpu=False, tp=1, dp=1,
                       gpu_memory_utilization=0.9, dtype=None, max_model_len=64, lora_rank=0, max_loras=1,
                       enforce_eager=False, uds="/tmp/-x/vllm.sock", max_logprobs=50)
    opts = _opts(args)
    assert (opts["model"], opts["served-model-name"]) == ("-model dir", "--served")
    assert opts["uds"] == "/tmp/-x/vllm.sock" and "port" not in opts and "host" not in opts
    assert opts["max-logprobs"] == "50"


def test_server_env():
    cpu = server_env(gpu_ids=None, cpu_core=1, kv_cache_gib=2, lora=True, dev_mode=False, cache_dir="/c",
                     base={"CUDA_VISIBLE_DEVICES": "0"})
    assert cpu["VLLM_CPU_OMP_THREADS_BIND"] == "1" and cpu["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert cpu["HF_HUB_OFFLINE"] == "1" and cpu["VLLM_CACHE_ROOT"] == "/c/vllm" and "VLLM_SERVER_DEV_MODE" not in cpu
    gpu = server_env(gpu_ids=(2, 3), cpu_core=None, kv_cache_gib=1, lora=False, dev_mode=True, cache_dir=None,
                     base={})
    assert gpu["CUDA_VISIBLE_DEVICES"] == "2,3" and gpu["VLLM_SERVER_DEV_MODE"] == "1"
    assert gpu["VLLM_USE_FLASHINFER_SAMPLER"] == "0" and "VLLM_CPU_KVCACHE_SPACE" not in gpu
