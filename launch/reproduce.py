"""Reproduce the results table: the real MiniLM on five real tasks, Skeleton against honest controls.

    python launch/reproduce.py --data-dir ../shared/data                       # the full table (about 2 h on 2 cores)
    python launch/reproduce.py --data-dir ../shared/data --tasks cb --seeds 1 --ffn-keeps 0.5 --quick   # minutes

Writes runs/reproduce/reproduce.json and docs/results/reproduce.{json,md,png}. Same as `skeleton-ds reproduce`;
what each run does is in skeleton_ds/stages/reproduce.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from skeleton_ds.cli import reproduce, run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command(reproduce, sys.argv[1:]))
