#!/usr/bin/env bash
# The GPU check of issue 18 (launch/gpu_check.py says what it measures): one call of the device machine.
#
#   bash launch/gpu_check.sh prepare    # here, first: wheels the device lacks into .whl/, an SST-2 slice
#                                       # and this checkout's commit into .device/ (both git-ignored)
#   then one device call:  run(command="bash launch/gpu_check.sh", carry=[".whl", ".device"], timeout_s=600)
#
# On the device it installs the carried wheels (DeepSpeed, built here as a pure-Python wheel whose ops build
# at run time; transformers and pydantic at this checkout's versions) into /tmp/site, runs the check with
# its results under $OUT (gpu_check.json, bench.json, bench.png, align*.json, gpu.txt, log.txt: the device
# tool brings back 8 files at most), and exits non-zero if a run failed.
# Extra arguments go to launch/gpu_check.py (e.g. --phases bench).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
  py=${PYTHON:-.venv/bin/python}
  rm -rf .whl && mkdir -p .whl
  ds=$("$py" -c 'from importlib.metadata import version; print(version("deepspeed"))')
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$ds"
  pins=$("$py" -c 'from importlib.metadata import version as v
print(" ".join(f"{n}=={v(n)}" for n in ("transformers", "pydantic", "pydantic-core", "annotated-types",
                                        "typing-inspection", "hjson")))')
  # the device runs Python 3.12 on x86-64
  # shellcheck disable=SC2086
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
  "$py" launch/gpu_check.py --prepare-data "${DATA_DIR:-../shared/data}" --examples "${EXAMPLES:-512}"
  du -sh .whl .device
  exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-runs/gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
python3 launch/gpu_check.py --output "$out" --examples "${EXAMPLES:-512}" "$@" 2>&1 | tee "$out/log.txt"
