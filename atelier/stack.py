"""`atelier up` / `atelier down`: the production topology on one machine, for development without Docker.

    PostgreSQL (already running)   databases <prefix>_prefect, _mlflow, _mlflow_auth, _ledger, created if missing
    SeaweedFS (`weed server -s3`)  S3 with data on disk (.atelier/stack/s3/), one bucket: mlflow/ (artifacts),
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

Each process runs in its own session, its pid and start time recorded under `.atelier/stack/`;
`down` stops exactly those (a recycled pid is never signalled). `up` is safe to run again: it starts
only what is not running, so it also brings back a server that died, with its data. The clients'
settings are written to `.atelier/stack/stack.env` (0600); `docker/compose.yaml` runs the same
topology with MinIO in place of SeaweedFS.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from atelier.errors import ConfigError, ServiceUnavailable
from atelier.settings import Settings
from atelier.storage import write_secret_file, write_text_atomic

SERVERS = ("s3", "prefect", "mlflow")
ORDER = (*SERVERS, "worker")
DATABASE_PARTS = ("prefect", "mlflow", "mlflow_auth", "ledger")
MLFLOW_ADMIN = "atelier-ops"  # the platform's identity on MLflow (admin); customers are users beside it
PREFECT_USER = "atelier"
# what a server or worker inherits from the caller's environment; everything else it gets is named
INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME", "SSL_CERT_FILE",
             "REQUESTS_CA_BUNDLE", "ATELIER_ACTOR")


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    url: str  # what it serves, for people
    health: str | Callable[[], bool] | None  # a URL answering 200 (401 counts: it asks for credentials), a check,
    port: int | None                         # or None: staying alive is enough (the worker)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    internal_ports: tuple[int, ...] = ()  # its own, not served to clients (SeaweedFS's master, volume, filer)
    before: Callable[[], None] | None = None  # run once before each start (a bootstrap step)


@dataclass(frozen=True)
class ServiceState:
    name: str
    url: str
    pid: int | None
    running: bool
    log: str = ""


def stack_dir(settings: Settings) -> Path:
    return settings.state_dir / "stack"


def env_file(settings: Settings) -> Path:
    return stack_dir(settings) / "stack.env"


def database_names(settings: Settings) -> dict[str, str]:
    prefix = settings.stack.database_prefix
    return {part: f"{prefix}_{part}" for part in DATABASE_PARTS}


def database_url(settings: Settings, part: str, driver: str = "postgresql+psycopg2") -> str:
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed: name the driver
    from sqlalchemy.engine import make_url

    url = make_url(settings.stack.postgres_url).set(drivername=driver, database=database_names(settings)[part])
    return url.render_as_string(hide_password=False)


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


# Secrets ------------------------------------------------------------------------------------------

def secrets_file(settings: Settings) -> Path:
    return stack_dir(settings) / "secrets.json"


def stack_secrets(settings: Settings) -> dict[str, str]:
    """The stack's credentials, generated on first use and kept (0600) so that restarts keep them."""
    import secrets as rng

    path = secrets_file(settings)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        pass
    except json.JSONDecodeError:
        raise ConfigError(str(path), "is not valid JSON", "restore it from a backup, or remove it and run `atelier down --drop-databases` "
                          "then `atelier up` (new credentials; the stored data stays in S3 and is readable only with the old keys)") from None
    values = {
        "s3_access_key": "atelier" + rng.token_hex(8),
        "s3_secret_key": rng.token_urlsafe(30),
        "mlflow_admin_password": rng.token_urlsafe(24),
        "mlflow_flask_secret": rng.token_urlsafe(32),
        "prefect_auth_string": f"{PREFECT_USER}:{rng.token_urlsafe(24)}",
        **{f"s3_jwt_{name}": rng.token_urlsafe(32) for name in ("write", "read", "filer_write", "filer_read")},
    }
    write_secret_file(path, json.dumps(values, indent=1))
    return values


def client_environment(settings: Settings) -> dict[str, str]:
    """The settings a client of the stack uses (written to stack.env, 0600): the platform's own
    credentials. Only these differ from the embedded default."""
    s = settings.stack
    secret = stack_secrets(settings)
    return {
        "ATELIER_WORKSPACE": str(settings.workspace),
        "ATELIER_TRACKING_URI": f"http://{s.host}:{s.mlflow_port}",
        "ATELIER_TRACKING_USERNAME": MLFLOW_ADMIN,
        "ATELIER_TRACKING_PASSWORD": secret["mlflow_admin_password"],
        "ATELIER_ARTIFACT_ROOT": f"s3://{s.bucket}/mlflow",
        "ATELIER_PREFECT_API_URL": f"http://{s.host}:{s.prefect_port}/api",
        "ATELIER_PREFECT_API_AUTH_STRING": secret["prefect_auth_string"],
        "ATELIER_PREFECT_RESULTS": f"s3://{s.bucket}/prefect-results",
        "ATELIER_DVC_REMOTE": f"s3://{s.bucket}/dvc",
        "ATELIER_S3_ENDPOINT_URL": f"http://{s.host}:{s.s3_port}",
        "ATELIER_LEDGER_URL": database_url(settings, "ledger"),
        "ATELIER_WORK_POOL": s.work_pool,
        "AWS_ACCESS_KEY_ID": secret["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": secret["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _inherited() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in INHERITED}


# S3: SeaweedFS ----------------------------------------------------------------------------------------

def s3_dir(settings: Settings) -> Path:
    return stack_dir(settings) / "s3"


def s3_identities_file(settings: Settings) -> Path:
    return s3_dir(settings) / "identities.json"


def _platform_identity(settings: Settings) -> dict:
    secret = stack_secrets(settings)
    return {"name": "atelier-platform", "credentials": [{"accessKey": secret["s3_access_key"], "secretKey": secret["s3_secret_key"]}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}


def reader_identity(settings: Settings, name: str, prefix: str, access_key: str, secret_key: str) -> dict:
    """An S3 identity that may list and read `bucket/prefix/*` and nothing else."""
    resource = f"{settings.stack.bucket}/{prefix.strip('/')}/*"
    return {"name": name, "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": [f"Read:{resource}", f"List:{resource}"]}


def _write_s3_config(settings: Settings, customers: list[dict] | None = None) -> None:
    """identities.json (the platform, then the customers' readers) and security.toml (JWT keys that
    close the master's, volume's and filer's own HTTP ports to anyone but SeaweedFS itself)."""
    path = s3_identities_file(settings)
    if customers is None:
        try:
            customers = [i for i in json.loads(path.read_text())["identities"] if i["name"] != "atelier-platform"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            customers = []
    write_secret_file(path, json.dumps({"identities": [_platform_identity(settings), *customers]}, indent=1))
    secret = stack_secrets(settings)
    toml = "".join(f'[jwt.{section}]\nkey = "{secret["s3_jwt_" + name]}"\nexpires_after_seconds = 30\n'
                   for section, name in (("signing", "write"), ("signing.read", "read"), ("filer_signing", "filer_write"),
                                         ("filer_signing.read", "filer_read")))
    write_secret_file(s3_dir(settings) / "security.toml", toml)


def add_s3_reader(settings: Settings, identity: dict) -> bool:
    """Add or replace a customer's S3 reader and make the running S3 server reload its identities
    (SIGHUP). False when this machine runs no stack S3 (keys then have to be made on the S3 server)."""
    path = s3_identities_file(settings)
    if not path.is_file():
        return False
    current = [i for i in json.loads(path.read_text())["identities"] if i["name"] not in ("atelier-platform", identity["name"])]
    _write_s3_config(settings, [*current, identity])
    record = _read_record(settings, "s3")
    if record is not None and _alive(record):
        os.killpg(record["pid"], signal.SIGHUP)
        time.sleep(1.0)  # the gateway reloads within a few hundred ms
    return True


def _s3_ready(settings: Settings) -> Callable[[], bool]:
    """Up when a signed request of the platform's identity succeeds (the gateway listens before its
    filer and volumes are ready)."""
    def check() -> bool:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        env = client_environment(settings)
        client = boto3.client("s3", endpoint_url=env["ATELIER_S3_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                              config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
        try:
            client.list_buckets()
            return True
        except (BotoCoreError, ClientError):
            return False

    return check


def _seaweed_ports(settings: Settings) -> dict[str, int]:
    base = settings.stack.s3_internal_port
    names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc", "s3.port.grpc")
    return {name: base + i for i, name in enumerate(names)}


def _seaweed_argv(settings: Settings) -> list[str]:
    s = settings.stack
    ports = _seaweed_ports(settings)
    return [_bin("weed"), "server", f"-dir={s3_dir(settings) / 'data'}", f"-ip={s.host}", f"-ip.bind={s.host}",
            *(f"-{k}={v}" for k, v in ports.items()), "-s3", f"-s3.port={s.s3_port}",
            f"-s3.config={s3_identities_file(settings)}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
            "-volume.max=0", "-master.volumeSizeLimitMB=1024", "-master.defaultReplication=000"]


def _prepare_s3(settings: Settings) -> None:
    (s3_dir(settings) / "data").mkdir(parents=True, exist_ok=True)
    _write_s3_config(settings)


# MLflow: basic auth, only the platform writes -------------------------------------------------------

def _mlflow_auth_ini(settings: Settings) -> Path:
    return stack_dir(settings) / "mlflow-auth.ini"


def _mlflow_env(settings: Settings) -> dict[str, str]:
    secret = stack_secrets(settings)
    client = client_environment(settings)
    return {"MLFLOW_BACKEND_STORE_URI": database_url(settings, "mlflow"),  # holds the database password: never in argv
            "MLFLOW_AUTH_CONFIG_PATH": str(_mlflow_auth_ini(settings)),
            "MLFLOW_AUTH_ADMIN_PASSWORD": secret["mlflow_admin_password"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["mlflow_flask_secret"],
            "MLFLOW_BASIC_AUTH_FAIL_CLOSED": "true",
            "MLFLOW_S3_ENDPOINT_URL": client["ATELIER_S3_ENDPOINT_URL"],
            **{k: client[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}


def _prepare_mlflow(settings: Settings) -> None:
    """The auth app's configuration (0600: it names the auth database), then its database and admin
    user, once, before the server's workers start."""
    write_secret_file(_mlflow_auth_ini(settings), (
        "[mlflow]\n"
        "# nobody reads anything unless granted: `atelier customer add` grants each customer its own models\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {database_url(settings, 'mlflow_auth')}\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"))
    env = {**_inherited(), **_mlflow_env(settings)}
    done = subprocess.run([sys.executable, "-m", "registry.auth_app"], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise ServiceUnavailable("MLflow's auth database", f"could not be prepared: {done.stderr.strip()[-600:]}",
                                 "check that PostgreSQL answers (ATELIER_STACK__POSTGRES_URL)")


def services(settings: Settings) -> list[Service]:
    s = settings.stack
    client = client_environment(settings)
    home = stack_dir(settings)
    prefect_env = {"PREFECT_HOME": str(home / "prefect-server"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_API_DATABASE_CONNECTION_URL": database_url(settings, "prefect", "postgresql+asyncpg"),
                   "PREFECT_SERVER_API_AUTH_STRING": client["ATELIER_PREFECT_API_AUTH_STRING"]}
    # what flows need, and no more: the platform's clients' settings, Prefect's client settings
    worker_env = {**client, "PREFECT_API_URL": client["ATELIER_PREFECT_API_URL"],
                  "PREFECT_API_AUTH_STRING": client["ATELIER_PREFECT_API_AUTH_STRING"],
                  "PREFECT_HOME": str(home / "prefect-worker"), "PREFECT_WORKER_QUERY_SECONDS": "3"}
    return [
        Service("s3", _seaweed_argv(settings), client["ATELIER_S3_ENDPOINT_URL"], _s3_ready(settings), s.s3_port,
                cwd=s3_dir(settings), internal_ports=tuple(_seaweed_ports(settings).values()), before=lambda: _prepare_s3(settings)),
        Service("prefect", [_bin("prefect"), "server", "start", "--host", s.host, "--port", str(s.prefect_port)],
                f"http://{s.host}:{s.prefect_port}", f"{client['ATELIER_PREFECT_API_URL']}/health", s.prefect_port, prefect_env),
        Service("mlflow", [_bin("mlflow"), "server", "--app-name", "atelier-auth",
                           "--default-artifact-root", client["ATELIER_ARTIFACT_ROOT"], "--no-serve-artifacts",
                           "--host", s.host, "--port", str(s.mlflow_port), "--workers", "2"],
                client["ATELIER_TRACKING_URI"], f"{client['ATELIER_TRACKING_URI']}/health", s.mlflow_port, _mlflow_env(settings),
                before=lambda: _prepare_mlflow(settings)),
        Service("worker", [_bin("prefect"), "worker", "start", "--pool", s.work_pool, "--type", "process",
                           "--limit", str(s.worker_limit), "--name", f"atelier-{socket.gethostname()}"],
                f"work pool {s.work_pool!r}", None, None, worker_env),
    ]


# Databases ---------------------------------------------------------------------------------------

def _maintenance_connection(settings: Settings):
    """An autocommit connection to the server's `postgres` database (CREATE/DROP DATABASE)."""
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(settings.stack.postgres_url)
    try:
        conn = psycopg2.connect(host=url.host or "127.0.0.1", port=url.port or 5432, user=url.username or "postgres",
                                password=url.password, dbname="postgres", connect_timeout=5)
    except psycopg2.OperationalError as exc:
        raise ServiceUnavailable(f"PostgreSQL at {url.host}:{url.port or 5432}", f"did not answer ({' '.join(str(exc).split())})",
                                 "start it (pg_ctlcluster, or `docker compose up postgres`) or set ATELIER_STACK__POSTGRES_URL") from None
    conn.autocommit = True
    return conn


def _create_or_drop(settings: Settings, create: bool) -> list[str]:
    conn = _maintenance_connection(settings)
    changed = []
    try:
        with conn.cursor() as cur:
            for name in database_names(settings).values():  # names match ^[a-z][a-z0-9_]*$ (settings)
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if (cur.fetchone() is None) == create:
                    cur.execute(f'CREATE DATABASE "{name}"' if create else f'DROP DATABASE "{name}" WITH (FORCE)')
                    changed.append(name)
    finally:
        conn.close()
    return changed


def ensure_databases(settings: Settings) -> list[str]:
    """Create the stack's databases where missing; returns the ones created."""
    return _create_or_drop(settings, create=True)


def drop_databases(settings: Settings) -> list[str]:
    """Drop the stack's databases (their sessions are ended first); returns the ones that existed."""
    return _create_or_drop(settings, create=False)


# Processes ---------------------------------------------------------------------------------------

def _record_path(settings: Settings, name: str) -> Path:
    return stack_dir(settings) / f"{name}.json"


def _started_at(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(record: dict) -> bool:
    """The recorded process, not a later one with its pid, and not a zombie nobody reaped."""
    import psutil

    try:
        proc = psutil.Process(record["pid"])
        return abs(proc.create_time() - record["create_time"]) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _read_record(settings: Settings, name: str) -> dict | None:
    path = _record_path(settings, name)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _healthy(check: str | Callable[[], bool]) -> bool:
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


def _start(settings: Settings, svc: Service) -> dict:
    home = stack_dir(settings)
    log = home / f"{svc.name}.log"
    if svc.port is not None and _port_open(settings.stack.host, svc.port):
        raise ConfigError(f"port {svc.port} ({svc.name})", "is taken by a program `atelier up` did not start",
                          f"stop that program, or choose another port with ATELIER_STACK__{svc.name.upper()}_PORT")
    taken = [port for port in svc.internal_ports if _port_open(settings.stack.host, port)]
    if taken:
        raise ConfigError(f"port(s) {', '.join(map(str, taken))} ({svc.name}'s internal servers)", "are taken by another program",
                          "stop it, or move them with ATELIER_STACK__S3_INTERNAL_PORT (the first of 7 ports in a row)")
    if svc.before is not None:
        svc.before()
    env = {**_inherited(), **svc.env}  # never the caller's whole environment: its secrets are not the server's
    with open(log, "ab") as out:
        proc = subprocess.Popen(svc.argv, env=env, cwd=svc.cwd or home, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    record = {"pid": proc.pid, "create_time": _started_at(proc.pid) or time.time(), "argv": svc.argv, "log": str(log),
              "url": svc.url}
    write_text_atomic(_record_path(settings, svc.name), json.dumps(record, indent=1))
    deadline = time.monotonic() + (settings.stack.start_timeout if svc.health else 3.0)
    while True:
        if proc.poll() is not None:
            _record_path(settings, svc.name).unlink(missing_ok=True)
            raise ServiceUnavailable(f"{svc.name} ({' '.join(svc.argv[:3])})", f"exited with code {proc.returncode}:\n{_log_tail(log)}",
                                     f"read {log}")
        if svc.health is not None and _healthy(svc.health):
            return record
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if svc.health is None:  # the worker: still alive after a few seconds is up
        return record
    os.killpg(proc.pid, signal.SIGKILL)  # half-started: not left behind holding its ports
    proc.wait()
    _record_path(settings, svc.name).unlink(missing_ok=True)
    raise ServiceUnavailable(f"{svc.name} at {svc.url}", f"did not answer within {settings.stack.start_timeout:.0f} s:\n{_log_tail(log)}",
                             f"read {log}; raise ATELIER_STACK__START_TIMEOUT on a slow machine")


def up(settings: Settings, only: tuple[str, ...] = ORDER, on_progress: Callable[[str], None] = lambda _m: None) -> list[ServiceState]:
    """Start the named services that are not running (in dependency order); returns their states."""
    stack_dir(settings).mkdir(parents=True, exist_ok=True)
    if any(name in only for name in ("prefect", "mlflow")):
        created = ensure_databases(settings)
        if created:
            on_progress(f"created databases {', '.join(created)}")
    states = []
    for svc in services(settings):
        if svc.name not in only:
            continue
        record = _read_record(settings, svc.name)
        if record is not None and _alive(record):
            states.append(ServiceState(svc.name, svc.url, record["pid"], True, record["log"]))
            continue
        on_progress(f"starting {svc.name} ({svc.url})...")
        t0 = time.monotonic()
        record = _start(settings, svc)
        on_progress(f"  {svc.name} up in {time.monotonic() - t0:.1f} s (pid {record['pid']})")
        states.append(ServiceState(svc.name, svc.url, record["pid"], True, record["log"]))
    return states


def status(settings: Settings) -> list[ServiceState]:
    out = []
    for svc in services(settings):
        record = _read_record(settings, svc.name)
        running = record is not None and _alive(record)
        out.append(ServiceState(svc.name, svc.url, record["pid"] if record else None, running, record["log"] if record else ""))
    return out


def stop(settings: Settings, name: str, sig: int = signal.SIGTERM, wait: float = 15.0) -> bool:
    """Stop one service's process group; True when something was running. SIGKILL after `wait` s."""
    record = _read_record(settings, name)
    if record is None:
        return False
    was_running = _alive(record)
    if was_running:
        for current in (sig, signal.SIGKILL):
            try:
                os.killpg(record["pid"], current)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _alive(record):
                time.sleep(0.2)
            if not _alive(record):
                break
    _record_path(settings, name).unlink(missing_ok=True)
    return was_running


def down(settings: Settings) -> list[str]:
    """Stop what `up` started, worker first; returns the names stopped."""
    return [name for name in reversed(ORDER) if stop(settings, name)]


# Configuration of the running stack ---------------------------------------------------------------

def write_env_file(settings: Settings) -> Path:
    path = env_file(settings)
    lines = [f"{k}={v}" for k, v in client_environment(settings).items()]
    write_secret_file(path, "# written by `atelier up` (the platform's credentials: keep it 0600); use with: set -a; . THIS_FILE; set +a\n"
                      + "\n".join(lines) + "\n")
    return path


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of a stack.env, for programs that start the stack's clients themselves."""
    return dict(line.split("=", 1) for line in Path(path).read_text().splitlines() if line and not line.startswith("#"))
