"""`atelier up` / `atelier down`: the production topology on one machine, for development without Docker.

    PostgreSQL (already running)   databases <prefix>_prefect, _mlflow, _mlflow_auth, _ledger, created if missing
    SeaweedFS (`weed server -s3`)  S3 with data on disk (<servers' state>/s3/), one bucket: mlflow/ (artifacts),
                                   dvc/ (DVC remote), prefect-results/; signed requests only
    Prefect server                 on <prefix>_prefect, API behind basic auth (PREFECT_SERVER_API_AUTH_STRING)
    MLflow tracking server         on <prefix>_mlflow, app `atelier-auth` (basic auth; only the platform writes),
                                   artifacts straight to S3 (clients upload with boto3)
    Prefect worker                 polls the work pool (whose job template takes no overrides); each flow run
                                   in its own process, with only the environment flows need

Every server requires credentials. They are generated on the first `up` and kept in
`.atelier/stack/secrets.json` (0600): the platform's S3 keys, MLflow's admin password and Flask key,
Prefect's auth string. Server configurations that hold them are 0600 files too; none is in a
process's arguments. Customers get MLflow users (READ on their own models) and S3 keys that read only
their own artifact prefix (`atelier customer add`).

Run as root, `up` starts the servers as a system user of their own (`atelier`, created if missing), with
their state under /var/lib/atelier/stacks/ (cli/stack_user.py); run by anyone else, as that user, with their
state under `.atelier/stack/`. The worker is always the operator's (its flow runs write the workspace).

Each process runs in its own session, its pid and start time recorded under `.atelier/stack/`;
`down` stops exactly those (a recycled pid is never signalled). `up` is safe to run again: it starts
only what is not running, so it also brings back a server that died, with its data. The clients'
settings are written to `.atelier/stack/stack.env` (0600); `docker/compose.yaml` runs the same
topology in containers (SeaweedFS through `atelier s3-server`, cli/s3_server.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from atelier.cli.stack_config import (
    MLFLOW_ADMIN,
    MLFLOW_WORKER,
    bin_path,
    client_environment,
    customer_identities,
    database_names,
    database_url,
    inherited_environment,
    mlflow_env,
    prepare_mlflow,
    prepare_s3,
    python_account,
    read_s3_readers,
    reader_identity,
    s3_account,
    s3_dir,
    s3_identities_file,
    s3_ready,
    seaweed_argv,
    seaweed_ports,
    secrets_file,
    server_home,
    stack_dir,
    stack_secrets,
    write_s3_config,
)
from atelier.cli.stack_databases import drop_databases, ensure_databases
from atelier.cli.stack_user import ServiceAccount, prepare_home, service_account
from atelier.kernel.errors import ConfigError, ServiceUnavailable
from atelier.kernel.settings import Settings
from atelier.kernel.storage import write_secret_file, write_text_atomic

# the configuration lives in stack_config; callers reach these through this module
__all__ = [
    "MLFLOW_ADMIN",
    "client_environment",
    "database_names",
    "database_url",
    "reader_identity",
    "secrets_file",
    "stack_dir",
    "stack_secrets",
    "server_home",
    "s3_account",
    "python_account",
    "add_s3_reader",
    "grant_s3_reader",
    "up",
    "down",
    "status",
    "stop",
    "services",
    "ensure_databases",
    "drop_databases",
    "write_env_file",
    "read_env_file",
    "env_file",
    "Service",
    "ServiceState",
    "SERVERS",
    "ORDER",
]

SERVERS = ("s3", "prefect", "mlflow")
S3_RELOAD_SECONDS = 2.5
ORDER = (*SERVERS, "worker")


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    url: str  # what it serves, for people
    health: str | Callable[[], bool] | None  # a URL answering 200 (401 counts: it asks for credentials), a check,
    port: int | None  # or None: staying alive is enough (the worker)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    internal_ports: tuple[int, ...] = ()  # its own, not served to clients (SeaweedFS's master, volume, filer)
    before: Callable[[], None] | None = None  # run once before each start (a bootstrap step)
    account: ServiceAccount | None = None  # who it runs as (cli/stack_user.py); None: whoever starts it


@dataclass(frozen=True)
class ServiceState:
    name: str
    url: str
    pid: int | None
    running: bool
    log: str = ""


def add_s3_reader(settings: Settings, identity: dict) -> bool:
    """Add or replace a customer's S3 reader and make the running S3 server reload its identities
    (SIGHUP). With `stack.s3_readers_file` (docker/compose.yaml), write it there: the S3 server's container
    watches that file and reloads. False when this machine runs no stack S3 (keys then have to be made on the
    S3 server)."""
    readers = settings.stack.s3_readers_file
    if readers is not None:
        kept = [i for i in read_s3_readers(readers) if i["name"] != identity["name"]]
        write_secret_file(readers, json.dumps({"identities": [*kept, identity]}, indent=1))
        time.sleep(S3_RELOAD_SECONDS)  # the server's watcher looks every second and reloads within a few hundred ms
        return True
    if not s3_identities_file(settings).is_file():
        return False
    write_s3_config(settings, [*(i for i in customer_identities(settings) if i["name"] != identity["name"]), identity])
    record = read_record(settings, "s3")
    if record is not None and is_alive(record):
        os.killpg(record["pid"], signal.SIGHUP)
        time.sleep(1.0)  # the gateway reloads within a few hundred ms
    return True


def grant_s3_reader(settings: Settings, name: str, prefix: str, access_key: str, secret_key: str) -> bool:
    """`registry.isolation.add_customer`'s S3 grant on this machine's stack: keys that list and read
    `bucket/prefix/*` only."""
    return add_s3_reader(settings, reader_identity(settings, name, prefix, access_key, secret_key))


def env_file(settings: Settings) -> Path:
    return stack_dir(settings) / "stack.env"


def services(settings: Settings) -> list[Service]:
    s = settings.stack
    client = client_environment(settings)
    home = stack_dir(settings)
    account, s3_user = python_account(settings), s3_account(settings)
    prefect_env = {
        "PREFECT_HOME": str(account.home / "prefect-server"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url(settings, "prefect", "postgresql+asyncpg"),
        "PREFECT_SERVER_API_AUTH_STRING": client["ATELIER_PREFECT_API_AUTH_STRING"],
        # the UI's settings name the API it sends the auth string to: this server's, not Prefect's default 4200
        "PREFECT_SERVER_UI_API_URL": client["ATELIER_PREFECT_API_URL"],
    }
    # what flows need, and no more: the platform's clients' settings, Prefect's client settings
    # its own MLflow identity, not the operator's admin: it can run every flow but not touch users
    worker_env = {
        **client,
        "ATELIER_TRACKING_USERNAME": MLFLOW_WORKER,
        "ATELIER_TRACKING_PASSWORD": stack_secrets(settings)["mlflow_worker_password"],
        "PREFECT_API_URL": client["ATELIER_PREFECT_API_URL"],
        "PREFECT_API_AUTH_STRING": client["ATELIER_PREFECT_API_AUTH_STRING"],
        "PREFECT_HOME": str(home / "prefect-worker"),
        "PREFECT_WORKER_QUERY_SECONDS": "3",
        # the flow-run processes it starts read these when Prefect is imported, before any Atelier code runs:
        # without them their task results would be written with Prefect's default serializer, a pickle
        **{k: v for k, v in settings.prefect_environment().items() if k.startswith("PREFECT_RESULTS_")},
    }
    return [
        Service(
            "s3",
            seaweed_argv(settings),
            client["ATELIER_S3_ENDPOINT_URL"],
            s3_ready(settings),
            s.s3_port,
            cwd=s3_dir(settings),
            internal_ports=tuple(seaweed_ports(settings).values()),
            before=lambda: prepare_s3(settings),
            account=s3_user,
        ),
        Service(
            "prefect",
            [bin_path("prefect"), "server", "start", "--host", s.host, "--port", str(s.prefect_port)],
            f"http://{s.host}:{s.prefect_port}",
            f"{client['ATELIER_PREFECT_API_URL']}/health",
            s.prefect_port,
            prefect_env,
            cwd=account.home,
            account=account,
        ),
        Service(
            "mlflow",
            [
                bin_path("mlflow"),
                "server",
                "--app-name",
                "atelier-auth",
                "--default-artifact-root",
                client["ATELIER_ARTIFACT_ROOT"],
                "--no-serve-artifacts",
                "--host",
                s.host,
                "--port",
                str(s.mlflow_port),
                "--workers",
                "2",
            ],
            client["ATELIER_TRACKING_URI"],
            f"{client['ATELIER_TRACKING_URI']}/health",
            s.mlflow_port,
            mlflow_env(settings),
            cwd=account.home,
            before=lambda: prepare_mlflow(settings),
            account=account,
        ),
        Service(
            "worker",
            [
                bin_path("prefect"),
                "worker",
                "start",
                "--pool",
                s.work_pool,
                "--type",
                "process",
                "--limit",
                str(s.worker_limit),
                "--name",
                f"atelier-{socket.gethostname()}",
            ],
            f"work pool {s.work_pool!r}",
            None,
            None,
            worker_env,
        ),
    ]


# Processes ---------------------------------------------------------------------------------------


def _record_path(settings: Settings, name: str, home: Path | None = None) -> Path:
    return (home or stack_dir(settings)) / f"{name}.json"


def _started_at(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def is_alive(record: dict) -> bool:
    """The recorded process, not a later one with its pid, and not a zombie nobody reaped."""
    import psutil

    try:
        proc = psutil.Process(record["pid"])
        return abs(proc.create_time() - record["create_time"]) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_record(settings: Settings, name: str, home: Path | None = None) -> dict | None:
    path = _record_path(settings, name, home)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def is_healthy(check: str | Callable[[], bool]) -> bool:
    if callable(check):
        return check()
    try:
        with urllib.request.urlopen(check, timeout=2) as resp:  # noqa: S310 (our own localhost URL)
            return resp.status == 200
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, and asking for credentials
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def start_service(settings: Settings, svc: Service, home: Path | None = None) -> dict:
    """Start `svc` in its own session, record its pid and start time under `home` (the stack's
    folder by default), and wait until it answers its health check."""
    home = home or stack_dir(settings)
    log = home / f"{svc.name}.log"
    log.touch(mode=0o600, exist_ok=True)
    os.chmod(home, 0o700)
    if svc.port is not None and _port_open(settings.stack.host, svc.port):
        raise ConfigError(
            f"port {svc.port} ({svc.name})",
            "is taken by a program `atelier up` did not start",
            f"stop that program, or choose another port with ATELIER_STACK__{svc.name.upper()}_PORT",
        )
    taken = [port for port in svc.internal_ports if _port_open(settings.stack.host, port)]
    if taken:
        raise ConfigError(
            f"port(s) {', '.join(map(str, taken))} ({svc.name}'s internal servers)",
            "are taken by another program",
            "stop it, or move them with ATELIER_STACK__S3_INTERNAL_PORT (the first of 7 ports in a row)",
        )
    if svc.before is not None:
        svc.before()
    account = svc.account.environment() if svc.account else {}
    env = {**inherited_environment(), **account, **svc.env}  # never the caller's whole environment: its secrets are not the server's
    with open(log, "ab") as out:
        # umask 077: every file a server writes (SeaweedFS's volumes, Prefect's and MLflow's state, logs) is its own user's alone
        proc = subprocess.Popen(
            svc.argv,
            env=env,
            cwd=svc.cwd or home,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=0o077,
            **(svc.account.popen_args() if svc.account else {}),
        )
    record = {
        "pid": proc.pid,
        "create_time": _started_at(proc.pid) or time.time(),
        "argv": svc.argv,
        "log": str(log),
        "url": svc.url,
        "health": svc.health if isinstance(svc.health, str) else None,
    }
    write_text_atomic(_record_path(settings, svc.name, home), json.dumps(record, indent=1))
    deadline = time.monotonic() + (settings.stack.start_timeout if svc.health else 3.0)
    while True:
        if proc.poll() is not None:
            _record_path(settings, svc.name, home).unlink(missing_ok=True)
            raise ServiceUnavailable(
                f"{svc.name} ({' '.join(svc.argv[:3])})", f"exited with code {proc.returncode}:\n{_log_tail(log)}", f"read {log}"
            )
        if svc.health is not None and is_healthy(svc.health):
            return record
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if svc.health is None:  # the worker: still alive after a few seconds is up
        return record
    os.killpg(proc.pid, signal.SIGKILL)  # half-started: not left behind holding its ports
    proc.wait()
    _record_path(settings, svc.name, home).unlink(missing_ok=True)
    raise ServiceUnavailable(
        f"{svc.name} at {svc.url}",
        f"did not answer within {settings.stack.start_timeout:.0f} s:\n{_log_tail(log)}",
        f"read {log}; raise ATELIER_STACK__START_TIMEOUT on a slow machine",
    )


def up(settings: Settings, only: tuple[str, ...] = ORDER, on_progress: Callable[[str], None] = lambda _m: None) -> list[ServiceState]:
    """Start the named services that are not running (in dependency order); returns their states."""
    stack_dir(settings).mkdir(parents=True, exist_ok=True)
    if any(name in only for name in SERVERS):
        home = prepare_home(settings, service_account(settings, create=True))
        on_progress(f"servers' state in {home}; s3 runs as {s3_account(settings).describe()}")
        on_progress(f"prefect and mlflow run as {python_account(settings).describe()}")
    if any(name in only for name in ("prefect", "mlflow")):
        created = ensure_databases(settings)
        if created:
            on_progress(f"created databases {', '.join(created)}")
    states = []
    for svc in services(settings):
        if svc.name not in only:
            continue
        record = read_record(settings, svc.name)
        if record is not None and is_alive(record):
            states.append(ServiceState(svc.name, svc.url, record["pid"], True, record["log"]))
            continue
        on_progress(f"starting {svc.name} ({svc.url})...")
        t0 = time.monotonic()
        record = start_service(settings, svc)
        on_progress(f"  {svc.name} up in {time.monotonic() - t0:.1f} s (pid {record['pid']})")
        states.append(ServiceState(svc.name, svc.url, record["pid"], True, record["log"]))
    return states


def status(settings: Settings) -> list[ServiceState]:
    out = []
    for svc in services(settings):
        record = read_record(settings, svc.name)
        running = record is not None and is_alive(record)
        out.append(ServiceState(svc.name, svc.url, record["pid"] if record else None, running, record["log"] if record else ""))
    return out


def stop(settings: Settings, name: str, sig: int = signal.SIGTERM, wait: float = 15.0, home: Path | None = None) -> bool:
    """Stop one service's process group; True when something was running. SIGKILL after `wait` s."""
    record = read_record(settings, name, home)
    if record is None:
        return False
    was_running = is_alive(record)
    if was_running:
        for current in (sig, signal.SIGKILL):
            try:
                os.killpg(record["pid"], current)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and is_alive(record):
                time.sleep(0.2)
            if not is_alive(record):
                break
    _record_path(settings, name, home).unlink(missing_ok=True)
    return was_running


def down(settings: Settings) -> list[str]:
    """Stop what `up` started, worker first; returns the names stopped."""
    return [name for name in reversed(ORDER) if stop(settings, name)]


# Configuration of the running stack ---------------------------------------------------------------


def write_env_file(settings: Settings) -> Path:
    path = env_file(settings)
    lines = [f"{k}={v}" for k, v in client_environment(settings).items()]
    write_secret_file(
        path,
        "# written by `atelier up` (the platform's credentials: keep it 0600); use with: set -a; . THIS_FILE; set +a\n"
        + "\n".join(lines)
        + "\n",
    )
    return path


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of a stack.env, for programs that start the stack's clients themselves."""
    return dict(line.split("=", 1) for line in Path(path).read_text().splitlines() if line and not line.startswith("#"))
