"""Tenant isolation and durability on `atelier up`'s stack, tried as an attacker and as an SRE would.

Two customers, acme and globex, each with a registered model and the credentials `atelier customer add`
hands over. Every anonymous and cross-tenant request in the matrix below must be refused by the server
itself (MLflow's REST API, SeaweedFS's S3, Prefect's API, SeaweedFS's internal ports), and each
customer must still read and load its own model. Then the stack is stopped, started and killed, and
nothing registered may be lost. Runs after test_stack.py on the session's stack (tests/stack_harness.py).
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tests.stack_harness import ATELIER, BUCKET
from tests.trust_matrix import cross_tenant_refusals

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]


def _read_env(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def tenants(stack):
    """acme's robot (registered by test_stack.py, or here) and globex's widget, and both customers' credentials."""
    from atelier.cli.demo_data import write_demo_photos

    if not stack.sql("mlflow", "SELECT 1 FROM registered_models WHERE name = %s", "dreambooth-acme-robot"):
        stack.run(ATELIER, "finetune", "acme", "robot")
    photos = write_demo_photos(stack.ws.parent / "photos-globex", count=4)
    stack.run(ATELIER, "subject", "add", "globex", "widget", *map(str, photos), "--class", "toy")
    stack.run(ATELIER, "finetune", "globex", "widget")
    creds = {}
    for customer in ("acme", "globex"):
        done = stack.run(ATELIER, "customer", "add", customer)
        path = stack.ws / ".atelier" / "customers" / f"{customer}.env"
        creds[customer] = _read_env(path)
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert creds[customer]["MLFLOW_TRACKING_PASSWORD"] not in done.stdout + done.stderr  # never printed
        assert creds[customer]["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr
    client = stack.mlflow()
    acme = client.get_model_version_by_alias("dreambooth-acme-robot", "champion")
    model_files = [k for k in stack.keys("mlflow/acme/") if k.endswith("MLmodel")]
    return {
        "creds": creds,
        "acme_version": acme,
        "acme_run": acme.run_id,
        "acme_object": model_files[0],
        "acme_experiment": client.get_experiment_by_name("atelier-acme").experiment_id,
        "globex_object": next(k for k in stack.keys("mlflow/globex/") if k.endswith("MLmodel")),
    }


def test_anonymous_and_cross_tenant_requests_are_all_refused(stack, tenants):
    marker = stack.ws.parent / "command-override-ran"
    refused = cross_tenant_refusals(stack.env, tenants, _ensure_deployment(stack), f"touch {marker}")
    acme_key = tenants["acme_object"]
    # SeaweedFS's own ports are not a way around S3's authentication: every HTTP and gRPC port is mutual TLS
    refused.update(_seaweed_internal_ports_refused(stack, acme_key))

    print(f"{len(refused)} attempts, {sum(refused.values())} refused")
    assert len(refused) >= 30
    assert [name for name, ok in refused.items() if not ok] == []
    time.sleep(5)  # a worker that took the override would have run it by now
    assert not marker.exists()
    assert not stack.sql("mlflow", "SELECT name FROM registered_models WHERE name IN ('dreambooth-acme-squat', 'dreambooth-acme-extra')")
    assert not stack.sql("mlflow", "SELECT name FROM experiments WHERE name = 'atelier-newco'")
    assert stack.mlflow().get_registered_model("dreambooth-acme-robot").tags["atelier.customer"] == "acme"


def _seaweed_internal_ports_refused(stack, acme_key: str) -> dict[str, bool]:
    """The master's assign/lookup/status, the volume's and filer's HTTP, and every gRPC port, asked as a local
    process without the stack's client certificate (plain and over TLS)."""
    import socket
    import ssl

    host, base = stack.env["ATELIER_S3_ENDPOINT_URL"].split("//")[1].split(":")[0], int(stack.env["ATELIER_STACK__S3_INTERNAL_PORT"])
    master, volume, filer = base, base + 2, base + 4
    refused = {}

    def http_refused(url: str, method: str = "GET", **kw) -> bool:
        for scheme in ("http", "https"):
            try:
                answer = requests.request(method, f"{scheme}://{host}:{url}", timeout=15, verify=False, **kw)
            except requests.exceptions.RequestException:
                continue  # no TLS client certificate: the handshake fails
            if answer.status_code < 300 or b"fid" in answer.content or acme_key.encode() in answer.content:
                return False
        return True

    for name, (url, method) in {
        "master assign a write token": (f"{master}/dir/assign", "GET"),
        "master lookup a read token": (f"{master}/dir/lookup?volumeId=1&read=yes", "GET"),
        "master status": (f"{master}/dir/status", "GET"),
        "master cluster status": (f"{master}/cluster/status", "GET"),
        "volume status": (f"{volume}/status", "GET"),
        "volume read": (f"{volume}/1,01", "GET"),
        "filer read": (f"{filer}/buckets/{BUCKET}/{acme_key}", "GET"),
        "filer write": (f"{filer}/buckets/{BUCKET}/evil.txt", "POST"),
    }.items():
        refused[f"s3 internal {name}"] = http_refused(url, method)
    for name, port in {"master": base + 1, "volume": base + 3, "filer": base + 5, "s3": base + 6}.items():
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        try:
            with context.wrap_socket(socket.create_connection((host, port), timeout=10)) as conn:
                conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                got = conn.recv(64)
            refused[f"s3 internal {name} gRPC without a client certificate"] = got == b""
        except (ssl.SSLError, OSError):
            refused[f"s3 internal {name} gRPC without a client certificate"] = True
    return refused


def _as_another_user(attempt) -> bool:
    """Run `attempt()` in a child process as `nobody` (a local user without the stack's files); True when
    it raised PermissionError, as it must."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            attempt()
            code = 1  # it got through
        except PermissionError:
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1] == 0


def test_servers_run_as_their_own_user_and_their_files_are_private(stack, tenants):
    """Another local user reads no volume file, key or certificate and reaches no SeaweedFS socket: every
    folder of the stack is 0700, the data, keys and secrets 0600. Run as root, `atelier up` starts SeaweedFS
    as the service user (its data owned by it, not root), and the Python servers too where that user can
    read the installation (else `up` said why)."""
    import psutil

    ops, data = stack.ws / ".atelier" / "stack", stack.server_home
    folders = [p for root in (ops, data) for p in [root, *root.rglob("*")] if p.is_dir() and not p.is_symlink()]
    assert [str(p) for p in folders if p.stat().st_mode & 0o077] == []
    private = [
        *data.glob("s3/data/*.dat"),
        *data.glob("s3/data/*.idx"),
        *data.glob("s3/tls/*"),
        ops / "secrets.json",
        data / "s3" / "security.toml",
        data / "s3" / "identities.json",
    ]
    assert len(private) > 6 and [str(p) for p in private if p.stat().st_mode & 0o077] == []
    if os.geteuid() != 0:
        return
    service = pwd.getpwnam("atelier")
    uid_of = {
        name: psutil.Process(json.loads((ops / f"{name}.json").read_text())["pid"]).uids().real for name in ("s3", "prefect", "mlflow")
    }
    assert uid_of["s3"] == service.pw_uid and str(data).startswith("/var/lib/atelier/stacks/")
    assert [str(p) for p in [data / "s3", *(data / "s3").rglob("*")] if p.stat().st_uid != service.pw_uid] == []
    for name in ("prefect", "mlflow"):
        assert uid_of[name] == service.pw_uid or "prefect and mlflow run as root (user atelier cannot read" in stack.up_output
    volume = next(data.glob("s3/data/*.dat"))
    assert _as_another_user(lambda: volume.open("rb").read(1))
    base = int(stack.env["ATELIER_STACK__S3_INTERNAL_PORT"])
    ports = [stack.env["ATELIER_STACK__S3_PORT"], *map(str, range(base, base + 7))]
    sockets = [p for port in ports for p in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock")]
    assert len(sockets) >= 4 and all(p.owner() == "atelier" for p in sockets)
    for path in sockets:
        assert _as_another_user(lambda path=path: socket.socket(socket.AF_UNIX).connect(str(path))), path


def _ensure_deployment(stack) -> str:
    (stack.ws / "schedules.yaml").write_text('retrain:\n  - {customer: acme, subject: robot, cron: "0 3 * * *", paused: true}\n')
    stack.run(ATELIER, "deploy")
    return stack.sql("prefect", "SELECT id FROM deployment WHERE name = %s", "retrain-acme-robot")[0][0]


def _load(env: dict[str, str], model: str) -> subprocess.CompletedProcess:
    code = (
        f"import mlflow.pyfunc, pandas as pd; m = mlflow.pyfunc.load_model('models:/{model}');"
        "print('ROWS', len(m.predict(pd.DataFrame({'prompt': ['a sks toy'], 'seed': [1], 'steps': [2]}))))"
    )
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=300, cwd="/")


def test_each_customer_loads_its_own_model_and_not_the_other(stack, tenants):
    creds = tenants["creds"]
    own = _load(creds["acme"], "dreambooth-acme-robot@champion")
    assert own.returncode == 0 and "ROWS 1" in own.stdout, own.stderr[-2000:]
    other = _load(creds["acme"], "dreambooth-globex-widget@champion")
    assert other.returncode != 0 and ("PERMISSION_DENIED" in other.stderr or "403" in other.stderr)
    # the platform's own check: serving acme's model for globex is refused by name, exit 2
    done = stack.run(ATELIER, "generate", "dreambooth-acme-robot@champion", "--prompt", "x", "--customer", "globex", check=False)
    assert done.returncode == 2 and "belongs to customer 'acme'" in done.stderr


def test_no_secret_in_any_process_argv_or_in_info(stack, tenants):
    secrets = list(json.loads((stack.ws / ".atelier/stack/secrets.json").read_text()).values())
    secrets += [tenants["creds"][c][k] for c in ("acme", "globex") for k in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY")]
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        argv = " ".join(proc.info["cmdline"] or [])
        assert not any(s in argv for s in secrets), argv[:200]
    info = stack.run(ATELIER, "info").stdout
    assert not any(s in info for s in secrets)
    # the worker holds what flows need and not the servers' own secrets
    record = json.loads((stack.ws / ".atelier/stack/worker.json").read_text())
    environ = psutil.Process(record["pid"]).environ()
    assert "PREFECT_SERVER_API_AUTH_STRING" not in environ and "MLFLOW_AUTH_ADMIN_PASSWORD" not in environ
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in environ and "MLFLOW_FLASK_SERVER_SECRET_KEY" not in environ
    # and its own MLflow identity, not the operator's admin: it may not create users or make itself an admin
    admin_password = json.loads((stack.ws / ".atelier/stack/secrets.json").read_text())["mlflow_admin_password"]
    assert environ["ATELIER_TRACKING_USERNAME"] == "atelier-worker" and admin_password not in environ.values()
    base, as_worker = stack.env["ATELIER_TRACKING_URI"], (environ["ATELIER_TRACKING_USERNAME"], environ["ATELIER_TRACKING_PASSWORD"])
    assert (
        requests.post(
            f"{base}/api/2.0/mlflow/users/create", json={"username": "mallory", "password": "Mallory-pw-12345"}, auth=as_worker, timeout=10
        ).status_code
        == 403
    )
    assert (
        requests.patch(
            f"{base}/api/2.0/mlflow/users/update-admin", json={"username": "atelier-worker", "is_admin": True}, auth=as_worker, timeout=10
        ).status_code
        == 403
    )


def test_side_doors_of_the_mlflow_server_are_shut(stack, tenants):
    """MLflow's native FastAPI features (the assistant runs shell commands) are off for everyone; a
    customer reaches only its reads; password guessing is throttled with a 429."""
    base = stack.env["ATELIER_TRACKING_URI"]
    globex = (tenants["creds"]["globex"]["MLFLOW_TRACKING_USERNAME"], tenants["creds"]["globex"]["MLFLOW_TRACKING_PASSWORD"])
    platform = (stack.env["ATELIER_TRACKING_USERNAME"], stack.env["ATELIER_TRACKING_PASSWORD"])
    attempts = {
        "assistant config": ("PUT", "/ajax-api/3.0/mlflow/assistant/config", {"providers": {"openai": {"full_access": True}}}),
        "assistant message": ("POST", "/ajax-api/3.0/mlflow/assistant/message", {"message": "run id"}),
        "assistant skills": ("POST", "/ajax-api/3.0/mlflow/assistant/skills/install", {"path": "/tmp"}),
        "submit a job": ("POST", "/ajax-api/3.0/jobs/", {"function_fullname": "os.system", "params": {}}),
        "create an MCP server": ("POST", "/api/3.0/mlflow/mcp-servers", {"name": "x"}),
        "gateway": ("POST", "/gateway/openai/v1/chat/completions", {}),
        "otlp ingestion": ("POST", "/v1/traces", {}),
    }
    for who, auth in (("globex", globex), ("platform", platform), ("anonymous", None)):
        for name, (method, path, body) in attempts.items():
            status = requests.request(method, base + path, auth=auth, json=body, timeout=30).status_code
            assert status in (401, 403), f"{who} {name}: {status}"
    assert requests.post(f"{base}/api/3.0/mlflow/gateway/secrets/create", auth=globex, json={}, timeout=30).status_code == 403
    statuses = [
        requests.get(f"{base}/api/2.0/mlflow/registered-models/search", auth=("guesser", f"pw{i}"), timeout=30).status_code
        for i in range(12)
    ]
    assert statuses[:10] == [401] * 10 and statuses[-1] == 429, statuses
    assert requests.get(f"{base}/api/2.0/mlflow/registered-models/search", auth=globex, timeout=30).status_code == 200


def test_a_planted_pickle_result_is_refused_with_exit_5_never_run(stack, tenants):
    """Someone who could write the result store plants pickled records: the next run stops with exit 5
    naming the record, the planted code never runs, and `--refresh` recomputes over it."""
    from prefect.serializers import PickleSerializer

    marker = stack.ws.parent / "planted-result-ran"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    record = {
        "metadata": {
            "storage_key": None,
            "expiration": None,
            "serializer": {"type": "pickle", "picklelib": "cloudpickle"},
            "prefect_version": "3.8.8",
            "storage_block_id": None,
        },
        "result": PickleSerializer().dumps(Planted()).decode(),
    }
    s3 = stack.s3()
    keys = stack.keys("prefect-results/")
    for key in keys:
        s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(record).encode())
    done = stack.run(ATELIER, "finetune", "globex", "widget", check=False)
    assert done.returncode == 5, done.stdout[-2000:] + done.stderr[-2000:]
    assert "stored task result" in done.stderr and "prefect-results" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()
    stack.run(ATELIER, "finetune", "globex", "widget", "--refresh")
    assert not marker.exists()


def test_a_rerun_repairs_a_version_whose_files_were_lost_instead_of_promoting_it_again(stack, tenants):
    before = stack.mlflow().get_model_version_by_alias("dreambooth-globex-widget", "champion")
    s3 = stack.s3()
    for key in stack.keys("mlflow/globex/models/"):
        s3.delete_object(Bucket=BUCKET, Key=key)
    stack.run(ATELIER, "finetune", "globex", "widget")
    client = stack.mlflow()
    after = client.get_model_version_by_alias("dreambooth-globex-widget", "champion")
    assert int(after.version) == int(before.version) + 1
    assert "atelier.artifacts.damaged" in client.get_model_version("dreambooth-globex-widget", before.version).tags
    loaded = _load(tenants["creds"]["globex"], "dreambooth-globex-widget@champion")
    assert loaded.returncode == 0, loaded.stderr[-2000:]


def test_s3_killed_mid_run_exits_6_naming_s3_and_loses_nothing_registered(stack, tenants):
    from atelier.cli.demo_data import write_demo_photos

    photos = write_demo_photos(stack.ws.parent / "photos-acme-lamp", count=4)
    stack.run(ATELIER, "subject", "add", "acme", "lamp", *map(str, photos), "--class", "toy")
    env = {**stack.env, "AWS_MAX_ATTEMPTS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = subprocess.Popen(
        [ATELIER, "finetune", "acme", "lamp"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=stack.ws.parent
    )
    deadline = time.monotonic() + 400
    while not any("train-dreambooth" in r[0] for r in stack.sql("prefect", "SELECT name FROM task_run")) and time.monotonic() < deadline:
        time.sleep(0.5)
    stack.kill("s3")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 6, err[-3000:]
    assert f"error: S3 at {stack.env['ATELIER_S3_ENDPOINT_URL']}" in err
    assert "Traceback" not in err, err[-4000:]  # one line naming S3, not the engine's frames above it
    stack.run(ATELIER, "up")
    for customer in ("acme", "globex"):
        model = "dreambooth-acme-robot" if customer == "acme" else "dreambooth-globex-widget"
        loaded = _load(tenants["creds"][customer], f"{model}@champion")
        assert loaded.returncode == 0, loaded.stderr[-2000:]
    # the interrupted run is not left "Running" once the next one starts
    stack.run(ATELIER, "runs")
    states = {r[0] for r in stack.sql("prefect", "SELECT state_type FROM flow_run")}
    assert "RUNNING" not in states


def test_down_and_up_keep_every_model_and_the_dvc_remote(stack, tenants):
    versions = stack.sql("mlflow", "SELECT name, version FROM model_versions ORDER BY name, version")
    stack.run(ATELIER, "down")
    stack.run(ATELIER, "up")
    assert stack.sql("mlflow", "SELECT name, version FROM model_versions ORDER BY name, version") == versions
    for customer, model in (("acme", "dreambooth-acme-robot"), ("globex", "dreambooth-globex-widget")):
        loaded = _load(tenants["creds"][customer], f"{model}@champion")
        assert loaded.returncode == 0, loaded.stderr[-2000:]
    # a fresh clone of the workspace pulls the photos from the S3 remote
    clone = stack.ws.parent / "clone"
    subprocess.run(["git", "clone", "-q", str(stack.ws), str(clone)], check=True)
    dvc = str(os.path.join(os.path.dirname(sys.executable), "dvc"))
    # the subject's photos (dvc.yaml's stages have outputs of their own that were never produced here)
    pulled = subprocess.run(
        [dvc, "pull", "data/subjects/acme/robot.dvc"], cwd=clone, env={**stack.env}, capture_output=True, text=True, timeout=300
    )
    assert pulled.returncode == 0, (pulled.stdout + pulled.stderr)[-2000:]
    assert len(list((clone / "data" / "subjects" / "acme" / "robot").iterdir())) == 5


def test_a_rewritten_ledger_row_with_a_recomputed_hash_and_a_reserved_name_are_refused(stack, tenants):
    """Whoever can write the ledger's database rewrites a row's actor and reason and recomputes its sha256:
    `ledger verify` exits 5 (the row's signature is the platform's key's, which the database does not hold).
    The row is put back afterwards. A customer named like a platform object is refused."""
    from atelier.registry.ledger import LedgerRow

    ((seq, actor, reason, row_hash),) = stack.sql(
        "ledger", "SELECT seq, actor, reason, row_hash FROM promotion_ledger ORDER BY seq DESC LIMIT 1"
    )
    row = LedgerRow(
        **{
            c: v
            for c, v in zip(
                (
                    "seq",
                    "model",
                    "version",
                    "action",
                    "from_alias",
                    "to_alias",
                    "replaced_version",
                    "gate",
                    "metrics",
                    "flow_run_id",
                    "created_at",
                    "prev_hash",
                ),
                stack.sql(
                    "ledger",
                    "SELECT seq, model, version, action, from_alias, to_alias, "
                    "replaced_version, gate, metrics, flow_run_id, created_at, prev_hash "
                    "FROM promotion_ledger WHERE seq = %s",
                    seq,
                )[0],
            )
        }
    )
    row.actor, row.reason = "nobody", "nothing happened"
    forged = row.compute_hash()
    stack.sql(
        "ledger", "UPDATE promotion_ledger SET actor = %s, reason = %s, row_hash = %s WHERE seq = %s", row.actor, row.reason, forged, seq
    )
    anchor = stack.sql("mlflow", "SELECT value FROM experiment_tags WHERE key = 'atelier.ledger.head'")[0][0]
    stack.sql("mlflow", "UPDATE experiment_tags SET value = %s WHERE key = 'atelier.ledger.head'", f"{seq}:{forged}")
    try:
        done = stack.run(ATELIER, "ledger", "verify", check=False)
        assert done.returncode == 5 and f"row {seq}" in done.stderr and "signature" in done.stderr, done.stderr[-2000:]
    finally:
        stack.sql(
            "ledger", "UPDATE promotion_ledger SET actor = %s, reason = %s, row_hash = %s WHERE seq = %s", actor, reason, row_hash, seq
        )
        stack.sql("mlflow", "UPDATE experiment_tags SET value = %s WHERE key = 'atelier.ledger.head'", anchor)
    assert stack.run(ATELIER, "ledger", "verify").returncode == 0
    for reserved in ("ledger", "admin", "atelier-ops"):
        done = stack.run(ATELIER, "customer", "add", reserved, check=False)
        assert done.returncode == 2 and "reserves" in done.stderr and "Traceback" not in done.stderr
