"""The embedded default's servers: one Prefect server per workspace, kept running in the background,
and the MLflow UI. Both on 127.0.0.1, both asking for credentials.

Without a server a Prefect flow starts a temporary one for every command (10-40 s before any work
starts). Instead, the first flow command of a workspace starts `prefect server start` on a free port
with the workspace's own database (`.atelier/prefect`, the same one the temporary servers used, so
the history stays), records it under `.atelier/local/`, and every later command talks to it: a flow
command then starts working in about a second. `atelier ui` starts it and the MLflow UI
(`mlflow server --app-name atelier-auth` over the workspace's tracking database) and prints their
URLs; `atelier down` stops them by their recorded pids.

Credentials are generated once into `.atelier/local/secrets.json` (0600): Prefect's API auth string
(clients read it from there; it is never in an argv or in output) and MLflow's admin password (log in
to the UI as `admin` with the password from that file). ATELIER_PREFECT_SERVER=temporary keeps the
old behaviour (a temporary server per command), as the test suite does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from atelier.cli.stack_config import MLFLOW_ADMIN, bin_path, inherited_environment
from atelier.cli.stack_processes import Service, is_alive, is_healthy, read_record, start_service, stop
from atelier.kernel.errors import ServiceUnavailable
from atelier.kernel.settings import Settings
from atelier.kernel.storage import file_lock, write_secret_file

NAMES = ("prefect", "mlflow")


def local_dir(settings: Settings) -> Path:
    return settings.local_servers_dir


def local_secrets(settings: Settings) -> dict[str, str]:
    import secrets as rng

    path = local_dir(settings) / "secrets.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    with file_lock(local_dir(settings) / "secrets.lock"):  # made once, even by two commands at once
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        values = {
            "prefect_auth_string": f"atelier:{rng.token_urlsafe(24)}",
            "mlflow_admin_password": rng.token_urlsafe(24),
            "mlflow_flask_secret": rng.token_urlsafe(32),
        }
        write_secret_file(path, json.dumps(values, indent=1))
        return values


def _free_port(preferred: int = 0) -> int:
    """`preferred` when it is free, else any free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _running(settings: Settings, name: str) -> dict | None:
    record = read_record(settings, name, local_dir(settings))
    if record is not None and is_alive(record) and record.get("health") and is_healthy(record["health"]):
        return record
    return None


def _prefect_service(settings: Settings, port: int) -> Service:
    url = f"http://127.0.0.1:{port}"
    env = {
        "PREFECT_HOME": str(settings.prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_AUTH_STRING": local_secrets(settings)["prefect_auth_string"],
        "PREFECT_SERVER_UI_API_URL": f"{url}/api",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    return Service(
        "prefect", [bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], url, f"{url}/api/health", port, env
    )


def _mlflow_service(settings: Settings, port: int) -> Service:
    home = local_dir(settings)
    secret = local_secrets(settings)
    ini = home / "mlflow-auth.ini"
    env = {
        "MLFLOW_BACKEND_STORE_URI": settings.resolved_tracking_uri,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": secret["mlflow_admin_password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["mlflow_flask_secret"],
        "MLFLOW_BASIC_AUTH_FAIL_CLOSED": "true",
    }

    def prepare() -> None:
        write_secret_file(
            ini,
            "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{home / 'mlflow-auth.db'}\nadmin_username = {MLFLOW_ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "grant_default_workspace_access = false\n",
        )
        done = subprocess.run(
            [sys.executable, "-m", "atelier.registry.auth_app"],
            env={**inherited_environment(), **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise ServiceUnavailable(
                "the MLflow UI's auth database",
                f"could not be prepared: {done.stderr.strip()[-600:]}",
                f"read the message; remove {home / 'mlflow-auth.db'} to start it afresh",
            )
        (home / "mlflow-auth.db").chmod(0o600)  # the users' password hashes

    url = f"http://127.0.0.1:{port}"
    return Service(
        "mlflow",
        [
            bin_path("mlflow"),
            "server",
            "--app-name",
            "atelier-auth",
            "--default-artifact-root",
            settings.resolved_artifact_root,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        url,
        f"{url}/health",
        port,
        env,
        before=prepare,
    )


def ensure(settings: Settings, name: str, on_progress=lambda _m: None) -> dict:
    """The workspace's background server `name` ("prefect" or "mlflow"), started if it is not running."""
    record = _running(settings, name)
    if record is not None:
        return record
    home = local_dir(settings)
    home.mkdir(parents=True, exist_ok=True)
    # two commands at once on a cold workspace: one starts the server, the other waits for it and uses it
    # (two servers would migrate one database at once, and the second would be left unrecorded)
    with file_lock(home / f"{name}.lock", lambda: on_progress(f"waiting for another command to start the workspace's {name} server...")):
        record = _running(settings, name)
        if record is not None:
            return record
        stop(settings, name, home=home)  # a recorded one that no longer answers
        port = _free_port(settings.mlflow_ui_port if name == "mlflow" else 0)
        svc = (_prefect_service if name == "prefect" else _mlflow_service)(settings, port)
        on_progress(f"starting the workspace's {name} server in the background (once; `atelier down` stops it)...")
        return start_service(settings, svc, home)


def use_background_prefect(settings: Settings, on_progress=lambda _m: None) -> str | None:
    """Point this process's Prefect client at the workspace's background server (starting it when
    needed); returns its URL. Nothing to do where a Prefect server is configured (the stack) or where
    ATELIER_PREFECT_SERVER=temporary. Call before Prefect is imported."""
    if settings.prefect_api_url or os.environ.get("ATELIER_PREFECT_SERVER", "background") == "temporary" or not settings.workspace.is_dir():
        return None
    record = ensure(settings, "prefect", on_progress)
    os.environ["PREFECT_API_URL"] = f"{record['url']}/api"
    os.environ["PREFECT_API_AUTH_STRING"] = local_secrets(settings)["prefect_auth_string"]
    return record["url"]


def down(settings: Settings) -> list[str]:
    return [name for name in NAMES if stop(settings, name, home=local_dir(settings))]
