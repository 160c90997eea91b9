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


def publish(output: Path, name: str, record: dict, table: str, *, docs: bool, figure: bool = False) -> None:
    """A study's record and table as OUTPUT/study.{json,md}; with `docs`, the same as docs/results/NAME.{json,md},
    and, with `figure`, its plot OUTPUT/study.png as docs/results/NAME.png. Every file atomic."""
    from skeleton_ds.checkpoint import copy_atomically, write_report

    write_report(output / "study.json", record, table)
    if docs:
        write_report(DOCS / f"{name}.json", record, table)
        if figure:
            copy_atomically(output / "study.png", DOCS / f"{name}.png")
