"""Run as a program (a fresh interpreter: MLflow's server app is built at import): builds Atelier's
MLflow server app on SQLite in DIR, lists every route it exposes, and asks each one as a customer, as
nobody and (for MLflow's native FastAPI routes) as the platform. Prints JSON:
{"routes": {"METHOD rule": {"customer": reached, "anonymous": reached, "platform": reached}}}.
"Reached" means the request got past Atelier's policy layer (the route's handler or MLflow's own checks
answered). Used by tests/test_mlflow_routes.py."""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path


def main(folder: str) -> None:
    root = Path(folder)
    (root / "auth.ini").write_text(
        f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
        "admin_username = atelier-ops\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
    )
    os.environ.update(
        {
            "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": "platform-pw-123456",
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32,
            "_MLFLOW_SGI_NAME": "uvicorn",
            "MLFLOW_BASIC_AUTH_FAIL_CLOSED": "true",
            "_MLFLOW_SERVER_FILE_STORE": f"sqlite:///{root / 'mlflow.db'}",
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}",
            "_MLFLOW_SERVER_ARTIFACT_ROOT": str(root / "artifacts"),
            "_MLFLOW_SERVER_SERVE_ARTIFACTS": "false",
        }
    )
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient
    from starlette.routing import Mount

    from atelier.registry.auth_app import create_app

    app = create_app()
    from mlflow.server import app as flask_app
    from mlflow.server.auth import store

    store.create_user("acme", "acme-pw-123456")
    routes: set[tuple[str, str]] = set()
    for rule in flask_app.url_map.iter_rules():
        routes |= {(m, rule.rule) for m in rule.methods - {"HEAD", "OPTIONS"}}
    native: set[tuple[str, str]] = set()

    def walk(items, prefix: str = "") -> None:
        for route in items:
            if isinstance(route, Mount):
                continue
            if hasattr(route, "path"):
                native.update((m, prefix + route.path) for m in (getattr(route, "methods", None) or {"GET"}) - {"HEAD", "OPTIONS"})
            else:  # FastAPI's included router
                inner = getattr(route, "router", None) or getattr(route, "original_router", None)
                context = getattr(route, "include_context", None)
                walk(
                    inner.routes if inner is not None else [],
                    prefix + (getattr(context, "prefix", "") or getattr(route, "prefix", "") or ""),
                )

    walk(app.app.routes)
    client = TestClient(app, raise_server_exceptions=False)
    out = {}
    for method, rule in sorted(routes | native):
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>|\{([^}:]+)(?::[^}]+)?\}", lambda m: "x1", rule) or "/"
        results = {}
        for who, auth in (
            ("customer", ("acme", "acme-pw-123456")),
            ("anonymous", None),
            ("platform", ("atelier-ops", "platform-pw-123456")),
        ):
            if who == "platform" and (method, rule) not in native:
                continue  # the platform's Flask calls are the server's own business; only the switched-off features are asked
            resp = client.request(method, path, auth=auth, json={} if method in ("POST", "PUT", "PATCH") else None)
            ours = resp.status_code in (401, 403, 429) and ("deny by default" in resp.text or "credentials required" in resp.text)
            results[who] = not ours
        out[f"{method} {rule}"] = results
    return out


def snapshot(routes: dict[str, dict[str, bool]]) -> str:
    """One line per route: who gets past the policy layer (customer, anonymous; platform or off for the
    native FastAPI routes). tests/mlflow_routes.txt holds the decided table."""

    def who(result: dict[str, bool]) -> str:
        reached = [w for w in ("anonymous", "customer") if result.get(w)]
        if "platform" in result:
            reached.append("platform" if result["platform"] else "off")
        return ",".join(reached) or "platform"

    return "".join(f"{route}  {who(result)}\n" for route, result in sorted(routes.items()))


if __name__ == "__main__":
    found = main(sys.argv[1])
    print(snapshot(found), end="") if "--table" in sys.argv else print(json.dumps({"routes": found}))
