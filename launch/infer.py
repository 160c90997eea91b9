"""Answer a task with a compact checkpoint, or with the full model and its stage-1 prompt.

    python launch/infer.py --checkpoint DIR/compact --task sst2 --data-dir ../shared/data --split validation
    python launch/infer.py --checkpoint DIR/compact --input records.jsonl --output predictions.jsonl
    echo "a gripping, funny film" | python launch/infer.py --checkpoint DIR/compact --input -
    python launch/infer.py --base minilm --prompt DIR/prompt --task sst2 --data-dir ../shared/data

Same as `skeleton-ds infer`; `--help` lists the flags (--device, --dtype, --quant, --batch-size, ...).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from skeleton_ds.cli import infer, run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command(infer, sys.argv[1:]))
