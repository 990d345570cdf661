"""Which service is away: turn the many shapes of "could not reach a server" into one `ServiceUnavailable`
that names the service (MLflow, S3, PostgreSQL, Prefect), its address and the fix, with exit code 6.

Libraries report an outage in their own words, often wrapped two or three times (boto3 inside MLflow's
artifact store, aiohttp inside s3fs inside DVC, httpx inside Prefect's client, psycopg2 inside
SQLAlchemy). `classify()` walks an exception's causes and matches on class names and messages, so the
kernel needs none of those libraries. A server that answers 5xx is asked about its database: when
PostgreSQL does not accept a connection, the error names PostgreSQL, not the server in front of it.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from typing import Iterator
from urllib.parse import urlsplit

from atelier.kernel.errors import AtelierError, DiskError, ServiceUnavailable
from atelier.kernel.settings import TEMPORARY_PREFECT_TIMEOUT, Settings

# MLflow's REST client, when its server is gone, restarting or behind a failing proxy
MLFLOW_UNREACHABLE = (
    "failed with exception",
    "Max retries exceeded",
    "Connection refused",
    "Connection aborted",
    "RemoteDisconnected",
    "Read timed out",
    "error code 502",
    "error code 503",
    "error code 504",
)
_S3_CLASSES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ConnectionClosedError",
    "S3UploadFailedError",
}
_S3_TEXT = ("Could not connect to the endpoint URL", "Cannot connect to host", "Connect timeout on endpoint URL")
_CONNECT_TEXT = (
    "Connection refused",
    "All connection attempts failed",
    "Failed to reach API",
    "Name or service not known",
    "Connection reset by peer",
    "RemoteProtocolError",
    "Server disconnected",
)

# the words of Prefect's RuntimeError when the server it starts for a command does not answer in time
_TEMPORARY_PREFECT = "attempting to connect to ephemeral Prefect API server"


def causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend([current.__cause__, current.__context__, *getattr(current, "exceptions", ())])


def _host_port(url: str | None, default_port: int) -> tuple[str, int] | None:
    if not url:
        return None
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    return parts.hostname, parts.port or default_port


def _accepts(address: tuple[str, int] | None) -> bool:
    if address is None:
        return True
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(address) == 0


def _postgres(settings: Settings) -> tuple[str, int] | None:
    for url in (settings.ledger_url, settings.stack.postgres_url):
        if url and url.startswith("postgresql"):
            return _host_port(url, 5432)
    return None


def _postgres_down(settings: Settings, behind: str) -> ServiceUnavailable | None:
    address = _postgres(settings)
    if address is None or _accepts(address):
        return None
    return ServiceUnavailable(
        f"PostgreSQL at {address[0]}:{address[1]}",
        f"did not answer ({behind} could not reach its database)",
        "start it (`pg_ctlcluster ... start`, or `docker compose up -d postgres`) and rerun; "
        "what was registered before is intact, and the next run marks the interrupted flow run crashed",
    )


def _say(service: str, reason: str, fix: str) -> ServiceUnavailable:
    return ServiceUnavailable(service, f"did not answer ({' '.join(reason.split())[:240]})", fix)


RESTART = "start it again (`atelier up` restarts what the stack runs; `docker compose up -d` in Docker) and rerun"


_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded")


def disk_error(exc: BaseException, settings: Settings) -> DiskError | None:
    """A full or read-only disk behind `exc` (also SQLite's own words for a read-only database)."""
    for err in causes(exc):
        where = getattr(err, "filename", None) or str(settings.workspace)
        # errno, or the words of a library that does not raise OSError (safetensors' Rust: "os error 28")
        if (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or any(m in str(err) for m in _FULL_WORDS):
            return DiskError(
                f"disk holding {where}",
                "is full",
                "free some space (or move the workspace) and rerun; writes are "
                "atomic, so nothing already stored was lost, and training resumes from its last whole checkpoint",
            )
        if (
            (isinstance(err, OSError) and err.errno == errno.EROFS)
            or "readonly database" in str(err)
            or "read-only file system" in str(err)
        ):
            return DiskError(
                f"storage holding {where}", "is read-only", "make it writable (or point ATELIER_WORKSPACE at a writable copy) and rerun"
            )
    return None


def _full_workspace_disk(settings: Settings) -> DiskError | None:
    """Any failure while the workspace's disk has no room left is that disk's: the background Prefect
    server's database lives there too, and its 500s would otherwise read as "the server did not answer"."""
    try:
        free = shutil.disk_usage(settings.state_dir if settings.state_dir.is_dir() else settings.workspace).free
    except OSError:
        return None
    if free >= FULL_BELOW:
        return None
    return DiskError(
        f"disk holding {settings.workspace}",
        f"is full ({free // 1024} KiB free)",
        "free some space (or move the workspace) and rerun; writes are atomic, so nothing already stored was lost",
    )


FULL_BELOW = 1024 * 1024  # bytes free under which a workspace disk counts as full


_SQLITE_DAMAGE = ("file is not a database", "database disk image is malformed")


def classify(exc: BaseException, settings: Settings) -> AtelierError | None:
    """The outage (a server, or the disk) behind `exc`, or None when it is not one."""
    for err in causes(exc):
        if isinstance(err, (ServiceUnavailable, DiskError)):
            return err
        if isinstance(err, AtelierError):
            return None
    disk = disk_error(exc, settings) or _full_workspace_disk(settings)
    if disk is not None:
        return disk
    for err in causes(exc):
        name, text = type(err).__name__, str(err)
        module = type(err).__module__ or ""
        if any(marker in text for marker in _SQLITE_DAMAGE):  # a store damaged while the command ran
            from atelier.kernel.stores import StoreDamaged, check_local_stores

            try:
                check_local_stores(settings)
            except StoreDamaged as damaged:
                return damaged
            return StoreDamaged("a SQLite database of the workspace", text, "restore the workspace's .atelier folder from a backup")
        if name in _S3_CLASSES or any(marker in text for marker in _S3_TEXT):
            endpoint = settings.s3_endpoint_url or "AWS"
            return _say(
                f"S3 at {endpoint}",
                text,
                f"{RESTART}; objects stored before the outage are kept (SeaweedFS keeps them on disk), and a "
                "registration that was cut off left no version",
            )
        if name == "OperationalError" and ("sqlalchemy" in module or "psycopg2" in module):
            address = _postgres(settings)
            if address is None or _accepts(address):
                continue  # not a connection failure (a missing table, a lock): not an outage
            return _say(
                f"PostgreSQL at {address[0]}:{address[1]}",
                text,
                f"{RESTART}; the ledger is unchanged (a row is written in one transaction)",
            )
        if "OperationalError" in text or "could not connect to server" in text or "server closed the connection" in text:
            return _postgres_down(settings, "a server") or _say("PostgreSQL", text, RESTART)
        if _TEMPORARY_PREFECT in text:  # Prefect's own RuntimeError: the server it starts per command did not come up
            waited = os.environ.get(TEMPORARY_PREFECT_TIMEOUT, "20")
            return ServiceUnavailable(
                "Prefect's temporary server for this command",
                f"did not answer within {waited} s (a busy machine: its start imports Prefect's server and migrates the database)",
                "rerun when the machine is less busy, give it longer (ATELIER_STACK__START_TIMEOUT=600), or leave "
                "ATELIER_PREFECT_SERVER unset so commands share one background server; nothing was started",
            )
        if "prefect" in module or "httpx" in module or "/api/" in text and settings.prefect_api_url and settings.prefect_api_url in text:
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status is not None and status >= 500:
                return _postgres_down(settings, f"the Prefect server at {settings.prefect_api_url}") or _say(
                    f"Prefect server at {settings.prefect_api_url}", f"answered {status}: {text}", RESTART
                )
            if any(marker in text for marker in _CONNECT_TEXT) or name in ("ConnectError", "ConnectTimeout", "ReadTimeout"):
                return _say(f"Prefect server at {settings.prefect_api_url or 'its local temporary server'}", text, RESTART)
        if "mlflow" in module and any(marker in text for marker in MLFLOW_UNREACHABLE):
            return _say(f"MLflow tracking server at {settings.resolved_tracking_uri}", text, RESTART)
        if "mlflow" in module and "error code 500" in text:
            return _postgres_down(settings, f"the MLflow server at {settings.resolved_tracking_uri}")
        tracking = _host_port(settings.resolved_tracking_uri, 80)
        if module.startswith(("requests", "urllib3")) and tracking and f"{tracking[0]}" in text and f"{tracking[1]}" in text:
            return _say(f"MLflow tracking server at {settings.resolved_tracking_uri}", text, RESTART)
    return None


def require_writable(settings: Settings) -> None:
    """The workspace's stores (Prefect's and MLflow's SQLite, caches, training outputs) take a write."""
    state = settings.state_dir
    if not state.is_dir():
        return
    try:
        with tempfile.NamedTemporaryFile(dir=state, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise DiskError(
            f"workspace {settings.workspace}",
            f"cannot be written ({os.strerror(exc.errno or 0) or exc})",
            "make it writable (or point ATELIER_WORKSPACE at a writable copy) and rerun; nothing was started",
        ) from None


def preflight(settings: Settings) -> None:
    """Before a command starts work: the workspace takes a write, and every server the settings name
    accepts a connection (2 s each); otherwise exit 6 naming the first that does not. The embedded
    default names no server."""
    require_writable(settings)
    checks: list[tuple[str, str | None, int]] = [
        ("MLflow tracking server", settings.tracking_uri if (settings.tracking_uri or "").startswith("http") else None, 80),
        ("Prefect server", settings.prefect_api_url, 80),
        ("PostgreSQL (ledger)", settings.ledger_url if (settings.ledger_url or "").startswith("postgresql") else None, 5432),
    ]
    if settings.s3_endpoint_url and any(
        (u or "").startswith("s3://") for u in (settings.artifact_root, settings.dvc_remote, settings.prefect_results)
    ):
        checks.append(("S3", settings.s3_endpoint_url, 80))
    for service, url, default_port in checks:
        address = _host_port(url, default_port)
        if url is not None and address is not None and not _accepts(address):
            from atelier.kernel.settings import mask_url

            raise ServiceUnavailable(f"{service} at {mask_url(url)}", "does not accept connections", f"{RESTART}; nothing was started")
