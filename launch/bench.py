"""Benchmark compact checkpoints against the full model and PEFT prompt tuning, in one process.

    python launch/bench.py --shape llama-160m                       # CPU or GPU; random weights
    python launch/bench.py --shape tinyllama-1.1b --batch-sizes 8,1  # on a CPU, a smaller batch
    python launch/bench.py --shape llama3-8b --device cuda            # GPU only (bf16)
    python launch/bench.py --shape minilm --run-dir runs/minilm-sst2 --data-dir ../shared/data --quant 8bit,4bit

Writes runs/bench/SHAPE/bench.json and bench.png and prints a table. Same as `skeleton-ds bench`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from skeleton_ds.cli import bench, run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command(bench, sys.argv[1:]))
