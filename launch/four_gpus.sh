#!/usr/bin/env bash
# The loop on four GPUs of one host, in the reference's two layouts (both ran on 4×H100: BENCHMARKS.md §4):
#   LAYOUT=separate (default): student server on GPU 0, teacher server on GPU 1, trainer mesh over GPUs 2,3.
#   LAYOUT=shared: student server with dp=2 on GPUs 0,1, the teacher server also on GPU 1 (both servers take
#     inference.gpu_memory_utilization of each of their GPUs, so 0.45 + 0.45 on GPU 1), trainer mesh over GPUs 2,3.
# Both give the teacher its own vLLM server (teacher.scorer=vllm); by default the trainer would score a base-model
# teacher and start none.
# Usage: MODEL=/path/to/hf_folder [LAYOUT=shared] bash launch/four_gpus.sh [--config.FIELD=VALUE ...] [--dry_run]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a local Hugging Face folder}"
case "${LAYOUT:-separate}" in
  separate) GPUS=(--inference_gpu_ids=0 --teacher_gpu_ids=1 --trainer_gpu_ids=2,3) ;;
  shared) GPUS=(--inference_gpu_ids=0,1 --teacher_gpu_ids=1 --trainer_gpu_ids=2,3 --config.inference.parallel.dp=2
                --config.inference.gpu_memory_utilization=0.45) ;;
  *) echo "LAYOUT: '$LAYOUT' is not separate or shared" >&2; exit 2 ;;
esac
exec "${PYTHON:-python3}" -m ctxd_jax.train --config=configs/rl.py --config.model.path="$MODEL" "${GPUS[@]}" \
  --config.teacher.scorer=vllm "$@"
