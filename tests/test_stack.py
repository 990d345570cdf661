"""The production topology on this machine (`atelier up`): Prefect server and MLflow server on the real
PostgreSQL at 127.0.0.1:5432, SeaweedFS's S3, a process worker, every one of them behind credentials.
The stack is tests/stack_harness.py's, one per session; the tests run in file order on it, each
building on what the one before registered."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.stack_harness import ATELIER, BUCKET, PREFECT

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def test_up_starts_on_postgres_and_s3_and_is_idempotent(stack):
    again = stack.run(ATELIER, "status")
    assert again.stdout.count("running") == 4
    dbs = {r[0] for r in stack.sql("prefect", "SELECT datname FROM pg_database")}
    assert {f"{stack.prefix}_{p}" for p in ("prefect", "mlflow", "ledger")} <= dbs
    # the DVC remote moved to S3 at `atelier init`: the photos were pushed there by `subject add`
    assert sum(k.endswith(".dir") for k in stack.keys("dvc/")) >= 1 and len(stack.keys("dvc/")) >= 6
    rerun = stack.run(ATELIER, "up")
    assert "starting" not in rerun.stdout  # everything already ran


def test_finetune_by_a_worker_lands_in_s3_and_postgres_and_loads_in_a_fresh_process(stack):
    # the ledger audit every minute: the next test checks that the schedule fired while this one trained
    (stack.ws / "schedules.yaml").write_text(
        'retrain:\n  - {customer: acme, subject: robot, cron: "0 3 * * *", paused: true}\naudit: {cron: "* * * * *"}\n'
    )
    deployed = stack.run(ATELIER, "deploy")
    assert "work pool 'atelier'" in deployed.stdout
    # the worker that `atelier up` started picks the run up from the pool and runs it in its own process
    stack.run(
        PREFECT,
        "deployment",
        "run",
        "subject-finetune/retrain-acme-robot",
        "--watch",
        "--watch-timeout",
        "600",
        extra={
            "PREFECT_API_URL": stack.env["ATELIER_PREFECT_API_URL"],
            "PREFECT_API_AUTH_STRING": stack.env["ATELIER_PREFECT_API_AUTH_STRING"],
        },
    )
    rows = stack.sql(
        "prefect",
        "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id "
        "JOIN deployment d ON d.id = r.deployment_id WHERE d.name = %s",
        "retrain-acme-robot",
    )
    assert rows == [("subject-finetune", "COMPLETED")]
    # the registry is in PostgreSQL; the model's files are in S3; Prefect's task results too
    assert stack.sql("mlflow", "SELECT version FROM model_versions WHERE name = %s", "dreambooth-acme-robot") == [(1,)]
    assert any(k.endswith("MLmodel") for k in stack.keys("mlflow/acme/"))
    assert stack.keys("prefect-results/")
    mv = stack.mlflow().get_model_version_by_alias("dreambooth-acme-robot", "champion")
    assert mv.tags["atelier.customer"] == "acme" and mv.tags["atelier.training.key"]
    # a fresh process that knows only the tracking server and S3 pulls the champion through S3
    code = (
        "import mlflow.pyfunc, pandas as pd; m = mlflow.pyfunc.load_model('models:/dreambooth-acme-robot@champion');"
        "print('ROWS', len(m.predict(pd.DataFrame({'prompt': ['a sks toy'], 'seed': [1]}))))"
    )
    env = {k: v for k, v in stack.env.items() if not k.startswith("ATELIER_")}
    env.update(
        {
            "MLFLOW_TRACKING_URI": stack.env["ATELIER_TRACKING_URI"],
            "MLFLOW_S3_ENDPOINT_URL": stack.env["ATELIER_S3_ENDPOINT_URL"],
            "MLFLOW_TRACKING_USERNAME": stack.env["ATELIER_TRACKING_USERNAME"],
            "MLFLOW_TRACKING_PASSWORD": stack.env["ATELIER_TRACKING_PASSWORD"],
        }
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ROWS 1" in done.stdout
    assert stack.mlflow().get_experiment_by_name("atelier-acme").artifact_location.startswith(f"s3://{BUCKET}/mlflow/acme")


def test_a_cron_schedule_fires_on_the_stack(stack):
    """The stack's Prefect server schedules the audit deployed a test ago, and the stack's worker runs it."""
    query = (
        "SELECT r.state_type, r.auto_scheduled FROM flow_run r JOIN deployment d ON d.id = r.deployment_id "
        "WHERE d.name = %s AND r.state_type = 'COMPLETED'"
    )
    deadline, done = time.monotonic() + 180, []
    while time.monotonic() < deadline and not done:
        done = stack.sql("prefect", query, "ledger-audit")
        time.sleep(0 if done else 5)
    assert done and done[0][1] is True, "no scheduled ledger-audit run completed on the stack"
    (stack.ws / "schedules.yaml").write_text('audit: {cron: "* * * * *", paused: true}\n')  # quiet for the tests after this
    stack.run(ATELIER, "deploy")


def test_batch_generation_reads_and_writes_s3(stack):
    lines = "".join(json.dumps({"id": f"item-{i}", "prompt": f"a sks toy number {i}", "steps": 4}) + "\n" for i in range(3))
    stack.s3().put_object(Bucket=BUCKET, Key="in/prompts.jsonl", Body=lines.encode())
    done = stack.run(
        ATELIER, "batch-generate", "acme", "robot", "--manifest", f"s3://{BUCKET}/in/prompts.jsonl", "--out", f"s3://{BUCKET}/out/nightly"
    )
    assert "3 new" in done.stdout
    keys = stack.keys("out/nightly/")
    assert {f"out/nightly/images/item-{i}.png" for i in range(3)} <= set(keys)
    records = [
        json.loads(x) for x in stack.s3().get_object(Bucket=BUCKET, Key="out/nightly/manifest.jsonl")["Body"].read().decode().splitlines()
    ]
    assert {r["model"] for r in records} == {"dreambooth-acme-robot/1"}


def _registrations(stack) -> int:
    """How many registrations have begun: each sets the lineage hash on its run first."""
    return stack.sql("mlflow", "SELECT count(*) FROM tags WHERE key = 'atelier.lineage.sha256'")[0][0]


def _wait_for_registration(stack, before: int, proc: subprocess.Popen, timeout: float = 400) -> None:
    """Until one more run than `before` carries its lineage (the registration has begun; the run itself
    was opened when training started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _registrations(stack) > before:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the flow ended before registering:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("no registration began")


def _start_finetune(stack, subject: str, **extra: str) -> subprocess.Popen:
    # MLflow's own HTTP retries off: the task's retries are what is under test
    env = {**stack.env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20", **extra}
    return subprocess.Popen(
        [ATELIER, "finetune", "acme", subject], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=stack.ws.parent
    )


def _versions(stack, name: str) -> list[int]:
    return [r[0] for r in stack.sql("mlflow", "SELECT version FROM model_versions WHERE name = %s ORDER BY version", name)]


def test_mlflow_killed_mid_registration_and_left_down_fails_clearly_and_registers_nothing(stack):
    before = _registrations(stack)
    proc = _start_finetune(stack, "robot2", ATELIER_OUTAGE_BUDGET="8")  # the server stays down: give up after 8 s, not 120
    _wait_for_registration(stack, before, proc)
    stack.kill("mlflow")
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 6, err[-3000:]
    assert f"MLflow tracking server at {stack.env['ATELIER_TRACKING_URI']}: did not answer" in err
    assert "nothing was half-registered" in err
    assert _versions(stack, "dreambooth-acme-robot2") == []  # read from PostgreSQL: the server is still down
    stuck = stack.sql("mlflow", "SELECT run_uuid FROM runs WHERE status = 'RUNNING'")
    assert len(stuck) == 1  # the dead attempt's run: the next attempt closes it

    stack.run(ATELIER, "up")  # brings back only what is down
    assert "mlflow   running" in stack.run(ATELIER, "status").stdout
    stack.run(ATELIER, "finetune", "acme", "robot2")
    assert _versions(stack, "dreambooth-acme-robot2") == [1]
    stale = stack.mlflow().get_run(stuck[0][0])
    assert stale.info.status == "FAILED" and "atelier.abandoned" in stale.data.tags


def test_mlflow_killed_mid_registration_and_restarted_the_task_retries_and_the_run_finishes(stack):
    client = stack.mlflow()
    experiment = client.get_experiment_by_name("atelier-acme").experiment_id
    # robot's photos are robot3's, so robot's training key is robot3's: a registration of robot in
    # progress under that key must survive robot3's sweep of its own dead attempt
    key = client.get_model_version("dreambooth-acme-robot", "1").tags["atelier.training.key"]
    other = client.create_run(experiment, tags={"atelier.subject": "robot", "atelier.training.key": key}).info.run_id
    before = _registrations(stack)
    proc = _start_finetune(stack, "robot3")
    _wait_for_registration(stack, before, proc)
    stack.kill("mlflow")
    stack.run(ATELIER, "up")  # a supervisor's restart
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert "Retry" in err or "Retry" in out  # Prefect logs the task's retry
    assert _versions(stack, "dreambooth-acme-robot3") == [1]  # once, not once per attempt
    mv = client.get_model_version("dreambooth-acme-robot3", "1")
    assert mv.tags["atelier.training.key"] == key and "champion" in mv.aliases
    runs = client.search_runs([experiment], f"tags.`atelier.subject` = 'robot3' and tags.`atelier.training.key` = '{key}'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    assert client.get_run(other).info.status == "RUNNING"
