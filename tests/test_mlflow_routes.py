"""Every route Atelier's MLflow server exposes, asked as a customer, as nobody and as the platform.

The decided table is tests/mlflow_routes.txt. An MLflow upgrade that adds, removes or opens a route fails
here until someone decides about it: regenerate the table with
`python -m tests.mlflow_route_probe DIR --table > tests/mlflow_routes.txt`, read the diff, and change
registry/auth_policy.py if a customer should (not) reach it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from atelier.registry.auth_policy import CUSTOMER_ROUTES
from tests.mlflow_route_probe import snapshot

TABLE = Path(__file__).parent / "mlflow_routes.txt"


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    done = subprocess.run(
        [sys.executable, "-m", "tests.mlflow_route_probe", str(tmp_path_factory.mktemp("mlflow"))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])["routes"]


def test_a_customer_reaches_only_the_listed_reads(routes):
    reached = {route for route, result in routes.items() if result["customer"]}
    assert len(routes) > 400  # the whole server was enumerated, not an empty app
    assert reached <= {f"{method} {rule}" for method, rule in CUSTOMER_ROUTES}
    writes = [r for r in reached if not r.startswith("GET ") and not r.endswith(("/search", "/graphql", "get-latest-versions"))]
    assert writes == []
    assert any("registered-models/alias" in r for r in reached)  # and it can still load its model


def test_nobody_reaches_the_assistant_jobs_gateway_mcp_or_otlp(routes):
    for route, result in routes.items():
        if any(part in route for part in ("/assistant/", "/jobs", "/gateway/", "/mcp-servers", "/v1/traces")):
            assert not result["customer"] and not result["anonymous"] and not result.get("platform", False), route
    assert routes["PUT /ajax-api/3.0/mlflow/assistant/config"] == {"customer": False, "anonymous": False, "platform": False}
    anonymous = {route for route, result in routes.items() if result["anonymous"]}
    assert anonymous <= {
        "GET /health",
        "GET /static-files/<path:path>",
        "GET /api/3.0/mlflow/server-info",
        "GET /ajax-api/3.0/mlflow/server-info",
        "GET /favicon.ico",
    }


def test_the_route_table_is_the_decided_one(routes):
    have = snapshot(routes)
    want = TABLE.read_text()
    if have != want:
        import difflib

        diff = "".join(difflib.unified_diff(want.splitlines(True), have.splitlines(True), "decided", "served now"))
        pytest.fail(f"MLflow's routes or who reaches them changed; decide, then update {TABLE.name}:\n{diff[:6000]}")
