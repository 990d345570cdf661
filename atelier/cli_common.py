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


def friendly(fn: Callable) -> Callable:
    """Turn Atelier's typed errors into one line on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AtelierError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper
