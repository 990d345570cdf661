"""Deny by default, in front of everything the MLflow server serves (Flask and FastAPI routes alike).

MLflow 3.17 serves part of its API as native FastAPI routes (the assistant, jobs, the AI gateway, MCP
servers, OTLP ingestion) that the Flask-side permission checks never see; the assistant can run shell
commands on the server. This ASGI layer runs before any of them and decides on the route a request
matches:

    platform (admin, worker)  every Flask route (MLflow's own checks keep user management to the admin);
                              native routes only from NATIVE_ROUTES (health, server info, artifact
                              transfer): the assistant, jobs, gateway, MCP and OTLP are off
    customer                  only the read routes in CUSTOMER_ROUTES (MLflow's own per-resource checks
                              still apply to them: a customer reads only what it was granted)
    anonymous                 health, static UI files and server info; everything else 401

Credentials are checked here (cached for CREDENTIAL_TTL s by a hash of the pair) and failed attempts are
throttled per user and address (429 with Retry-After). `tests/test_mlflow_routes.py` enumerates every
route the server exposes, so an MLflow upgrade that adds one fails the test until someone decides.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass

READ_PREFIXES = ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/", "/api/3.0/mlflow/", "/ajax-api/3.0/mlflow/")
# The reads a customer's client and the MLflow UI need to look at and load the customer's own models (rule
# suffixes under each of READ_PREFIXES, as MLflow's Flask url_map spells them).
CUSTOMER_READS = (
    ("GET", "registered-models/get"),
    ("GET", "registered-models/search"),
    ("GET", "registered-models/alias"),
    ("GET", "registered-models/get-latest-versions"),
    ("POST", "registered-models/get-latest-versions"),
    ("GET", "model-versions/get"),
    ("GET", "model-versions/search"),
    ("GET", "model-versions/get-download-uri"),
    ("GET", "experiments/get"),
    ("GET", "experiments/get-by-name"),
    ("POST", "experiments/search"),
    ("GET", "experiments/search"),
    ("GET", "runs/get"),
    ("POST", "runs/search"),
    ("GET", "metrics/get-history"),
    ("GET", "metrics/get-history-bulk"),
    ("GET", "metrics/get-history-bulk-interval"),
    ("GET", "artifacts/list"),
    ("GET", "logged-models/<model_id>"),
    ("POST", "logged-models/search"),
    ("GET", "logged-models/<model_id>/artifacts/directories"),
    ("GET", "users/current"),
    ("GET", "users/current/permissions"),
    ("GET", "server-info"),
)
CUSTOMER_ROUTES = frozenset(
    {(method, prefix + suffix) for method, suffix in CUSTOMER_READS for prefix in READ_PREFIXES}
    | {
        ("GET", "/"),
        ("GET", "/static-files/<path:path>"),
        ("GET", "/favicon.ico"),
        ("GET", "/health"),
        ("GET", "/version"),
        ("POST", "/graphql"),
        ("GET", "/get-artifact"),
        ("GET", "/model-versions/get-artifact"),
    }
)
NATIVE_ROUTES = ("/health", "/api/3.0/mlflow/server-info", "/ajax-api/3.0/mlflow/server-info")
NATIVE_PLATFORM_PREFIXES = ("/api/2.0/mlflow-artifacts/", "/ajax-api/2.0/mlflow-artifacts/")
ANONYMOUS_PREFIXES = ("/static-files/", "/favicon.ico", "/health", "/api/3.0/mlflow/server-info", "/ajax-api/3.0/mlflow/server-info")

CREDENTIAL_TTL = 30.0
FAILURES_PER_USER = 10  # per user and address, in WINDOW seconds
FAILURES_PER_ADDRESS = 60
WINDOW = 60.0


@dataclass(frozen=True)
class Caller:
    username: str
    admin: bool


class Throttle:
    """Failed logins per (user, address) and per address in a sliding window, kept in SQLite: in memory, or,
    with `path`, in a file that every worker process of the server shares (`ATELIER_AUTH_THROTTLE_DB`; the
    stack sets it), so a guesser gets no more tries by landing on another worker."""

    def __init__(
        self, per_user: int = FAILURES_PER_USER, per_address: int = FAILURES_PER_ADDRESS, window: float = WINDOW, path: str | None = None
    ) -> None:
        import sqlite3

        self.per_user, self.per_address, self.window = per_user, per_address, window
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path or ":memory:", timeout=5, isolation_level=None, check_same_thread=False)
        if path:
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS failures (key TEXT NOT NULL, at REAL NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS failures_key ON failures (key, at)")

    @staticmethod
    def _keys(user: str, address: str) -> tuple[str, str]:
        return f"u\0{user}\0{address}", f"a\0{address}"

    def retry_after(self, user: str, address: str) -> int:
        """Seconds until this pair may try again; 0 when it may now."""
        now = time.time()
        waits = []
        with self._lock:
            for key, limit in zip(self._keys(user, address), (self.per_user, self.per_address)):
                count, oldest = self._db.execute(
                    "SELECT count(*), min(at) FROM failures WHERE key = ? AND at > ?", (key, now - self.window)
                ).fetchone()
                if count >= limit:
                    waits.append(oldest + self.window - now)
        return int(max(waits) + 1) if waits else 0

    def failed(self, user: str, address: str) -> None:
        now = time.time()
        with self._lock:
            self._db.executemany("INSERT INTO failures (key, at) VALUES (?, ?)", [(key, now) for key in self._keys(user, address)])
            self._db.execute("DELETE FROM failures WHERE at <= ?", (now - self.window,))


class DenyByDefault:
    """ASGI middleware around MLflow's FastAPI app (see the module docstring)."""

    def __init__(self, app, flask_app, authenticate=None, throttle: Throttle | None = None) -> None:
        from starlette.routing import Mount

        self.app = app
        self.native = [route for route in app.routes if not isinstance(route, Mount)]
        self.flask_rules = flask_app.url_map.bind("localhost")  # matched against, never used to build URLs
        self.authenticate = authenticate or _mlflow_users
        self.throttle = throttle or Throttle(path=os.environ.get("ATELIER_AUTH_THROTTLE_DB") or None)
        self._cache: dict[tuple[str, str], tuple[float, Caller | None]] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        native = self._native(scope)
        if native and path not in NATIVE_ROUTES and not path.startswith(NATIVE_PLATFORM_PREFIXES):
            await _respond(send, 403, f"{path} is switched off on Atelier's MLflow server (deny by default)")
            return
        if method in ("GET", "HEAD") and path.startswith(ANONYMOUS_PREFIXES):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("?", 0))[0]
        username, password = _basic_credentials(scope)
        wait = self.throttle.retry_after(username or "", address)
        if wait:
            await _respond(
                send,
                429,
                f"too many failed logins for {username or 'this address'}: try again in {wait} s",
                [(b"retry-after", str(wait).encode())],
            )
            return
        caller = await self._caller(username, password) if username is not None else None
        if caller is None:
            if username is not None:
                self.throttle.failed(username, address)
            await _respond(send, 401, "credentials required", [(b"www-authenticate", b'Basic realm="mlflow"')])
            return
        if caller.admin:
            await self.app(scope, receive, send)
            return
        if native or ("GET" if method == "HEAD" else method, self._flask_rule(method, path)) not in CUSTOMER_ROUTES:
            await _respond(send, 403, f"{method} {path} is not a read a customer may make (deny by default)")
            return
        await self.app(scope, receive, send)

    def _native(self, scope) -> bool:
        from starlette.routing import Match

        return any(route.matches(scope)[0] == Match.FULL for route in self.native)

    def _flask_rule(self, method: str, path: str) -> str | None:
        from werkzeug.exceptions import HTTPException

        try:
            rule, _ = self.flask_rules.match(path, method="GET" if method == "HEAD" else method, return_rule=True)
        except HTTPException:
            return None
        return rule.rule

    async def _caller(self, username: str, password: str) -> Caller | None:
        import anyio

        key = (username, hashlib.sha256(password.encode()).hexdigest())
        cached = self._cache.get(key)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        caller = await anyio.to_thread.run_sync(self.authenticate, username, password)
        if caller is not None:  # failures are never cached: each one counts against the throttle
            if len(self._cache) > 1000:
                self._cache.clear()
            self._cache[key] = (time.monotonic() + CREDENTIAL_TTL, caller)
        return caller


def _basic_credentials(scope) -> tuple[str | None, str]:
    for name, value in scope.get("headers", ()):
        if name == b"authorization" and value[:6].lower() == b"basic ":
            try:
                username, _, password = base64.b64decode(value[6:].strip(), validate=True).decode().partition(":")
            except ValueError:
                return None, ""
            return username, password
    return None, ""


def _mlflow_users(username: str, password: str) -> Caller | None:
    from mlflow.server.auth import store

    if not store.authenticate_user(username, password):
        return None
    from atelier.registry.auth_app import is_platform_user

    return Caller(username, bool(store.get_user(username).is_admin) or is_platform_user(username))


async def _respond(send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(
        {"error_code": {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED"}[status], "message": message}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})
