"""The embedded default's background servers: one Prefect server per workspace (flow commands start
working in about a second instead of starting a temporary server), the MLflow UI, both asking for
credentials, both stopped by `atelier down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

pytestmark = pytest.mark.slow


def _status(url: str, auth: str | None = None, post: bool = False) -> int:
    request = urllib.request.Request(url, data=b"{}" if post else None, headers={"Content-Type": "application/json"})
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 (localhost)
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _cwd_in(proc: psutil.Process, folder) -> bool:
    try:
        return proc.cwd().startswith(str(folder))
    except psutil.Error:
        return False


def test_background_servers_start_once_ask_for_credentials_and_stop(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ATELIER_PREFECT_SERVER" and not k.startswith("PREFECT_")}
    env["ATELIER_WORKSPACE"] = str(tmp_path / "ws")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "atelier.cli", *args], env=env, capture_output=True, text=True, timeout=300)

    assert cli("init").returncode == 0
    local = tmp_path / "ws" / ".atelier" / "local"
    try:
        # two commands at once on a cold workspace share one server: one starts it, the other waits
        t0 = time.perf_counter()
        both = [
            subprocess.Popen([sys.executable, "-m", "atelier.cli", "runs"], env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)
        ]
        errs = [p.communicate(timeout=300)[1] for p in both]
        cold = time.perf_counter() - t0
        assert [p.returncode for p in both] == [0, 0], errs
        assert sum("starting the workspace's prefect server" in e for e in errs) == 1, errs
        servers = [p for p in psutil.process_iter(["cmdline"]) if "server" in (p.info["cmdline"] or []) and _cwd_in(p, local)]
        assert len(servers) == 1, [p.info["cmdline"] for p in servers]
        t0 = time.perf_counter()
        second = cli("runs")
        warm = time.perf_counter() - t0
        assert second.returncode == 0 and "starting" not in second.stderr, second.stderr
        assert warm < cold and warm < 8, (cold, warm)
        shown = cli("ui")
        assert shown.returncode == 0, shown.stderr
        prefect, mlflow = (json.loads((local / f"{n}.json").read_text()) for n in ("prefect", "mlflow"))
        assert prefect["url"] in shown.stdout and mlflow["url"] in shown.stdout
        secrets = json.loads((local / "secrets.json").read_text())
        assert oct((local / "secrets.json").stat().st_mode & 0o777) == "0o600"
        assert secrets["prefect_auth_string"] not in shown.stdout + shown.stderr and secrets["mlflow_admin_password"] not in shown.stdout
        assert all(secrets["prefect_auth_string"] not in " ".join(psutil.Process(r["pid"]).cmdline()) for r in (prefect, mlflow))
        assert _status(f"{prefect['url']}/api/flows/filter", post=True) == 401  # no credentials, no API
        assert _status(f"{prefect['url']}/api/flows/filter", secrets["prefect_auth_string"], post=True) == 200
        assert _status(f"{mlflow['url']}/api/2.0/mlflow/experiments/search?max_results=1") == 401
        assert (
            _status(f"{mlflow['url']}/api/2.0/mlflow/experiments/search?max_results=1", f"atelier-ops:{secrets['mlflow_admin_password']}")
            == 200
        )
    finally:
        stopped = cli("down")
    assert "prefect server" in stopped.stdout and "mlflow server" in stopped.stdout, stopped.stdout + stopped.stderr
    for record in (prefect, mlflow):
        assert not psutil.pid_exists(record["pid"]) or psutil.Process(record["pid"]).status() == psutil.STATUS_ZOMBIE
