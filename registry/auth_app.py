"""The MLflow server app of Atelier's stack (`mlflow server --app-name atelier-auth`).

MLflow's basic-auth app decides who may read or change each experiment and registered model. On its
own it lets any authenticated user *create* experiments and registered models, and makes the creator
their manager: a customer could create `dreambooth-acme-new` (or the experiment `atelier-newco`)
before the platform does and so own a name that the platform later fills with another customer's
model. This app adds one rule in front of the resource checks: a user who is not an admin may only
read. Every experiment, run, registered model, version, alias and tag is created by the platform: the
operator (the admin) or the worker's own identity (not an admin: MANAGE on every experiment and model
through a role, no say over users), which then grants each customer READ on its own; nothing a
customer can write decides who owns what.

Reads are GET/HEAD/OPTIONS and the POST endpoints that only search (`.../search`, `/graphql`, whose
"mutations" are searches, `.../batch-get`). The basic-auth app's own checks still apply to them.
In front of both, registry/auth_policy.py allows a customer only an explicit list of read routes and
switches off MLflow's server-side features (assistant, jobs, gateway, MCP, OTLP) for everyone.
`python -m registry.auth_app` bootstraps the auth database and the admin user once, before the
server's workers start (they would otherwise race to migrate a new database).

Every request is authenticated, and MLflow checks the password with werkzeug's scrypt each time: about
0.1 s of CPU a request here, which made a registration (a few hundred requests) take most of a minute.
`remember_verified_passwords` keeps a password that verified, keyed by the user *and the stored hash*
(read fresh on every request, one indexed query): a password changed by any worker, a user deleted or
a hash rewritten in the database misses at once, so nothing is stale, unlike MLflow's own TTL cache.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections import OrderedDict

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_POST_SUFFIXES = ("/search", "/graphql", "/batch-get")


def is_read(method: str, path: str) -> bool:
    return method in READ_METHODS or (method == "POST" and path.rstrip("/").endswith(READ_POST_SUFFIXES))


PLATFORM_ROLE = "atelier-platform"
WORKER_USER_ENV = "ATELIER_AUTH_WORKER_USER"  # in the MLflow server's environment: the worker's user name
WORKER_PASSWORD_ENV = "ATELIER_AUTH_WORKER_PASSWORD"  # (bootstrap only)


def is_platform_user(username: str) -> bool:
    """The worker's identity writes like the admin does, within its role's rights (see ensure_worker_user)."""
    worker = os.environ.get(WORKER_USER_ENV)
    return bool(worker) and username == worker


def _only_admins_write():
    from flask import request
    from mlflow.server import auth

    if is_read(request.method, request.path) or auth.is_unprotected_route(request.path):
        return None
    authorization = auth.authenticate_request()
    if not isinstance(authorization, auth.Authorization):
        return authorization  # the 401 asking for credentials
    username = authorization.username or ""
    if auth.store.get_user(username).is_admin or is_platform_user(username):
        return None
    return auth.make_forbidden_response()


def remember_verified_passwords(store, size: int = 4096) -> None:
    """Put a cache of verified (user, stored hash, password) in front of `store.authenticate_user`.
    Passwords are kept only as an HMAC under a key that lives in this process's memory."""
    from mlflow.exceptions import MlflowException
    from werkzeug.security import check_password_hash

    key = secrets.token_bytes(32)
    verified: OrderedDict[tuple[str, str, bytes], None] = OrderedDict()
    lock = threading.Lock()

    def authenticate_user(username: str, password: str, *, use_primary: bool = False) -> bool:  # noqa: ARG001 (MLflow's signature)
        try:
            stored = store.get_user(username).password_hash
        except MlflowException:
            return False
        entry = (username, stored, hmac.new(key, password.encode("utf-8", "surrogatepass"), hashlib.sha256).digest())
        with lock:
            if entry in verified:
                verified.move_to_end(entry)
                return True
        if not check_password_hash(stored, password):
            return False
        with lock:
            verified[entry] = None
            while len(verified) > size:
                verified.popitem(last=False)
        return True

    store.authenticate_user = authenticate_user


def create_app():
    """MLflow's basic-auth app with customers read-only (the `mlflow.app` entry point `atelier-auth`),
    behind registry/auth_policy.py's deny-by-default layer when served as ASGI (uvicorn, the default)."""
    from mlflow.server import app, auth
    from mlflow.server.auth import create_app as basic_auth_app

    served = basic_auth_app(app)  # registers its authentication and per-resource checks first
    remember_verified_passwords(auth.store)
    app.before_request(_only_admins_write)
    if served is app:  # gunicorn or waitress: Flask alone, no native routes to guard
        return served
    from atelier.registry.auth_policy import DenyByDefault

    return DenyByDefault(served, app)


def bootstrap() -> None:
    from mlflow.server.auth import bootstrap_admin_user, store

    bootstrap_admin_user()
    worker, password = os.environ.get(WORKER_USER_ENV), os.environ.get(WORKER_PASSWORD_ENV)
    if worker and password:
        ensure_worker_user(store, worker, password)


def ensure_worker_user(store, username: str, password: str) -> None:
    """The identity flows run under on a worker: not an admin, so it cannot create users, change anyone's
    password or make an admin, but MANAGE on every experiment and registered model through a role in
    MLflow's default workspace, which is what registering, promoting and granting a customer READ need.
    Idempotent: `atelier up` runs it on every start (and so rotates nothing by accident: the password
    comes from the stack's secrets)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME

    if store.has_user(username, use_primary=True):
        store.update_user(username, password=password, is_admin=False)
    else:
        store.create_user(username, password, is_admin=False)
    try:
        role = store.get_role_by_name(DEFAULT_WORKSPACE_NAME, PLATFORM_ROLE)
    except MlflowException:
        role = store.create_role(PLATFORM_ROLE, DEFAULT_WORKSPACE_NAME, "Atelier's worker: manages every experiment and model")
    granted = {(p.resource_type, p.resource_pattern) for p in store.list_role_permissions(role.id)}
    for resource_type in ("experiment", "registered_model"):
        if (resource_type, "*") not in granted:
            store.add_role_permission(role.id, resource_type, "*", "MANAGE")
    user = store.get_user(username)
    if role.id not in {r.id for r in store.list_user_roles(user.id)}:
        store.assign_role_to_user(user.id, role.id)


if __name__ == "__main__":
    bootstrap()
