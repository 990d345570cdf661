"""A cron schedule fires on the embedded default: `atelier deploy` a schedule due within the minute, `atelier
worker` serves it, and the workspace's own Prefect server (its scheduler service) starts the run. Before
SQLAlchemy was pinned to 2.0, prefect 3.8.8's scheduler failed on every loop and no schedule ever fired."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(700)]


def _cli(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "atelier.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_a_cron_schedule_starts_and_finishes_a_run_within_its_minute(tmp_path):
    # a fresh user's shell: none of the settings that earlier tests of the session exported (MLflow's URI among them)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ATELIER_", "MLFLOW_", "AWS_"))}
    env.update({"ATELIER_WORKSPACE": str(tmp_path / "ws"), "PREFECT_RUNNER_POLL_FREQUENCY": "2"})
    assert _cli(env, "init").returncode == 0
    (tmp_path / "ws" / "schedules.yaml").write_text('audit: {cron: "* * * * *"}\n')
    try:
        deployed = _cli(env, "deploy")
        assert deployed.returncode == 0 and "ledger-audit" in deployed.stdout, deployed.stderr[-2000:]
        worker = subprocess.Popen(
            [sys.executable, "-m", "atelier.cli", "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline, finished = time.monotonic() + 300, None  # the scheduler's loop is 60 s; a loaded CI machine is slow
            while time.monotonic() < deadline and finished is None:
                time.sleep(5)
                shown = _cli(env, "runs", "--json", "--flow", "ledger-audit")
                rows = json.loads(shown.stdout) if shown.returncode == 0 and shown.stdout.strip().startswith("[") else []
                finished = next((r for r in rows if r["deployment"] == "ledger-audit" and r["state"] == "Completed"), None)
            assert finished is not None, f"no scheduled run completed in 300 s: {rows}"
            triggered = _cli(env, "run", "ledger-audit")  # now, outside the schedule
            assert triggered.returncode == 0 and "starts now" in triggered.stdout, triggered.stderr[-2000:]
            unknown = _cli(env, "run", "no-such-deployment")
            assert unknown.returncode == 2 and "ledger-audit" in unknown.stderr  # names the ones there are
        finally:
            os.killpg(worker.pid, signal.SIGINT)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:  # it waits for a flow run in progress (one starts every minute)
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        # stopping the worker did not pause the schedule: the next runs are still scheduled
        from_server = _cli(env, "runs", "--json", "--flow", "ledger-audit")
        assert any(r["state"] == "Scheduled" for r in json.loads(from_server.stdout)), from_server.stdout[-2000:]
    finally:
        _cli(env, "down")
