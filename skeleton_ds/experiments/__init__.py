"""Experiments: the results tables, studies, load tests and scale runs that measure the product.

They import the library and nothing in the library imports them, but the CLI, the top floor, which keeps
`skeleton-ds reproduce` as a user command (tests/test_layout.py). Each module runs from a checkout, writing its
JSON, markdown and plot beside the others in docs/results/:

    python -m skeleton_ds.experiments.study_keep --data-dir ../shared/data --output runs/study-keep
"""

import shlex
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
"""The checkout the experiments run from (docs/results/, runs/, launch/train.py)."""
DOCS = CHECKOUT / "docs" / "results"


def command_line(name: str, argv: list[str] | None) -> str:
    """How experiment `name` was run, for its record: `python -m skeleton_ds.experiments.NAME ARGS`."""
    return shlex.join(["python", "-m", f"skeleton_ds.experiments.{name}", *(sys.argv[1:] if argv is None else argv)])
