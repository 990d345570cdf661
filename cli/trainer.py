"""`atelier trainer serve|status`: the resident GPU trainer (models/dreambooth/service.py).

On a GPU host, `atelier trainer serve` keeps the base model loaded and trains the subjects the flows
send it, one after another; a worker with `ATELIER_TRAINER_SOCKET` set to the same socket sends its
training there instead of loading the model in the flow run's own process.
"""

from __future__ import annotations

from pathlib import Path

import typer

from atelier.cli.common import cli_settings, friendly
from atelier.kernel.errors import ConfigError

trainer_app = typer.Typer(help="the resident GPU trainer: one process that trains subject after subject", no_args_is_help=True)


def _socket(sock: Path | None) -> Path:
    settings = cli_settings()
    chosen = sock or settings.trainer_socket
    if chosen is None:
        raise ConfigError("ATELIER_TRAINER_SOCKET", "is not set", "set it (e.g. to $ATELIER_WORKSPACE/trainer.sock) or pass --socket")
    return Path(chosen).absolute()


@trainer_app.command("serve")
@friendly
def serve_cmd(
    sock: Path | None = typer.Option(None, "--socket", help="Unix socket to listen on (default: ATELIER_TRAINER_SOCKET)"),
    compile: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        help="torch.compile the UNet inside the captured step (default: on with a GPU). The first job of a "
        "session pays the compile (minutes; cached on disk for the next start), later jobs train faster",
    ),
) -> None:
    """Serve training jobs until interrupted (Ctrl-C or SIGTERM)."""
    import signal

    import torch

    from atelier.kernel.workspace import require_workspace
    from atelier.models.dreambooth.service import ResidentTrainer
    from atelier.models.dreambooth.train_setup import keep_compiles

    settings = cli_settings()
    require_workspace(settings)
    path = _socket(sock)
    if compile and not torch.cuda.is_available():
        typer.echo("note: --compile applies on a GPU only; this host has none, so training stays eager")
    compile = torch.cuda.is_available() and compile is not False  # (the default: on with a GPU)
    keep_compiles(settings.compile_cache)  # compiled or not, the captured step's Triton kernel is kept there

    def stop(*_args) -> None:  # SIGTERM (docker stop, systemd) ends it as Ctrl-C does: socket and token removed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    trainer = ResidentTrainer(
        path, settings.runs_dir, settings.priors_cache / "latents", log=lambda line: typer.echo(line), compile=compile
    )
    try:
        trainer.serve()
    except KeyboardInterrupt:
        typer.echo(f"resident trainer stopped after {trainer.jobs} job(s)")


@trainer_app.command("status")
@friendly
def status_cmd(sock: Path | None = typer.Option(None, "--socket", help="Unix socket (default: ATELIER_TRAINER_SOCKET)")) -> None:
    """Whether the resident trainer answers, its pid, the jobs it ran and whether a base model is loaded."""
    from atelier.models.dreambooth.service import ping

    path = _socket(sock)
    state = ping(path)
    loaded = "base model loaded" if state.get("session") else "no base model loaded yet"
    typer.echo(f"resident trainer at {path}: pid {state.get('pid')}, {state.get('jobs', 0)} job(s) run, {loaded}")


def install(app: typer.Typer) -> None:
    app.add_typer(trainer_app, name="trainer")
