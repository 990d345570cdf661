"""Serving commands: batch inference now, schedules (deploy + worker), and the recent runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from atelier.cli.common import cli_settings, friendly, prefect_ready
from atelier.kernel.errors import AtelierError, ConfigError


def _report(result: dict) -> None:
    """The batch's counts; each item not done is named on stderr, and then the exit code is 7."""
    from atelier.kernel.errors import PartlyDone

    typer.echo(
        f"{result['model']}: {result['written']} new, {result['done_before']} already done, "
        f"{len(result['invalid'])} invalid, {len(result['failed'])} failed -> {result['manifest']}"
    )
    not_done = result["invalid"] + result["failed"]
    for bad in not_done:
        typer.echo(f"  not done: {bad.get('error')}", err=True)
    if not_done:
        raise PartlyDone(
            f"{len(not_done)} item(s) of the batch",
            f"were not done (named above and in {result['report']})",
            "fix them and run the same command again: it does only the items not done yet",
        )


def _check_local(path: str, what: str, fix: str, regular_file: bool = False) -> None:
    """A local path a batch reads must exist before a flow run starts (an s3:// one is checked by the flow)."""
    from atelier.kernel.errors import NotFound

    if not path.startswith("s3://") and not Path(path).exists():
        raise NotFound(f"{what} {path}", "does not exist", fix)
    if regular_file and not path.startswith("s3://") and not Path(path).is_file():  # a folder, a pipe, a device
        raise NotFound(f"{what} {path}", "is not a regular file", fix)


def _check_model(settings, ref: str, customer: str | None = None) -> None:
    """The model a batch pins must be registered, and the customer's: a typo or another customer's model is
    exit 2 in a second, with one line, not a failed flow run with Prefect's traceback above it."""
    from mlflow import MlflowClient

    from atelier.registry.isolation import require_owner
    from atelier.registry.lineage import resolve

    client = MlflowClient(settings.resolved_tracking_uri)
    mv = resolve(client, ref)
    if customer is not None:
        require_owner(client, mv.name, customer)


@friendly
def batch_generate_cmd(
    customer: str = typer.Argument(...),
    subject: str = typer.Argument(...),
    manifest: str = typer.Option(..., help="JSONL manifest (id, prompt, seed, guidance, steps, size): a path or s3://bucket/key"),
    out: str = typer.Option(..., help="output folder or s3://bucket/prefix; may hold {date}"),
    model: Optional[str] = typer.Option(None, help="NAME@ALIAS or NAME/VERSION; default dreambooth-CUSTOMER-SUBJECT@champion"),
    batch_size: int = typer.Option(8, min=1),
) -> None:
    """Generate every manifest item once with one pinned model version (a rerun resumes, skipping
    items whose outputs exist and verify)."""
    from atelier.kernel.outages import preflight
    from atelier.kernel.storage import check_customer, check_slug

    settings = cli_settings()
    preflight(settings)
    check_customer(customer)
    check_slug(subject, "subject")
    _check_local(
        manifest, "manifest", 'write a JSONL manifest (one {"id", "prompt", "seed"} per line) or give its s3:// key', regular_file=True
    )
    if not manifest.startswith("s3://"):  # a manifest with nothing to run is exit 2 now, not a failed flow run
        from atelier.models.batch.manifest import read_generation_manifest

        read_generation_manifest(Path(manifest).read_bytes(), manifest)
    _check_model(settings, model or f"dreambooth-{customer}-{subject}@champion", customer)
    prefect_ready(settings)
    from atelier.flows.batch import batch_generate  # Prefect reads its settings when imported: after prefect_ready

    _report(batch_generate(customer, subject, manifest, out, model, batch_size))


@friendly
def batch_ocr_cmd(
    inputs: str = typer.Argument(..., help="folder or s3://bucket/prefix of images and video clips"),
    out: str = typer.Option(..., help="output folder or s3://bucket/prefix; may hold {date}"),
    model: str = typer.Option("ocr@champion"),
    lang: Optional[str] = typer.Option(None, help="language code; default: the router decides"),
    lines: bool = typer.Option(False, "--lines", help="the images are pre-cropped text lines"),
    every: float = typer.Option(1.0, "--every", help="clips: seconds between sampled frames"),
    max_frames: int = typer.Option(300, "--max-frames", help="clips: at most this many frames each"),
) -> None:
    """Read every image and clip once with the pinned OCR model (a clip once per sampling, its text as
    cues with times); results.jsonl and report.json in OUT."""
    from atelier.models.video.frames import Sampling

    try:
        Sampling(every, max_frames)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--every/--max-frames") from None
    from atelier.kernel.outages import preflight

    settings = cli_settings()
    preflight(settings)
    _check_local(inputs, "input folder", "name a folder of images or an s3://bucket/prefix")
    _check_model(settings, model)
    prefect_ready(settings)
    from atelier.flows.batch import batch_ocr

    _report(batch_ocr(inputs, out, model, lang, "line" if lines else "page", every, max_frames))


def _schedule_file(file: Optional[Path]) -> Path:
    return file or cli_settings().workspace / "schedules.yaml"


def _check_against_workspace(settings, schedules, path: Path) -> None:
    """What a schedule names must exist now, not fail at 3 a.m.: every subject in the workspace, every
    training config readable and valid (exit 2 naming the entry)."""
    from atelier.kernel.errors import ConfigError
    from atelier.kernel.workspace import subject_revision
    from atelier.models.dreambooth.config import load_train_config

    for entry in [*schedules.retrain, *schedules.batch_generate]:
        subject_revision(settings, entry.customer, entry.subject)
    for r in schedules.retrain:
        if r.config is not None:
            config = Path(r.config)
            if not config.is_file():
                raise ConfigError(
                    f"{path}: retrain {r.customer}/{r.subject} config {config}", "does not exist", "fix the path or remove `config`"
                )
            load_train_config(config)


@friendly
def deploy_cmd(file: Optional[Path] = typer.Option(None, "--file", help="schedule file; default WORKSPACE/schedules.yaml")) -> None:
    """Create or update the Prefect deployments (cron schedules) of the schedule file; with a work pool
    in the settings (`atelier up` sets one) they go to that pool, whose workers run them."""
    settings = cli_settings()
    from atelier.flows.schedules import deployments, load_schedules

    path = _schedule_file(file)
    schedules = load_schedules(path)
    _check_against_workspace(settings, schedules, path)  # before anything is written to Prefect
    prefect_ready(settings)
    for d in deployments(schedules):
        pool = d.work_pool_name or settings.work_pool
        d.apply(work_pool_name=pool)
        cron = d.schedules[0].schedule.cron if d.schedules else "-"
        limit = f", at most {d.concurrency_limit} at a time" if d.concurrency_limit else ""
        typer.echo(f"deployment {d.flow_name}/{d.name}: cron '{cron}' UTC{limit}{f', work pool {pool!r}' if pool else ''}")
    if settings.work_pool:
        typer.echo(f"work pool {settings.work_pool!r}: its workers run them (`atelier worker`, or the one `atelier up` started)")
    else:
        typer.echo(f"serve them with `atelier worker` (same schedule file: {path})")


@friendly
def worker_cmd(
    file: Optional[Path] = typer.Option(None, "--file", help="schedule file; default WORKSPACE/schedules.yaml"),
    limit: int = typer.Option(4, help="flow runs at once in this worker"),
) -> None:
    """Run scheduled flows, each due run in its own process. With a work pool in the settings: a Prefect
    process worker polling that pool (deployments come from `atelier deploy`); without: serve the
    schedule file's deployments from this process. Stop with Ctrl-C."""
    import os
    import sys

    settings = cli_settings()
    if settings.work_pool:
        prefect_ready(settings)
        from atelier.flows.stack_setup import work_pool_type

        kind = work_pool_type(settings.work_pool)
        if kind is None:
            raise ConfigError(
                f"work pool {settings.work_pool!r}",
                "does not exist on the Prefect server",
                "run `atelier stack-init` (compose's setup does)",
            )
        if kind == "docker":  # each flow run in a container (docker/compose.yaml): prefect-docker's worker, ours
            import socket

            import anyio

            from atelier.flows.docker_worker import run_docker_worker

            typer.echo(f"worker for the Docker pool {settings.work_pool!r}: each flow run in its own container, {limit} at a time")
            anyio.run(run_docker_worker, settings.work_pool, limit, f"atelier-docker-{socket.gethostname()}")
            return
        prefect = str(Path(sys.executable).parent / "prefect")
        os.execv(prefect, [prefect, "worker", "start", "--pool", settings.work_pool, "--type", kind, "--limit", str(limit)])
    prefect_ready(settings)
    from prefect import serve

    from atelier.flows.schedules import deployments, load_schedules

    deps = deployments(load_schedules(_schedule_file(file)))
    if not deps:
        raise AtelierError(
            str(_schedule_file(file)), "schedules nothing", "add batch_generate, batch_ocr, retrain or ocr_recalibrate entries"
        )
    serve(*deps, limit=limit, pause_on_shutdown=False)  # stopping one worker must not pause the team's schedules


@friendly
def run_cmd(
    deployment: str = typer.Argument(..., help="a deployment's name as `atelier deploy` printed it (FLOW/NAME, or NAME alone)"),
) -> None:
    """Start a deployment's flow now, outside its schedule; the worker serving it (`atelier worker`, or the
    stack's) picks it up at once."""
    from atelier.kernel.errors import NotFound

    settings = cli_settings()
    prefect_ready(settings)
    from prefect import get_client
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        known = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
    matches = [full for full in known if deployment in (full, full.split("/", 1)[1])]
    if len(matches) != 1:
        raise NotFound(
            f"deployment {deployment!r}",
            "is not one of this workspace's deployments" if not matches else "names several",
            f"use one of: {', '.join(sorted(known)) or '(none: run `atelier deploy` first)'}",
        )
    run = run_deployment(matches[0], timeout=0)
    typer.echo(f"flow run {run.name} ({run.id}) of {matches[0]} starts now; `atelier runs` shows it")


@friendly
def runs_cmd(
    limit: int = typer.Option(20, min=1, max=200),
    flow: Optional[str] = typer.Option(None, help="only this flow name"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Recent flow runs: state, the model version each used or made, and its outputs."""
    prefect_ready(cli_settings())
    from atelier.flows.runs import recent_runs

    rows = recent_runs(limit, flow)
    if as_json:
        typer.echo(json.dumps(rows, indent=1, default=str))
        return
    if not rows:
        typer.echo("no flow runs yet")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for header in ("started (UTC)", "flow run", "name", "state", "flow", "deployment", "model"):
        table.add_column(header, no_wrap=True)  # ids and names stay whole (copy-paste, grep); the note wraps
    table.add_column("note / outputs", overflow="fold")
    for r in rows:
        started = str(r["start"])[:16].replace("T", " ") if r["start"] else "not started"
        outputs = r["outputs"] if r["outputs"] and r["outputs"] != "{}" else ""
        table.add_row(
            started,
            str(r["id"])[:8],
            r["name"],
            r["state"],
            r["flow"],
            r["deployment"] or "-",
            r["model"] or "-",
            " ".join(x for x in (r["note"] or "", f"-> {outputs}" if outputs else "") if x),
        )
    Console(width=max(200, Console().width), soft_wrap=False).print(table)
    typer.echo("full ids and outputs: atelier runs --json")


@friendly
def logs_cmd(
    run: str = typer.Argument(..., metavar="RUN", help="a flow run's id, its first 8 characters (`atelier runs`) or its name"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """A flow run's log, oldest line first, and how it ended (a crashed or failed run's reason last)."""
    import logging

    prefect_ready(cli_settings())
    from atelier.flows.runs import run_logs

    found = run_logs(run)
    if as_json:
        typer.echo(json.dumps(found, indent=1))
        return
    typer.echo(f"{found['name']} ({found['flow']}, flow run {found['id']})")
    for line in found["lines"]:
        typer.echo(f"{line['time'][11:19]} {logging.getLevelName(line['level']):<8} {line['message']}")
    typer.echo(f"state: {found['state']}" + (f": {found['message']}" if found["message"] else ""))


@friendly
def serve_cmd(
    model: str = typer.Argument(..., metavar="MODEL", help="a subject model: NAME@ALIAS or NAME/VERSION"),
    port: int = typer.Option(5001, "--port", min=1, max=65535, help="port of the HTTP endpoint"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (127.0.0.1: this machine only)"),
    customer: Optional[str] = typer.Option(None, "--customer", metavar="CUSTOMER", help="refuse a model of another customer"),
) -> None:
    """Serve a registered subject model over HTTP with MLflow's scoring server (POST /invocations, GET /ping),
    from a local copy whose every file the ledger vouches for; NAME@ALIAS is pinned to one version at the
    start. Ctrl-C stops it."""
    import socket
    import subprocess

    from atelier.cli.stack_config import bin_path, inherited_environment
    from atelier.kernel.errors import ConfigError, NotFound
    from atelier.registry.client import client_for
    from atelier.registry.lineage import resolve
    from atelier.registry.serving import checked_copy, pin

    settings = cli_settings()
    pinned = pin(settings, model, customer)
    if resolve(client_for(settings), pinned.model).tags.get("atelier.kind") == "ocr":
        # its pyfunc reads files named in the request: over HTTP a caller would read this machine's images
        raise NotFound(
            f"model {pinned.model}", "is an OCR model, which is not served over HTTP", "read documents with atelier ocr or batch-ocr"
        )
    with socket.socket() as sock:
        if sock.connect_ex((host, port)) == 0:
            raise ConfigError(f"port {port} on {host}", "is taken by another program", "choose another with --port")
    with checked_copy(settings, pinned.name, pinned.version) as local:
        url = f"http://{host}:{port}"
        typer.echo(
            f"serving {pinned.model} (every file checked against the ledger) at {url}/invocations; Ctrl-C stops it\n"
            f"""  try: curl -s {url}/invocations -H 'Content-Type: application/json' -d '{{"dataframe_records": [{{"prompt": "a sks dog", "seed": 1}}]}}'""",
            err=True,
        )
        argv = [bin_path("mlflow"), "models", "serve", "-m", str(local), "--env-manager", "local", "-h", host, "-p", str(port)]
        # the scoring server needs no credential: the model is a local folder
        proc = subprocess.Popen(argv, env={**inherited_environment(), "MLFLOW_MODELS_WORKERS": "1"})
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(30)
            raise
    if code != 0:
        raise ConfigError(f"MLflow's scoring server for {pinned.model}", f"exited with code {code}", "read its output above")


def install(app: typer.Typer) -> None:
    app.command("batch-generate")(batch_generate_cmd)
    app.command("run")(run_cmd)
    app.command("batch-ocr")(batch_ocr_cmd)
    app.command("deploy")(deploy_cmd)
    app.command("worker")(worker_cmd)
    app.command("runs")(runs_cmd)
    app.command("serve")(serve_cmd)
    app.command("logs")(logs_cmd)
