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
