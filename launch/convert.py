"""Convert a base checkpoint + skeleton into a compact, standard Hugging Face model directory (stage 4).

    python launch/convert.py --base M --skeleton DIR/skeleton.json --prompt DIR/prompt --output DIR/compact

Streams tensor by tensor (peak memory about one tensor); needs no GPU and no process group.
Same as `skeleton-ds convert ...` (skeleton_ds.conversion.convert); inside the pipeline the stage is
`--stages convert` of launch/train.py (skeleton_ds/stages/convert.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from skeleton_ds.cli import convert, run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command(convert, sys.argv[1:]))
