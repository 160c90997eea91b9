"""Markdown tables: the one way every report, study, results table and model card writes them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def row_line(cells: Sequence[object]) -> str:
    """One table line; an empty cell stays one space wide (`| | |`)."""
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]] = ()) -> list[str]:
    """The header, its rule and one line per row."""
    return [row_line(header), "|" + "---|" * len(header), *(row_line(r) for r in rows)]
