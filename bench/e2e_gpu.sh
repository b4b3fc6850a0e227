#!/usr/bin/env bash
# The whole loop on one GPU: one vLLM server (student adapter + base-model teacher) sharing the GPU with the JAX
# trainer; a random Qwen3-0.6B-shaped model on Sokoban; a few steps; then the phase table, where each process ran
# and the adapters the server loaded: bench/layouts.py's layout `one` (its other layouts need 2 or 4 GPUs).
# Needs the GPU stack as the python3 on PATH (BUILD.md: launch/install.sh --gpu, then activate .venv).
# Usage: [STEPS=3] bash bench/e2e_gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/layouts.py --layouts=one --gpus=0 --steps="${STEPS:-3}" --out="${1:-/tmp/e2e_gpu}"
