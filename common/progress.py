"""Progress bars for long steps (synthesis, preprocessing, rounds), drawn by rich on a terminal only.

On a terminal a bar shows what is done, the rate and the time left; in a log file, a CI job or
a test (no terminal) the bar draws nothing, and the step's own log lines carry the progress.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Bar:
    """One running bar: ``advance(n)`` after each unit of work, ``describe(text)`` to retitle it."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Bar]:
    """A bar of ``total`` units titled ``description`` while the block runs (stderr, terminals only)."""
    if not sys.stderr.isatty():
        yield Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        yield Bar(progress, progress.add_task(description, total=total))
