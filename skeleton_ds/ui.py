"""Rank-0 console output: a rich progress bar while training and a table of results at the end."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class _Bar:
    def __init__(self, progress: Progress | None, task_id):
        self._progress, self._task = progress, task_id

    def update(self, step: int, *, loss: float, lr: float, rate: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=loss, lr=lr, rate=rate)


class Reporter:
    """Prints only where `enabled` (rank 0), so callers never branch on rank."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.console = Console(stderr=False)

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[bold]skeleton_ds[/]: {message}")

    @contextmanager
    def progress(self, total: int, start: int, description: str) -> Iterator[_Bar]:
        if not self.enabled:
            yield _Bar(None, None)
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[rate]:.1f} ex/s"),
                   TimeElapsedColumn()]
        with Progress(*columns, console=self.console) as progress:
            task_id = progress.add_task(description, total=total, completed=start,
                                        loss=float("nan"), lr=0.0, rate=0.0)
            yield _Bar(progress, task_id)

    def metrics_table(self, title: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        table = Table(title=title)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in metrics.items():
            table.add_row(name, f"{value:.4f}")
        self.console.print(table)
