"""Progress bars of the command line: counts, elapsed time and ETA for every long piece of work.

Work below the command line reports through `atelier.kernel.progress`; while a command runs, `bars()`
listens and draws one bar per piece of work (training steps, class images, batch items, OCR files)
on a terminal. Log lines (Prefect's console handler) are printed above the bars, not through them.
Off a terminal nothing is drawn: the tasks' own log lines every 10% are the record there, and
`Progress` (for loops the command line runs itself) prints such a line.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterator

import typer

from atelier.kernel import progress


class _Board:
    """One rich live display for the bars of a command (rich allows one live display at a time)."""

    def __init__(self) -> None:
        self._live = None
        self._tasks: dict[str, int] = {}
        self._handlers: list[tuple[object, object]] = []

    def update(self, label: str, done: int, total: int, unit: str) -> None:
        if self._live is None:
            self._start()
        if label not in self._tasks:
            self._tasks[label] = self._live.add_task(label, total=total, unit=unit)
        task = self._tasks[label]
        self._live.update(task, completed=done, total=total)
        if done >= total:
            self._live.remove_task(task)
            del self._tasks[label]
            if not self._tasks:
                self.close()

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._live = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=True,
            console=Console(stderr=True),
        )
        self._live.start()
        for handler in _console_handlers():  # their lines go above the bars instead of through them
            self._handlers.append((handler, handler.console))
            handler.console = self._live.console

    def close(self) -> None:
        for handler, console in self._handlers:
            handler.console = console
        self._handlers.clear()
        if self._live is not None:
            self._live.stop()
        self._live = None
        self._tasks.clear()


def _console_handlers() -> list:
    from prefect.logging.handlers import PrefectConsoleHandler

    found = []
    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]:
        found.extend(h for h in getattr(logger, "handlers", []) if isinstance(h, PrefectConsoleHandler) and h not in found)
    return found


_board = _Board()


@contextlib.contextmanager
def bars() -> Iterator[None]:
    """Draw the progress reported while a command runs (a terminal only); the bars are gone after it,
    also when it fails."""
    if not sys.stderr.isatty():
        yield
        return

    def draw(label: str, done: int, total: int, unit: str) -> None:
        if total >= 1:
            _board.update(label, done, total, unit)

    try:
        with progress.listening(draw):
            yield
    finally:
        _board.close()


class Progress:
    """Progress of a loop the command line runs itself, as a callback `progress(done, total)`: a bar on
    a terminal, else a line about every 10% (logs and CI stay readable)."""

    def __init__(self, label: str, unit: str = "items", quiet_below: int = 8) -> None:
        self.label, self.unit = label, unit
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self._last_decile = -1
        self.quiet_below = quiet_below  # a handful of items needs no progress report

    def __call__(self, done: int, total: int) -> None:
        if total < max(1, self.quiet_below):
            return
        if self.tty:
            _board.update(self.label, done, total, self.unit)
            return
        decile = int(10 * done / total)
        if decile > self._last_decile or done >= total:
            self._last_decile = decile
            elapsed = time.monotonic() - self.start
            eta = elapsed / done * (total - done) if done else 0.0
            typer.echo(
                f"{self.label}: {done}/{total} {self.unit}, {elapsed:.0f} s" + (f", about {eta:.0f} s left" if done < total else ""),
                err=True,
            )

    def close(self) -> None:
        if self.tty:
            _board.close()
