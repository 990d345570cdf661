"""`atelier up`'s process handling on its own (fast): what it refuses, what it never signals."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atelier.cli import stack_processes as stack
from atelier.kernel.errors import ConfigError, ServiceUnavailable
from atelier.kernel.settings import load_settings


def _settings(tmp_path, **stack_values):
    s = load_settings(workspace=tmp_path / "ws", stack=stack_values)
    stack.stack_dir(s).mkdir(parents=True)
    return s


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_port_taken_by_another_program_is_refused_with_the_setting_to_change(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        s = _settings(tmp_path, s3_port=port)
        try:
            with pytest.raises(ConfigError, match=rf"port {port} \(s3\).*ATELIER_STACK__S3_PORT"):
                stack.up(s, ("s3",))
        finally:
            if str(stack.server_home(s)).startswith("/var/lib/atelier/stacks/"):  # run as root: the service user's folder
                shutil.rmtree(stack.server_home(s), ignore_errors=True)
    assert not (stack.stack_dir(s) / "s3.json").exists()


def test_unreachable_postgres_names_the_server_and_the_fix(tmp_path):
    s = _settings(tmp_path, postgres_url=f"postgresql://postgres@127.0.0.1:{_free_port()}")
    with pytest.raises(ServiceUnavailable, match="PostgreSQL at 127.0.0.1.*ATELIER_STACK__POSTGRES_URL") as err:
        stack.ensure_databases(s)
    assert err.value.transient


def test_a_server_that_exits_at_once_is_reported_with_its_log(tmp_path):
    s = _settings(tmp_path)
    svc = stack.Service(
        "mlflow", [sys.executable, "-c", "print('no such database'); raise SystemExit(3)"], "http://x", "http://127.0.0.1:1/", None
    )
    with pytest.raises(ServiceUnavailable, match=r"exited with code 3:\nno such database"):
        stack.start_service(s, svc)
    assert stack.status(s)[2].running is False


def test_down_stops_the_whole_process_group_and_never_a_recycled_pid(tmp_path):
    s = _settings(tmp_path)
    # a "server" that starts a child, as mlflow's server starts its workers
    code = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    record = stack.start_service(s, stack.Service("worker", [sys.executable, "-c", code], "pool", None, None))
    import psutil

    children = psutil.Process(record["pid"]).children()
    assert [c.name() for c in children] == ["sleep"]
    assert [x.name for x in stack.status(s) if x.running] == ["worker"]
    assert stack.down(s) == ["worker"]
    time.sleep(0.2)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    # a record whose pid now belongs to another process (here: this test) is stale, not a target
    (stack.stack_dir(s) / "prefect.json").write_text(json.dumps({"pid": os.getpid(), "create_time": 1.0, "log": ""}))
    assert [x.running for x in stack.status(s) if x.name == "prefect"] == [False]
    assert stack.down(s) == []  # and we are still here


def test_env_file_holds_the_clients_settings_and_only_its_owner_reads_it(tmp_path):
    s = _settings(tmp_path, mlflow_port=5999, bucket="team-bucket")
    path = stack.write_env_file(s)
    values = stack.read_env_file(path)
    assert values["ATELIER_TRACKING_URI"] == "http://127.0.0.1:5999"
    assert values["ATELIER_DVC_REMOTE"] == "s3://team-bucket/dvc"
    assert values["ATELIER_LEDGER_URL"].startswith("postgresql+psycopg2://postgres@127.0.0.1:5432/atelier_ledger")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # the platform's credentials: generated once, kept 0600, the same on the next `up`
    secrets_path = stack.secrets_file(s)
    assert oct(secrets_path.stat().st_mode & 0o777) == "0o600"
    assert values["ATELIER_TRACKING_USERNAME"] == stack.MLFLOW_ADMIN and len(values["ATELIER_TRACKING_PASSWORD"]) >= 24
    assert values["ATELIER_PREFECT_API_AUTH_STRING"].startswith("atelier:") and values["AWS_SECRET_ACCESS_KEY"] != "atelier-dev-secret"
    assert stack.read_env_file(stack.write_env_file(s)) == values
    # no secret in any server's argv: the database URL and passwords go through 0600 files and the environment
    for svc in stack.services(s):
        argv = " ".join(svc.argv)
        assert not any(secret in argv for secret in stack.stack_secrets(s).values()), svc.name
        assert "postgresql" not in argv, svc.name
    loaded = load_settings(**{k[len("ATELIER_") :].lower(): v for k, v in values.items() if k.startswith("ATELIER_")})
    assert loaded.artifact_root_for("acme") == "s3://team-bucket/mlflow/acme"


def test_databases_are_created_once_and_dropped_on_request(tmp_path):
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", 5432)) != 0:
            pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    s = _settings(tmp_path, database_prefix=f"atelier_unit_{os.getpid()}")
    names = sorted(stack.database_names(s).values())
    try:
        assert sorted(stack.ensure_databases(s)) == names
        assert stack.ensure_databases(s) == []  # already there
    finally:
        assert sorted(stack.drop_databases(s)) == names
    assert stack.drop_databases(s) == []


def test_customer_readers_for_an_s3_server_in_another_container_go_to_the_readers_file(tmp_path, monkeypatch):
    """compose's cli container writes the readers file; its s3 container watches it (cli/s3_server.py)."""
    monkeypatch.setattr(stack, "S3_RELOAD_SECONDS", 0)
    readers = tmp_path / "readers" / "customers.json"
    readers.parent.mkdir()
    s = _settings(tmp_path, s3_readers_file=str(readers))
    assert stack.grant_s3_reader(s, "reader-acme", "mlflow/acme", "AKacme", "secret-1")
    assert stack.grant_s3_reader(s, "reader-globex", "mlflow/globex", "AKglobex", "secret-2")
    assert stack.grant_s3_reader(s, "reader-acme", "mlflow/acme", "AKacme2", "secret-3")  # a new key replaces the old
    assert oct(readers.stat().st_mode & 0o777) == "0o600"
    identities = {i["name"]: i for i in json.loads(readers.read_text())["identities"]}
    assert set(identities) == {"reader-acme", "reader-globex"}
    assert identities["reader-acme"]["credentials"] == [{"accessKey": "AKacme2", "secretKey": "secret-3"}]
    assert identities["reader-globex"]["actions"] == ["Read:atelier/mlflow/globex/*", "List:atelier/mlflow/globex/*"]
    assert not stack.s3_identities_file(s).exists()  # nothing of `atelier up`'s own server was touched
    readers.write_text("{not json")
    with pytest.raises(ConfigError, match="readers file"):
        stack.grant_s3_reader(s, "reader-x", "mlflow/x", "AKx", "x")


def test_s3_server_refuses_to_start_without_its_keys_naming_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ATELIER_"))}
    env["ATELIER_WORKSPACE"] = str(tmp_path / "state")
    done = subprocess.run([str(Path(sys.executable).parent / "atelier"), "s3-server"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "AWS_SECRET_ACCESS_KEY" in done.stderr and "ATELIER_S3_JWT_WRITE" in done.stderr and "Traceback" not in done.stderr
