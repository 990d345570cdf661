"""What every CLI module shares: settings with the environment applied, and friendly errors."""

from __future__ import annotations

import functools
from typing import Callable

import typer

from atelier.kernel.errors import AtelierError
from atelier.kernel.settings import Settings, load_settings


def cli_settings() -> Settings:
    from atelier.kernel.stores import check_local_stores

    settings = load_settings()
    check_local_stores(settings)  # an empty or foreign database is exit 6 naming it, never silently recreated
    settings.apply_environment()
    return settings


def prefect_ready(settings: Settings) -> None:
    """Before a command runs a flow or reads Prefect (after its own checks, so a typo never waits for
    a server): on the embedded default, point Prefect's client at the workspace's background server,
    starting it the first time."""
    from atelier.cli.local_servers import use_background_prefect

    use_background_prefect(settings, lambda message: typer.echo(message, err=True))


def _outage(exc: BaseException):
    from atelier.kernel.outages import classify

    try:
        return classify(exc, load_settings())
    except AtelierError:  # settings that do not load: not an outage to report
        return None


def _path_error(exc: OSError) -> str | None:
    """A path the user named that cannot be used: the message names it and says what to do."""
    name = exc.filename or "a path"
    fixes = {
        FileNotFoundError: "does not exist: check the path",
        IsADirectoryError: "is a folder where a file was expected: name a file in it",
        NotADirectoryError: "is a file where a folder was expected: name its folder",
        PermissionError: "cannot be read or written by this user: fix its permissions or choose another path",
    }
    for kind, text in fixes.items():
        if isinstance(exc, kind):
            return f"{name}: {text}"
    return None


def _quiet_known_tracebacks() -> None:
    """Log records about an error Atelier names itself (its own errors, a server that did not answer) keep
    their one-line message and lose the traceback: Prefect's engine and library threads log the same error
    with a stack of frames above the command's own one-line error. ATELIER_DEBUG=1 keeps them."""
    import logging
    import os

    if os.environ.get("ATELIER_DEBUG") or getattr(logging.getLogRecordFactory(), "_atelier", False):
        return
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = make(*args, **kwargs)
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and (isinstance(error, AtelierError) or _outage(error) is not None):
            record.exc_info, record.exc_text = None, None  # the message itself names the error (Prefect's include its repr)
        return record

    factory._atelier = True
    logging.setLogRecordFactory(factory)


def friendly(fn: Callable) -> Callable:
    """One error path for every command: Atelier's typed errors, a path that cannot be used, and a
    server that did not answer become one line on stderr and the README's exit code (2 bad input,
    6 an outage naming the service). Anything else is a bug: one line saying so, exit 1, and the
    traceback only with ATELIER_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import os

        from atelier.cli.progress import bars
        from atelier.kernel import interrupts
        from atelier.kernel.storage import printable

        _quiet_known_tracebacks()
        interrupts.install()
        try:
            with bars():
                return fn(*args, **kwargs)
        except AtelierError as exc:
            typer.secho(f"error: {printable(str(exc))}", fg=typer.colors.RED, err=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort):
            raise
        except typer.BadParameter as exc:  # an option checked in the command's body (not by Click's parser): bad input, exit 2
            typer.secho(f"error: {printable(exc.format_message())}. Fix: see --help for the values it takes", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            # Ctrl-C: the shell's convention (128 + SIGINT), no traceback; what was stored is kept as a kill would leave it
            typer.secho("interrupted: stopped; a rerun picks up where this left off", fg=typer.colors.RED, err=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 (classified; re-raised under ATELIER_DEBUG)
            outage = _outage(exc)
            if outage is not None:
                typer.secho(f"error: {outage}", fg=typer.colors.RED, err=True)
                raise typer.Exit(outage.exit_code) from None
            path = _path_error(exc) if isinstance(exc, OSError) and not isinstance(exc, ConnectionError) else None
            if path is not None:
                typer.secho(f"error: {printable(path)}", fg=typer.colors.RED, err=True)
                raise typer.Exit(2) from None
            if os.environ.get("ATELIER_DEBUG"):
                raise
            typer.secho(
                f"error: unexpected {type(exc).__name__}: {str(exc)[:300]}. This is a bug in Atelier: rerun with "
                "ATELIER_DEBUG=1 for the traceback and report it",
                fg=typer.colors.RED,
                err=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def expand_photos(paths: list) -> list:
    """Photos given as files or folders: a folder stands for the files directly inside it (sorted;
    hidden ones are left for the photo rules to name)."""
    from pathlib import Path

    from atelier.kernel.errors import InvalidIdentifier, NotFound
    from atelier.kernel.storage import printable

    out = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file())
            if not inside:
                raise NotFound(f"folder {path}", "holds no files", "put the subject's photos in it, or name the photo files")
            out.extend(inside)
        elif path.exists() and not path.is_file():  # a pipe or a device would be read forever
            raise InvalidIdentifier(
                f"photo {path}", "is not a regular file (a pipe, a device or a socket)", "give image files, or a folder of them"
            )
        else:
            out.append(path)
    for path in out:  # the photos keep their names in the workspace, its git history and DVC's records
        if printable(path.name) != path.name:
            raise InvalidIdentifier(
                f"photo {printable(str(path))}", "has a file name that is not UTF-8 text", "rename the file (e.g. to photo-01.jpg)"
            )
    return out


def quiet_third_parties() -> None:
    """What a user reads is Atelier's output: the libraries' own progress bars, INFO lines and
    warnings (tokenizers, MLflow's database set-up, CloudPickle notes) stay out of it."""
    import logging
    import os
    import warnings

    # the hubs' progress bars and verbosity: Settings.apply_library_environment (every command calls it)
    for name, value in {"TOKENIZERS_PARALLELISM": "false", "MLFLOW_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(name, value)
    for name in ("mlflow", "alembic", "urllib3", "httpx", "great_expectations"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"(mlflow|transformers|diffusers|great_expectations|accelerate)(\..*)?")
    warnings.filterwarnings("ignore", category=FutureWarning)
