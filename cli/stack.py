"""Stack commands: `atelier up`, `down`, `status` (the production topology on this machine) and
`stack-init` (configure a running stack: buckets, Prefect result storage, work pool)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional
from urllib.parse import urlparse

import typer

from atelier.cli.common import cli_settings, friendly
from atelier.kernel.errors import ConfigError


@friendly
def up_cmd() -> None:
    """Start PostgreSQL databases, S3 (SeaweedFS, on disk), Prefect server, MLflow server and a worker on
    this machine, each requiring credentials; only what is not running yet. Writes the platform's client
    settings and credentials to .atelier/stack/stack.env (0600)."""
    from atelier.cli import stack_processes as stack

    settings = cli_settings()
    stack.up(settings, stack.SERVERS, typer.echo)
    # configured from a process that has the stack's settings, so Prefect talks to the stack's server
    env = {**os.environ, **stack.client_environment(settings)}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-m", "atelier.cli", "stack-init"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError("stack-init", (done.stderr or done.stdout).strip()[-800:], "read the message; `atelier status` shows the logs")
    typer.echo(done.stdout.rstrip())
    stack.up(settings, ("worker",), typer.echo)
    path = stack.write_env_file(settings)
    _print_status(stack.status(settings))
    typer.echo(
        f"\nclients' settings: {path}\n  use them with:  set -a; . {path}; set +a\n"
        "  then `atelier init` moves the workspace's DVC remote to S3 (copying its data), and every command uses the stack"
    )


@friendly
def down_cmd(
    drop_databases: bool = typer.Option(
        False, "--drop-databases", help="also drop the stack's databases: every flow run, model version and ledger row in them"
    ),
) -> None:
    """Stop what `atelier up` and `atelier ui` started (by process id), and the workspace's background
    Prefect server. The databases and S3's data (in the servers' state folder: `atelier status` names it) stay;
    --drop-databases drops the databases."""
    from atelier.cli import local_servers
    from atelier.cli import stack_processes as stack

    settings = cli_settings()
    stopped = stack.down(settings) + [f"the workspace's {name} server" for name in local_servers.down(settings)]
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    if drop_databases:
        dropped = stack.drop_databases(settings)
        typer.echo(f"dropped {', '.join(dropped)}" if dropped else "no databases to drop")
        if settings.ledger_url is None or any(name.endswith("_ledger") for name in dropped):
            from atelier.registry.ledger_keys import HeadWitness

            HeadWitness(settings.resolved_ledger_keys, settings.resolved_ledger_url).path.unlink(missing_ok=True)  # its ledger is gone


def _print_status(states) -> None:
    for s in states:
        state = "running" if s.running else "stopped"
        typer.echo(f"  {s.name:<8} {state:<8} {('pid ' + str(s.pid)) if s.running else '':<11} {s.url:<28} {s.log}")


@friendly
def status_cmd() -> None:
    """What `atelier up` started and whether it still runs, with its log file."""
    from atelier.cli import stack_processes as stack

    settings = cli_settings()
    states = stack.status(settings)
    _print_status(states)
    typer.echo(f"  servers' state in {stack.server_home(settings)}")
    typer.echo(f"  s3 runs as {stack.s3_account(settings).describe()}; prefect and mlflow as {stack.python_account(settings).describe()}")
    if not all(s.running for s in states):
        raise typer.Exit(1)


@friendly
def stack_init_cmd(
    docker_image: Optional[str] = typer.Option(
        None, "--docker-image", help="make the work pool a Docker pool whose flow runs each run in a container of this image"
    ),
    docker_network: str = typer.Option("atelier_default", "--docker-network", help="the Docker pool's network (compose's)"),
    docker_volume: str = typer.Option("atelier_workspace", "--docker-volume", help="the workspace volume, mounted at /workspace"),
    gpus: bool = typer.Option(False, "--gpus", help="the Docker pool's containers get every GPU of their host (a GPU pool)"),
) -> None:
    """Configure a running stack (idempotent): S3 buckets, Prefect's default result storage on S3,
    the work pool (process; Docker with --docker-image, as docker/compose.yaml's setup does). Uses
    ATELIER_PREFECT_API_URL, ATELIER_S3_ENDPOINT_URL and the S3 URLs."""
    from atelier.flows.stack_setup import configure_result_storage, ensure_work_pool
    from atelier.kernel.objectstore import open_store

    settings = cli_settings()
    if not settings.prefect_api_url:
        raise ConfigError(
            "ATELIER_PREFECT_API_URL",
            "is not set: there is no Prefect server to configure",
            "set it (or source the stack.env that `atelier up` writes)",
        )
    urls = [u for u in (settings.artifact_root, settings.dvc_remote, settings.prefect_results) if u and u.startswith("s3://")]
    for bucket in sorted({urlparse(u).netloc for u in urls}):
        created = open_store(f"s3://{bucket}", settings.s3_endpoint_url).ensure_bucket()
        typer.echo(f"bucket s3://{bucket} {'created' if created else 'exists'}")
    if settings.prefect_results:
        slug = configure_result_storage(settings.prefect_results, settings.s3_endpoint_url)
        typer.echo(f"Prefect results: {settings.prefect_results} (block {slug}, the server's default)")
    if settings.work_pool:
        docker = {"image": docker_image, "network": docker_network, "volume": docker_volume, "gpus": gpus} if docker_image else None
        created = ensure_work_pool(settings.work_pool, docker)
        kind = (
            f"docker: {docker_image} on {docker_network}, {docker_volume} at /workspace{', GPUs' if gpus else ''}" if docker else "process"
        )
        typer.echo(f"work pool {settings.work_pool!r} {'created' if created else 'exists'} (type {kind})")


def ui_urls(settings) -> list[str]:
    """Start what the UIs need and say where they are: on the embedded default the workspace's
    background Prefect server and an MLflow UI over the workspace's store; on the stack, its servers."""
    from atelier.cli import local_servers
    from atelier.cli.stack_config import MLFLOW_ADMIN
    from atelier.registry.tracking import ML_VIEW

    if settings.prefect_api_url:  # the stack (or another configured deployment): its own servers
        return [
            f"Prefect UI:  {settings.prefect_api_url.removesuffix('/api')}   (log in with the auth string of stack.env)",
            f"MLflow UI:   {settings.resolved_tracking_uri}/#/experiments{ML_VIEW}   (your MLflow user)",
        ]
    secrets = local_servers.local_dir(settings) / "secrets.json"
    prefect = local_servers.ensure(settings, "prefect", lambda m: typer.echo(m, err=True))
    mlflow = local_servers.ensure(settings, "mlflow", lambda m: typer.echo(m, err=True))
    return [
        f"Prefect UI:  {prefect['url']}   (it asks for the auth string: prefect_auth_string in {secrets})",
        f"MLflow UI:   {mlflow['url']}/#/experiments{ML_VIEW}   (user {MLFLOW_ADMIN}, password: mlflow_admin_password in {secrets})",
        "both run in the background until `atelier down`",
    ]


@friendly
def ui_cmd() -> None:
    """Start the Prefect and MLflow UIs of this workspace in the background (once) and print their URLs."""
    from atelier.kernel.workspace import require_workspace

    settings = cli_settings()
    require_workspace(settings)
    for line in ui_urls(settings):
        typer.echo(line)


def install(app: typer.Typer) -> None:
    app.command("ui")(ui_cmd)
    app.command("up")(up_cmd)
    app.command("down")(down_cmd)
    app.command("status")(status_cmd)
    app.command("stack-init")(stack_init_cmd)
    from atelier.cli.s3_server import s3_server_cmd

    app.command("s3-server")(s3_server_cmd)
