#!/usr/bin/env bash
# The loop on one GPU: one vLLM server (student LoRA adapter + base model) shares GPU 0 with the JAX trainer, which
# scores the base-model teacher itself (teacher.scorer auto; for a vLLM teacher on that server add
# --teacher_gpu_ids=0 --config.teacher.scorer=vllm).
# The shares below (0.65 + 0.3 <= 1, checked before anything starts) are the ones bench/e2e_gpu.sh ran with on an
# H100 (BENCHMARKS.md section 2). Usage: MODEL=/path/to/hf_folder bash launch/one_gpu.sh [--config.FIELD=VALUE ...]
# (add --dry_run to print the plan only).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a local Hugging Face folder}"
exec "${PYTHON:-python3}" -m ctxd_jax.train --config=configs/rl.py --config.model.path="$MODEL" \
  --inference_gpu_ids=0 --trainer_gpu_ids=0 \
  --config.inference.gpu_memory_utilization=0.65 --config.trainer.gpu_memory_fraction=0.3 "$@"
