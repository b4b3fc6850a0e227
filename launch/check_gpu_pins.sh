#!/usr/bin/env bash
# Checks, installing nothing, that the GPU set resolves: pip resolves `.[gpu,test]` with launch/gpu-constraints.txt
# for CPython 3.12 on manylinux x86_64 (from any machine with Python 3.12 and PyPI; no GPU needed) and every package
# it picks is pinned there. Prints the versions that matter. Run it after editing the gpu extra or the constraints.
# pip reads each wheel to resolve, so it downloads several GB into a temporary folder (~3 min on a fast link).
# Env: PYTHON (default python3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.12}
PLATFORMS=(--platform manylinux2014_x86_64 --platform linux_x86_64 --platform any)
for m in $(seq 17 39); do PLATFORMS+=(--platform "manylinux_2_${m}_x86_64"); done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PYTHON" -m pip install --quiet --disable-pip-version-check --dry-run --ignore-installed --target "$TMP/target" \
  --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  --report "$TMP/report.json" -c launch/gpu-constraints.txt '.[gpu,test]'
"$PYTHON" - "$TMP/report.json" launch/gpu-constraints.txt <<'PY'
import json, re, sys

norm = lambda name: re.sub(r"[-_.]+", "-", name.lower())
picked = {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
pins = dict(norm(line).strip().split("==") for line in open(sys.argv[2]) if "==" in line and not line.startswith("#"))
# The project itself, and the two packages pyproject.toml's gpu extra pins, are not repeated in the constraints.
loose = sorted(n for n in picked if n not in pins and n not in ("ctxd-jax", "vllm", "jax"))
print(" ".join(f"{n}=={picked[n]}" for n in ("vllm", "torch", "jax", "jax-cuda13-plugin", "flax", "transformers")))
print(f"{len(picked)} packages resolved")
if loose:
    sys.exit("not pinned in launch/gpu-constraints.txt: " + ", ".join(f"{n}=={picked[n]}" for n in loose))
PY
