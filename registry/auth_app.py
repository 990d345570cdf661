"""The MLflow server app of Atelier's stack (`mlflow server --app-name atelier-auth`).

MLflow's basic-auth app decides who may read or change each experiment and registered model. On its
own it lets any authenticated user *create* experiments and registered models, and makes the creator
their manager: a customer could create `dreambooth-acme-new` (or the experiment `atelier-newco`)
before the platform does and so own a name that the platform later fills with another customer's
model. This app adds one rule in front of the resource checks: a user who is not an admin may only
read. Every experiment, run, registered model, version, alias and tag is created by the platform's
service identity (the admin), which then grants each customer READ on its own; nothing a customer
can write decides who owns what.

Reads are GET/HEAD/OPTIONS and the POST endpoints that only search (`.../search`, `/graphql`, whose
"mutations" are searches, `.../batch-get`). The basic-auth app's own checks still apply to them.
In front of both, registry/auth_policy.py allows a customer only an explicit list of read routes and
switches off MLflow's server-side features (assistant, jobs, gateway, MCP, OTLP) for everyone.
`python -m registry.auth_app` bootstraps the auth database and the admin user once, before the
server's workers start (they would otherwise race to migrate a new database).
"""

from __future__ import annotations

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_POST_SUFFIXES = ("/search", "/graphql", "/batch-get")


def is_read(method: str, path: str) -> bool:
    return method in READ_METHODS or (method == "POST" and path.rstrip("/").endswith(READ_POST_SUFFIXES))


def _only_admins_write():
    from flask import request

    from mlflow.server import auth

    if is_read(request.method, request.path) or auth.is_unprotected_route(request.path):
        return None
    authorization = auth.authenticate_request()
    if not isinstance(authorization, auth.Authorization):
        return authorization  # the 401 asking for credentials
    if auth.store.get_user(authorization.username).is_admin:
        return None
    return auth.make_forbidden_response()


def create_app():
    """MLflow's basic-auth app with customers read-only (the `mlflow.app` entry point `atelier-auth`),
    behind registry/auth_policy.py's deny-by-default layer when served as ASGI (uvicorn, the default)."""
    from mlflow.server import app
    from mlflow.server.auth import create_app as basic_auth_app

    served = basic_auth_app(app)  # registers its authentication and per-resource checks first
    app.before_request(_only_admins_write)
    if served is app:  # gunicorn or waitress: Flask alone, no native routes to guard
        return served
    from registry.auth_policy import DenyByDefault

    return DenyByDefault(served, app)


def bootstrap() -> None:
    from mlflow.server.auth import bootstrap_admin_user

    bootstrap_admin_user()


if __name__ == "__main__":
    bootstrap()
