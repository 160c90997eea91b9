"""Rank-0 console output: a rich progress bar while training and a table of results at the end."""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class _Bar:
    """Live bar on a terminal; in batch-job logs (no terminal) a plain line every tenth of the run."""

    def __init__(self, progress: Progress | None, task_id, console: Console | None = None, total: int = 0,
                 stats: str = ""):
        self._progress, self._task, self._console = progress, task_id, console
        self._log_every = max(1, total // 10)
        self._total, self._stats = total, stats

    def update(self, step: int, **values: float) -> None:
        if self._progress is None:
            return
        stats = self._stats.format(**values)
        self._progress.update(self._task, completed=step, stats=stats)
        if not self._console.is_terminal and (step % self._log_every == 0 or step == self._total):
            self._console.print(f"step {step}/{self._total}  {stats}")


class Reporter:
    """Prints only where `enabled` (rank 0), so callers never branch on rank."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.console = Console(stderr=False)

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[bold]skeleton_ds[/]: {message}")

    @contextmanager
    def progress(self, total: int, start: int, description: str, stats: str = "{rate:.1f} ex/s") -> Iterator[_Bar]:
        """`stats` is a format string over the values each update() passes."""
        if not self.enabled:
            yield _Bar(None, None)
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[stats]}"), TimeElapsedColumn()]
        with Progress(*columns, console=self.console) as progress:
            task_id = progress.add_task(description, total=total, completed=start, stats="")
            yield _Bar(progress, task_id, self.console, total, stats)

    def metrics_table(self, title: str, metrics: dict[str, float], caption: str = "") -> None:
        if not self.enabled:
            return
        table = Table(title=title, caption=caption or None)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in metrics.items():
            table.add_row(name, f"{value:.4f}")
        self.console.print(table)


def print_table(title: str, header: list[str], rows: list[list[str]], caption: str = "") -> None:
    """A plain rich table (benchmarks); the first column is left-aligned, the others right-aligned."""
    table = Table(title=title, caption=caption or None)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    (console if console.is_terminal else Console(width=220)).print(table)  # logs keep whole rows
