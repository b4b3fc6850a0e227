#!/usr/bin/env bash
# The whole loop on one GPU: one vLLM server (student adapter + base-model teacher) sharing the GPU with the JAX
# trainer; a random Qwen3-0.6B-shaped model on Sokoban; a few steps; then the phase table.
# Needs the GPU stack as the python3 on PATH (BUILD.md: launch/install.sh --gpu, then activate .venv).
# Usage: bash bench/e2e_gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-/tmp/e2e_gpu}
MODEL=/tmp/qwen3-0.6b-random
STEPS=${STEPS:-3}
[ -f "$MODEL/model.safetensors" ] || python3 -c "
from ctxd_jax.tiny import write_tiny_checkpoint
write_tiny_checkpoint('$MODEL', 'qwen3_tied', hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                      head_dim=128, intermediate_size=3072, vocab_size=1024, model_vocab_size=151936)"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m ctxd_jax.train --config=configs/rl.py --config.model.path="$MODEL" \
  --inference_gpu_ids=0 --teacher_gpu_ids=0 --trainer_gpu_ids=0 \
  --config.inference.gpu_memory_utilization=0.65 --config.trainer.gpu_memory_fraction=0.3 \
  --config.max_steps="$STEPS" --config.batch_size=256 --config.rollouts_per_example=16 \
  --config.sampling.max_tokens=1024 --config.seq_len=4096 --config.teacher.eval_baseline=False \
  --config.ckpt.interval=0 --config.log.tensorboard=False --config.output_dir="$OUT_DIR/run" \
  --config.ckpt.overwrite=true
cp "$OUT_DIR"/run/logs/*.log "$OUT_DIR/vllm.log" 2>/dev/null || true
python3 bench/phase_table.py "$OUT_DIR/run/metrics.jsonl"
