"""What every CLI module shares: settings with the environment applied, and friendly errors."""

from __future__ import annotations

import functools
from typing import Callable

import typer

from atelier.errors import AtelierError
from atelier.settings import Settings, load_settings


def cli_settings() -> Settings:
    settings = load_settings()
    settings.apply_environment()
    return settings


def _outage(exc: BaseException):
    from atelier.outages import classify

    try:
        return classify(exc, load_settings())
    except AtelierError:  # settings that do not load: not an outage to report
        return None


def friendly(fn: Callable) -> Callable:
    """Turn Atelier's typed errors, and a server that did not answer, into one line on stderr and the
    README's exit code (6 for an outage, naming the service)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AtelierError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 (re-raised unless it is a service that did not answer)
            outage = _outage(exc)
            if outage is None:
                raise
            typer.secho(f"error: {outage}", fg=typer.colors.RED, err=True)
            raise typer.Exit(outage.exit_code) from None

    return wrapper


class Progress:
    """Progress of a long command on stderr: a bar with counts and ETA on a terminal, else a line about
    every 10% (logs and CI stay readable). Use as a callback: `progress(done, total)`."""

    def __init__(self, label: str, unit: str = "items", quiet_below: int = 8) -> None:
        import sys
        import time

        self.label, self.unit = label, unit
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self._bar = None
        self._task = None
        self._last_decile = -1
        self.quiet_below = quiet_below  # a handful of items needs no progress report

    def __call__(self, done: int, total: int) -> None:
        import time

        if total < max(1, self.quiet_below):
            return
        if self.tty:
            if self._bar is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                self._bar = Bar(TextColumn(f"{self.label}"), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=True,
                                console=_stderr_console())
                self._bar.start()
                self._task = self._bar.add_task(self.label, total=total)
            self._bar.update(self._task, completed=done, total=total)
            if done >= total:
                self.close()
            return
        decile = int(10 * done / total)
        if decile > self._last_decile or done >= total:
            self._last_decile = decile
            elapsed = time.monotonic() - self.start
            eta = elapsed / done * (total - done) if done else 0.0
            typer.echo(f"{self.label}: {done}/{total} {self.unit}, {elapsed:.0f} s" + (f", about {eta:.0f} s left" if done < total else ""),
                       err=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
