"""The pieces of the secure stack that need no server: which service an error names, which stored
task results load, what counts as a read for the MLflow auth app, and what `atelier info` shows."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from atelier.kernel.errors import ServiceUnavailable
from atelier.kernel.outages import classify, preflight
from atelier.kernel.settings import load_settings, mask_url


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again on return: nothing listens there


def _raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        try:
            raise cause if cause is not None else exc
        except BaseException as inner:
            if cause is None:
                raise
            raise exc from inner
    except BaseException as outer:
        return outer


def test_s3_outage_wrapped_by_a_library_names_s3_and_its_endpoint(tmp_path):
    from botocore.exceptions import EndpointConnectionError

    settings = load_settings(workspace=tmp_path, s3_endpoint_url="http://127.0.0.1:9")
    wrapped = _raised(RuntimeError("upload of model failed"), EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k"))
    outage = classify(wrapped, settings)
    assert isinstance(outage, ServiceUnavailable) and outage.exit_code == 6
    assert outage.item == "S3 at http://127.0.0.1:9"


def test_ledger_database_down_names_postgresql(tmp_path):
    import sqlalchemy

    port = _dead_port()
    settings = load_settings(workspace=tmp_path, ledger_url=f"postgresql+psycopg2://postgres@127.0.0.1:{port}/ledger")
    engine = sqlalchemy.create_engine(settings.ledger_url, connect_args={"connect_timeout": 2})
    with pytest.raises(sqlalchemy.exc.OperationalError) as err:
        engine.connect()
    outage = classify(err.value, settings)
    assert outage is not None and outage.item == f"PostgreSQL at 127.0.0.1:{port}"


def test_a_server_answering_500_because_its_database_is_down_names_postgresql(tmp_path):
    import httpx

    port = _dead_port()
    settings = load_settings(
        workspace=tmp_path,
        prefect_api_url="http://127.0.0.1:4200/api",
        ledger_url=f"postgresql+psycopg2://postgres@127.0.0.1:{port}/ledger",
    )
    request = httpx.Request("POST", "http://127.0.0.1:4200/api/flow_runs/x/set_state")
    error = httpx.HTTPStatusError(
        "Server error '500 Internal Server Error'", request=request, response=httpx.Response(500, request=request)
    )
    outage = classify(error, settings)
    assert outage is not None and outage.item == f"PostgreSQL at 127.0.0.1:{port}" and "Prefect server" in outage.problem


def test_prefect_unreachable_and_bad_input_are_told_apart(tmp_path):
    import httpx

    from atelier.kernel.errors import ConfigError

    settings = load_settings(workspace=tmp_path, prefect_api_url="http://127.0.0.1:4200/api")
    outage = classify(httpx.ConnectError("All connection attempts failed"), settings)
    assert outage is not None and outage.item == "Prefect server at http://127.0.0.1:4200/api"
    assert classify(ConfigError("x", "y", "z"), settings) is None  # bad input stays exit 2
    assert classify(ValueError("a bug, not an outage"), settings) is None


def test_a_temporary_prefect_server_that_does_not_come_up_is_an_outage_with_exit_6(tmp_path, monkeypatch):
    """Prefect waits 20 s for the server it starts per command, which a busy machine's start can exceed
    (CI, building images beside the suite, once hit it): Atelier gives it the stack's start timeout, and
    a server that still does not answer is exit 6 naming the fix, never "a bug in Atelier"."""
    import subprocess
    import sys

    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    env = load_settings(workspace=tmp_path).prefect_environment()
    assert env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "180"
    monkeypatch.setenv("ATELIER_STACK__START_TIMEOUT", "600.5")
    assert load_settings(workspace=tmp_path).prefect_environment()["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "601"
    served = load_settings(workspace=tmp_path, prefect_api_url="http://127.0.0.1:4200/api").prefect_environment()
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in served  # a server of its own: nothing to start
    # no time at all to start: the command's own temporary server cannot answer
    ws = tmp_path / "ws"
    run_env = {
        **os.environ,
        "ATELIER_WORKSPACE": str(ws),
        "ATELIER_PREFECT_SERVER": "temporary",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0",
    }
    assert subprocess.run([sys.executable, "-m", "atelier.cli", "init"], env=run_env, capture_output=True).returncode == 0
    done = subprocess.run([sys.executable, "-m", "atelier.cli", "runs"], env=run_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 6, done.stderr
    assert "Prefect's temporary server for this command: did not answer within 0 s" in done.stderr
    assert "ATELIER_STACK__START_TIMEOUT" in done.stderr and "Traceback" not in done.stderr and "a bug" not in done.stderr


def test_preflight_names_the_first_server_that_is_down_and_passes_the_embedded_default(tmp_path):
    preflight(load_settings(workspace=tmp_path))  # nothing configured: nothing to check
    port = _dead_port()
    with pytest.raises(ServiceUnavailable, match=f"MLflow tracking server at http://ops:\\*\\*\\*@127.0.0.1:{port}"):
        preflight(load_settings(workspace=tmp_path, tracking_uri=f"http://ops:pw@127.0.0.1:{port}"))


def test_only_allowlisted_result_types_and_the_json_serializer_load():
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import JSONSerializer, PickleSerializer

    from atelier.tasks.results import AtelierJSONSerializer, UnsafeResult

    ours = ResultRecord(metadata=ResultRecordMetadata(serializer=AtelierJSONSerializer()), result={"path": Path("/w/x"), "n": 1})
    assert ResultRecord.deserialize(ours.serialize()).result == {"path": Path("/w/x"), "n": 1}
    for foreign in (PickleSerializer(), JSONSerializer(jsonlib="pickle"), JSONSerializer(object_decoder="os.system")):
        planted = json.loads(ours.serialize())
        planted["metadata"]["serializer"] = foreign.model_dump()
        with pytest.raises(UnsafeResult):
            ResultRecord.deserialize(json.dumps(planted).encode())
    planted = json.loads(ours.serialize())
    planted["result"] = json.dumps({"__class__": "subprocess.Popen", "data": ["touch", "/tmp/x"]})
    with pytest.raises(UnsafeResult, match="subprocess.Popen") as err:
        ResultRecord.deserialize(json.dumps(planted).encode())
    assert err.value.exit_code == 5


def test_a_record_naming_one_of_our_functions_is_refused_and_nothing_is_called(tmp_path, monkeypatch):
    """Before: any name under atelier.* was 'a class of ours', so `atelier.storage.write_text_atomic` was called
    with the record's data. Now only the listed value types and registered result data classes are built."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata

    import atelier.kernel.storage
    from atelier.tasks.results import AtelierJSONSerializer, UnsafeResult

    called = []
    monkeypatch.setattr(atelier.kernel.storage, "write_text_atomic", lambda *a, **k: called.append(a))
    ours = ResultRecord(metadata=ResultRecordMetadata(serializer=AtelierJSONSerializer()), result={"n": 1})
    for name, data in (
        ("atelier.kernel.storage.write_text_atomic", {"path": str(tmp_path / "x.pth"), "text": "import os"}),
        ("atelier.registry.ledger.Ledger", {"url": "sqlite://"}),
        ("atelier.models.photos", {}),
        ("builtins.eval", "1+1"),
        ("pathlib.Path.write_text", "x"),
    ):
        planted = json.loads(ours.serialize())
        planted["result"] = json.dumps({"x": {"__class__": name, "data": data}})
        with pytest.raises(UnsafeResult, match="never writes"):
            ResultRecord.deserialize(json.dumps(planted).encode())
    assert called == [] and not (tmp_path / "x.pth").exists()


def test_value_types_result_data_classes_and_exceptions_round_trip():
    import dataclasses
    import datetime
    import uuid

    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata

    from atelier.kernel.errors import ConfigError
    from atelier.tasks.results import AtelierJSONSerializer, result_type

    @result_type
    @dataclasses.dataclass(frozen=True)
    class Trained:
        output_dir: Path
        steps: int

    value = {
        "trained": Trained(Path("/w/run"), 60),
        "when": datetime.datetime(2026, 12, 4, 12, 0),
        "tags": {"a", "b"},
        "id": uuid.UUID(int=7),
        "wait": datetime.timedelta(seconds=90),
        "error": ConfigError("x.yaml", "bad", "fix it"),
        "other": KeyError("k"),
    }
    record = ResultRecord(metadata=ResultRecordMetadata(serializer=AtelierJSONSerializer()), result=value)
    back = ResultRecord.deserialize(record.serialize()).result
    assert back["trained"] == Trained(Path("/w/run"), 60) and isinstance(back["trained"].output_dir, Path)
    assert back["when"] == value["when"] and back["tags"] == {"a", "b"} and back["id"] == value["id"] and back["wait"] == value["wait"]
    assert isinstance(back["error"], ConfigError) and "bad" in str(back["error"]) and isinstance(back["other"], KeyError)


def test_a_refused_record_stops_the_cache_lookup_naming_its_key(tmp_path):
    """Prefect's exists() took any unreadable record for a cache miss; a planted one is now exit 5, named."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    from atelier.tasks.results import AtelierJSONSerializer, UnsafeResult

    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)), serializer=AtelierJSONSerializer())
    (tmp_path / "good").write_bytes(store.create_result_record({"n": 1}, key="good").serialize())
    assert store.exists("good") and not store.exists("missing")
    planted = json.loads((tmp_path / "good").read_bytes())
    planted["metadata"]["serializer"] = {"type": "pickle", "picklelib": "cloudpickle"}
    (tmp_path / "evil").write_text(json.dumps(planted))
    with pytest.raises(UnsafeResult) as err:
        store.exists("evil")
    assert err.value.exit_code == 5 and "evil" in str(err.value)


def test_the_auth_app_counts_only_reads_and_searches_as_reads():
    from atelier.registry.auth_app import is_read

    assert is_read("GET", "/api/2.0/mlflow/registered-models/get")
    assert is_read("POST", "/api/2.0/mlflow/runs/search") and is_read("POST", "/graphql")
    for method, path in (
        ("POST", "/api/2.0/mlflow/registered-models/create"),
        ("POST", "/api/2.0/mlflow/registered-models/alias"),
        ("DELETE", "/api/2.0/mlflow/registered-models/delete"),
        ("PATCH", "/api/2.0/mlflow/registered-models/update"),
        ("POST", "/api/2.0/mlflow/experiments/create"),
        ("POST", "/api/2.0/mlflow/runs/create"),
    ):
        assert not is_read(method, path), path


def test_info_masks_passwords_in_urls(tmp_path):
    assert mask_url("postgresql+psycopg2://atelier:s3cret@db:5432/ledger") == "postgresql+psycopg2://atelier:***@db:5432/ledger"
    assert mask_url("sqlite:////w/ledger.db") == "sqlite:////w/ledger.db"
    described = load_settings(
        workspace=tmp_path,
        ledger_url="postgresql+psycopg2://u:s3cret@db/l",
        tracking_password="pw-1",
        tracking_username="ops",
        prefect_api_auth_string="atelier:pw-2",
    ).describe()
    text = json.dumps(described)
    assert "s3cret" not in text and "pw-1" not in text and "pw-2" not in text


@pytest.mark.parametrize("shared", [False, True])
def test_failed_logins_are_throttled_per_user_and_address(shared, tmp_path):
    from atelier.registry.auth_policy import Throttle

    path = str(tmp_path / "failures.db") if shared else None
    throttle = Throttle(per_user=3, per_address=5, window=60, path=path)
    for _ in range(3):
        assert throttle.retry_after("acme", "10.0.0.1") == 0
        throttle.failed("acme", "10.0.0.1")
    assert 0 < throttle.retry_after("acme", "10.0.0.1") <= 61  # this user from this address waits
    assert throttle.retry_after("acme", "10.0.0.2") == 0 and throttle.retry_after("ops", "10.0.0.1") == 0
    throttle.failed("x", "10.0.0.1")
    throttle.failed("y", "10.0.0.1")
    assert throttle.retry_after("ops", "10.0.0.1") > 0  # the address tried 5 names: everyone from it waits
    if shared:  # another worker process of the server sees the same counts
        assert Throttle(per_user=3, per_address=5, window=60, path=path).retry_after("acme", "10.0.0.1") > 0


def test_any_failure_on_a_full_workspace_disk_is_that_disks_not_a_servers(tmp_path):
    """The background Prefect server keeps its database on the workspace's disk: when that disk is full its
    500s used to read as "Prefect server did not answer, start it again" while it was up."""
    import os
    import shutil
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount)")
    try:
        settings = load_settings(workspace=small / "ws", prefect_api_url="http://127.0.0.1:4200/api")
        settings.state_dir.mkdir(parents=True)
        err = RuntimeError("Server error '500 Internal Server Error' for url 'http://127.0.0.1:4200/api/task_runs/'")
        assert classify(err, settings) is None  # room left: not an outage of the disk
        (small / "filler").write_bytes(b"\0" * shutil.disk_usage(small).free)
        found = classify(err, settings)
        assert found is not None and found.exit_code == 6 and str(small / "ws") in str(found) and "is full" in str(found)
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_a_verified_password_is_remembered_until_its_stored_hash_changes(tmp_path, monkeypatch):
    """The MLflow server checks each request's password with scrypt (~0.1 s); a verified one is kept,
    keyed by the stored hash, so a changed password or a deleted user is refused on the next request."""
    import werkzeug.security
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    from atelier.registry.auth_app import remember_verified_passwords

    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{tmp_path / 'auth.db'}")
    store.create_user("acme", "Acme-password-1")
    checks = []
    real = werkzeug.security.check_password_hash
    monkeypatch.setattr(werkzeug.security, "check_password_hash", lambda h, p: checks.append(p) or real(h, p))
    remember_verified_passwords(store)
    assert store.authenticate_user("acme", "Acme-password-1") and store.authenticate_user("acme", "Acme-password-1")
    assert len(checks) == 1  # the second request paid no scrypt
    assert not store.authenticate_user("acme", "wrong") and not store.authenticate_user("nobody", "Acme-password-1")
    store.update_user("acme", password="Acme-password-2")  # (another worker, or the database itself)
    assert not store.authenticate_user("acme", "Acme-password-1") and store.authenticate_user("acme", "Acme-password-2")
    store.delete_user("acme")
    assert not store.authenticate_user("acme", "Acme-password-2")
