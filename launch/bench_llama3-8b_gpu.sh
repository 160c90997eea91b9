#!/usr/bin/env bash
# The README's GPU benchmark: the llama3-8b shape (random weights), bf16, on one GPU.
#
#     bash launch/bench_llama3-8b_gpu.sh [OUT]      # writes OUT/llama3-8b/bench.{json,md,png} (default runs/bench)
#
# Contenders: peft, full, and compact models at FFN keep 0.5/0.3/0.2, each also with 4 of the 8 KV
# groups (16 of 32 query heads): --head-keep 0.5, since 0.75 (6 groups, 24 heads) rounds to all 8, as
# transformers needs hidden_size (4096) to be a multiple of the head count. compact-1 (the full
# architecture with the vocabulary head sliced: the same FLOPs as `full`) is left out, to keep the
# build (5-9 GB written, hashed, verified and loaded per compact) to a few minutes and every
# contender resident at once well inside an 80 GB card.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# `skeleton-ds bench`, less the DeepSpeed logger setup of skeleton-ds's CLI: the benchmark never uses
# DeepSpeed, and a GPU box may not have it installed.
bench() {
    "$py" -c 'import sys, skeleton_ds.cli as c; c._quiet_libraries = lambda: None; sys.exit(c.run_command(c.bench, sys.argv[1:]))' "$@"
}

# The checkpoints (a 16 GB base, then one compact at a time) go to RAM when it has room.
avail=$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9 || true)
if [ "${avail:-0}" -ge 40 ]; then export TMPDIR=/dev/shm; fi
df -h "${TMPDIR:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$py" - <<'EOF'
import torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
for _ in range(3):
    a @ b
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(20):
    a @ b
end.record()
torch.cuda.synchronize()
print(f"ceiling: bf16 8192^3 matmul {2 * 8192**3 / (start.elapsed_time(end) / 20) / 1e9:.0f} TFLOP/s (random data)")
EOF

# The whole CUDA path (PEFT, prompt cache, compact build and load) on a tiny shape first: seconds.
bench --shape tiny --device cuda --dtype bf16 --batch-sizes 4,1 --rounds 2 --output "${TMPDIR:-/tmp}/bench-tiny" >/dev/null

SECONDS=0
bench --shape llama3-8b --device cuda --dtype bf16 --batch-sizes 32,1 --ffn-keeps 0.5,0.3,0.2 --head-keep 0.5 \
    --rounds 20 --warmup 3 --output "$out/llama3-8b"
echo "llama3-8b bench: ${SECONDS} s"
