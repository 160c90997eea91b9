"""Serve many task skeletons on one shared base model over HTTP, with dynamic batching.

    python launch/serve.py --base minilm --task-dir runs/minilm-sst2 --task-dir runs/minilm-rte --port 8000
    curl -s localhost:8000/v1/classify -d '{"task": "sst2", "inputs": ["a gripping, funny film"]}'
    python launch/serve.py --mode prompt-tuning --base minilm --task-dir runs/minilm-sst2 ...   # the baseline

Same as `skeleton-ds serve`; `--help` lists the flags (--cache-bytes, --max-batch, --max-wait-ms, ...).
Needs the serve extra: pip install 'skeleton-ds[serve]'.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from skeleton_ds.cli import run_command, serve  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command(serve, sys.argv[1:]))
