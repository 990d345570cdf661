"""What the stack's servers are configured with: credentials (generated once, kept 0600), the clients'
settings, SeaweedFS's S3 identities and JWT keys, MLflow's auth app configuration, the databases.
`cli/stack_processes.py` starts and stops the processes; this module decides what they are given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from atelier.cli.stack_user import ServiceAccount, hand_over, python_paths, service_account, stack_dir
from atelier.kernel.errors import ConfigError, ServiceUnavailable
from atelier.kernel.settings import Settings
from atelier.kernel.storage import write_secret_file

DATABASE_PARTS = ("prefect", "mlflow", "mlflow_auth", "ledger")
MLFLOW_ADMIN = "atelier-ops"  # the operator's identity on MLflow (admin); customers are users beside it
MLFLOW_WORKER = "atelier-worker"  # the worker's: not an admin, MANAGE on every experiment and model (registry/auth_app.py)
PREFECT_USER = "atelier"
PLATFORM_IDENTITY = "atelier-platform"  # the platform's S3 identity (read/write); customers' readers sit beside it
# what a server or worker inherits from the caller's environment; everything else it gets is named
INHERITED = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "USER",
    "LOGNAME",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "ATELIER_ACTOR",
)


def database_names(settings: Settings) -> dict[str, str]:
    prefix = settings.stack.database_prefix
    return {part: f"{prefix}_{part}" for part in DATABASE_PARTS}


def database_url(settings: Settings, part: str, driver: str = "postgresql+psycopg2") -> str:
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed: name the driver
    from sqlalchemy.engine import make_url

    url = make_url(settings.stack.postgres_url).set(drivername=driver, database=database_names(settings)[part])
    return url.render_as_string(hide_password=False)


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


# Secrets ------------------------------------------------------------------------------------------


def secrets_file(settings: Settings) -> Path:
    return stack_dir(settings) / "secrets.json"


def stack_secrets(settings: Settings) -> dict[str, str]:
    """The stack's credentials, generated on first use and kept (0600) so that restarts keep them."""
    import secrets as rng

    path = secrets_file(settings)
    try:
        kept = json.loads(path.read_text())
    except FileNotFoundError:
        kept = None
    except json.JSONDecodeError:
        raise ConfigError(
            str(path),
            "is not valid JSON",
            "restore it from a backup, or remove it and run `atelier down --drop-databases` "
            "then `atelier up` (new credentials; the stored data stays in S3 and is readable only with the old keys)",
        ) from None
    if kept is not None:
        if "mlflow_worker_password" not in kept:  # a stack made before the worker had an identity of its own
            kept["mlflow_worker_password"] = rng.token_urlsafe(24)
            write_secret_file(path, json.dumps(kept, indent=1))
        return kept
    values = {
        "s3_access_key": "atelier" + rng.token_hex(8),
        "s3_secret_key": rng.token_urlsafe(30),
        "mlflow_admin_password": rng.token_urlsafe(24),
        "mlflow_worker_password": rng.token_urlsafe(24),
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
        "AWS_RETRY_MODE": "standard",  # 3 attempts with backoff, not legacy mode's 5 per call
    }


def inherited_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in INHERITED}


# S3: SeaweedFS ----------------------------------------------------------------------------------------


def server_home(settings: Settings) -> Path:
    """Where the servers keep their state: `.atelier/stack/`, or the service user's folder (cli/stack_user.py)."""
    return service_account(settings).home


def s3_account(settings: Settings) -> ServiceAccount:
    """SeaweedFS runs as the service user whenever it can read its one binary."""
    return service_account(settings, [Path(bin_path("weed"))])


def python_account(settings: Settings) -> ServiceAccount:
    """The Prefect and MLflow servers (and MLflow's bootstrap) need Python, the environment and this checkout."""
    return service_account(settings, python_paths())


def s3_dir(settings: Settings) -> Path:
    return server_home(settings) / "s3"


def s3_identities_file(settings: Settings) -> Path:
    return s3_dir(settings) / "identities.json"


def platform_identity(settings: Settings) -> dict:
    secret = stack_secrets(settings)
    return {
        "name": PLATFORM_IDENTITY,
        "credentials": [{"accessKey": secret["s3_access_key"], "secretKey": secret["s3_secret_key"]}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }


def reader_identity(settings: Settings, name: str, prefix: str, access_key: str, secret_key: str) -> dict:
    """An S3 identity that may list and read `bucket/prefix/*` and nothing else."""
    resource = f"{settings.stack.bucket}/{prefix.strip('/')}/*"
    return {
        "name": name,
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": [f"Read:{resource}", f"List:{resource}"],
    }


def customer_identities(settings: Settings) -> list[dict]:
    """The customers' readers in identities.json (everything but the platform's own identity)."""
    try:
        identities = json.loads(s3_identities_file(settings).read_text())["identities"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []
    return [i for i in identities if i["name"] != PLATFORM_IDENTITY]


def read_s3_readers(path: Path) -> list[dict]:
    """The customers' readers in a readers file (`settings.stack.s3_readers_file`); [] when there is none yet."""
    try:
        return list(json.loads(Path(path).read_text())["identities"])
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(
            str(path), 'is not a readers file ({"identities": [...]})', "restore it, or remove it and add the customers again"
        ) from None


def write_s3_config(settings: Settings, customers: list[dict] | None = None) -> None:
    """identities.json (the platform, then the customers' readers: by default the ones already there) and
    security.toml: JWT keys, and mutual TLS on every HTTP and gRPC port of the master, volume and filer
    (cli/stack_tls.py), so that only SeaweedFS itself reaches them; the S3 gateway is the one door."""
    customers = customer_identities(settings) if customers is None else customers
    write_secret_file(s3_identities_file(settings), json.dumps({"identities": [platform_identity(settings), *customers]}, indent=1))
    secret = stack_secrets(settings)
    toml = "".join(
        f'[jwt.{section}]\nkey = "{secret["s3_jwt_" + name]}"\nexpires_after_seconds = 30\n'
        for section, name in (
            ("signing", "write"),
            ("signing.read", "read"),
            ("filer_signing", "filer_write"),
            ("filer_signing.read", "filer_read"),
        )
    )
    from atelier.cli.stack_tls import ensure_certificates, security_sections

    toml += security_sections(ensure_certificates(s3_dir(settings) / "tls", settings.stack.host))
    write_secret_file(s3_dir(settings) / "security.toml", toml)
    hand_over(s3_dir(settings), s3_account(settings))  # SeaweedFS reads them (and reloads identities on SIGHUP)


def s3_ready(settings: Settings) -> Callable[[], bool]:
    """Up when a signed request of the platform's identity succeeds (the gateway listens before its
    filer and volumes are ready)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    env = client_environment(settings)
    client = boto3.client(
        "s3",
        endpoint_url=env["ATELIER_S3_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )

    def check() -> bool:
        try:
            client.list_buckets()
            return True
        except (BotoCoreError, ClientError):
            return False

    return check


def seaweed_ports(settings: Settings) -> dict[str, int]:
    base = settings.stack.s3_internal_port
    names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc", "s3.port.grpc")
    return {name: base + i for i, name in enumerate(names)}


def seaweed_argv(settings: Settings, bind: str | None = None) -> list[str]:
    """`weed server -s3` on `host` (bound there too, unless `bind` names another address: in a container,
    0.0.0.0, where the master, volume and filer still take only SeaweedFS's own TLS clients)."""
    s = settings.stack
    ports = seaweed_ports(settings)
    return [
        bin_path("weed"),
        f"-logdir={s3_dir(settings) / 'logs'}",
        "server",
        f"-dir={s3_dir(settings) / 'data'}",
        f"-ip={s.host}",
        f"-ip.bind={bind or s.host}",
        *(f"-{k}={v}" for k, v in ports.items()),
        "-s3",
        f"-s3.port={s.s3_port}",
        f"-s3.config={s3_identities_file(settings)}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.iam=false",
        "-volume.max=0",
        "-master.volumeSizeLimitMB=1024",
        "-master.defaultReplication=000",
        "-master.telemetry=false",  # a platform's storage does not report to anyone
    ]


def prepare_s3(settings: Settings, customers: list[dict] | None = None) -> None:
    for sub in ("data", "logs"):
        (s3_dir(settings) / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    # SeaweedFS also listens on unix sockets named by port in the temp folder (0700, its user's); one a stopped
    # server left would stop the next from listening, and from dialling it when it runs as another user.
    # Its ports are free (start_service checked), so no live server owns them.
    ports = [settings.stack.s3_port, *seaweed_ports(settings).values()]
    for port in ports:
        for stale in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
            stale.unlink(missing_ok=True)
    # SeaweedFS gives some files 0644 itself (.vif): hand_over makes them 0600 in 0700 folders, the service user's
    write_s3_config(settings, customers)


# MLflow: basic auth, only the platform writes -------------------------------------------------------


def mlflow_auth_ini(settings: Settings) -> Path:
    return server_home(settings) / "mlflow-auth.ini"


def mlflow_env(settings: Settings) -> dict[str, str]:
    secret = stack_secrets(settings)
    client = client_environment(settings)
    return {
        "MLFLOW_BACKEND_STORE_URI": database_url(settings, "mlflow"),  # holds the database password: never in argv
        "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_ini(settings)),
        "MLFLOW_AUTH_ADMIN_PASSWORD": secret["mlflow_admin_password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["mlflow_flask_secret"],
        "MLFLOW_BASIC_AUTH_FAIL_CLOSED": "true",
        # server-side jobs (online scoring, prompt optimisation) are features the platform does not use: no executor runs
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # the worker's identity (registry/auth_app.py): its name for the server, its password for the bootstrap only
        "ATELIER_AUTH_WORKER_USER": MLFLOW_WORKER,
        # failed logins counted across the server's worker processes (registry/auth_policy.py)
        "ATELIER_AUTH_THROTTLE_DB": str(server_home(settings) / "mlflow-login-failures.db"),
        "MLFLOW_S3_ENDPOINT_URL": client["ATELIER_S3_ENDPOINT_URL"],
        **{k: client[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")},
    }


def prepare_mlflow(settings: Settings) -> None:
    """The auth app's configuration (0600: it names the auth database), then its database and admin
    user, once, before the server's workers start."""
    write_secret_file(
        mlflow_auth_ini(settings),
        (
            "[mlflow]\n"
            "# nobody reads anything unless granted: `atelier customer add` grants each customer its own models\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = {database_url(settings, 'mlflow_auth')}\n"
            f"admin_username = {MLFLOW_ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "grant_default_workspace_access = false\n"
        ),
    )
    account = python_account(settings)
    hand_over(mlflow_auth_ini(settings), account)
    env = {
        **inherited_environment(),
        **account.environment(),
        **mlflow_env(settings),
        "ATELIER_AUTH_WORKER_PASSWORD": stack_secrets(settings)["mlflow_worker_password"],
    }
    done = subprocess.run(
        [sys.executable, "-m", "atelier.registry.auth_app"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=server_home(settings),
        **account.popen_args(),
    )
    if done.returncode != 0:
        raise ServiceUnavailable(
            "MLflow's auth database",
            f"could not be prepared: {done.stderr.strip()[-600:]}",
            "check that PostgreSQL answers (ATELIER_STACK__POSTGRES_URL)",
        )
