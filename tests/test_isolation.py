"""Per-customer isolation against a real MLflow tracking server with its basic-auth app."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from atelier.kernel.settings import Settings
from atelier.registry.dreambooth import register_dreambooth
from atelier.registry.isolation import AccessDenied, add_customer, require_owner
from atelier.registry.pyfunc import decode_png

pytestmark = pytest.mark.slow
OPS, OPS_PW = "ops", "ops-Secret-pw-1"
WORKER, WORKER_PW = "atelier-worker", "worker-Secret-pw-2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = root / "basic_auth.ini"
    ini.write_text(
        f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///{root}/auth.db\n"
        f"admin_username = {OPS}\nadmin_password = {OPS_PW}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": OPS_PW,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "atelier-test-secret",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"ATELIER_AUTH_WORKER_USER": WORKER, "ATELIER_AUTH_WORKER_PASSWORD": WORKER_PW})
    subprocess.run([sys.executable, "-m", "atelier.registry.auth_app"], env=env, check=True, timeout=120)  # as `atelier up` does
    env.pop("ATELIER_AUTH_WORKER_PASSWORD")  # the server needs the worker's name only
    # the stack's app: MLflow's basic auth plus "only the platform writes" (registry/auth_app.py)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--app-name",
            "atelier-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("MLflow server did not start: " + (root / "server.log").read_text()[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _as(monkeypatch, url: str, user: str, password: str) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(url)


@pytest.fixture(scope="module")
def registered(server, workspace, tiny_model, tmp_path_factory):
    """Two customers' models, registered by the operations user through Atelier's own code."""
    folder = tmp_path_factory.mktemp("samples")
    sample = folder / "000.png"
    Image.new("RGB", (8, 8), "red").save(sample)
    # a ledger of its own: a ledger belongs to one registry (its anchor lives there)
    settings = Settings(
        workspace=workspace.workspace,
        tracking_uri=server,
        tracking_username=OPS,
        tracking_password=OPS_PW,
        ledger_url=f"sqlite:///{folder / 'ledger.db'}",
    )
    with pytest.MonkeyPatch.context() as mp:
        _as(mp, server, OPS, OPS_PW)
        for customer in ("acme", "globex"):
            register_dreambooth(
                settings,
                customer,
                "robot",
                tiny_model,
                {"training.key": customer, "customer": customer},
                {"lr": 1},
                [1.0, 0.5],
                {"m": 1.0},
                [sample],
                sample,
                "dpmsolver++",
                2,
                2.0,
            )
        passwords = {c: add_customer(settings, c, f"{c}-Password-123").password for c in ("acme", "globex")}
    return settings, passwords


def test_customer_reads_and_loads_only_its_own_model(server, registered, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    _, passwords = registered
    client = _as(monkeypatch, server, "acme", passwords["acme"])
    assert client.get_registered_model("dreambooth-acme-robot").tags["atelier.customer"] == "acme"
    model = mlflow.pyfunc.load_model("models:/dreambooth-acme-robot@candidate")
    out = model.predict(pd.DataFrame({"prompt": ["a sks toy"], "seed": [1], "steps": [2]}))
    assert len(out) == 1
    # these runs recorded no resolution: the example MLflow generated while logging is at the pipeline's own size
    example = model.input_example
    assert (int(example["height"][0]), int(example["width"][0])) == (0, 0)
    pipe = model.unwrap_python_model().pipe
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert decode_png(out["image_png_base64"][0]).size == (native, native) and native < 512
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403|Permission"):
        client.get_registered_model("dreambooth-globex-robot")
    with pytest.raises(MlflowException):
        mlflow.pyfunc.load_model("models:/dreambooth-globex-robot@candidate")
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403|Permission"):
        client.set_registered_model_alias("dreambooth-acme-robot", "champion", "1")  # READ only, even on its own


def test_other_customer_is_refused_everything(server, registered, monkeypatch):
    _, passwords = registered
    client = _as(monkeypatch, server, "globex", passwords["globex"])
    for call in (
        lambda: client.get_registered_model("dreambooth-acme-robot"),
        lambda: client.get_model_version_by_alias("dreambooth-acme-robot", "candidate"),
        lambda: client.set_registered_model_alias("dreambooth-acme-robot", "champion", "1"),
    ):
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403|Permission"):
            call()


def test_operations_user_manages_all(server, registered, monkeypatch):
    client = _as(monkeypatch, server, OPS, OPS_PW)
    client.set_registered_model_alias("dreambooth-globex-robot", "champion", "1")
    assert str(client.get_model_version_by_alias("dreambooth-globex-robot", "champion").version) == "1"
    with pytest.raises(AccessDenied, match="belongs to customer 'acme'"):
        require_owner(client, "dreambooth-acme-robot", "globex")


def test_a_customer_cannot_create_a_name_first_or_write_anything(server, registered, monkeypatch):
    """Name squatting: globex creating acme's future model or a new customer's experiment, so that it
    would own (and read) what the platform later puts there."""
    _, passwords = registered
    client = _as(monkeypatch, server, "globex", passwords["globex"])
    for call in (
        lambda: client.create_registered_model("dreambooth-acme-squat", tags={"atelier.customer": "acme"}),
        lambda: client.create_experiment("atelier-newco"),
        lambda: client.set_registered_model_tag("dreambooth-globex-robot", "atelier.customer", "acme"),
    ):
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403|Permission"):
            call()
    ops = _as(monkeypatch, server, OPS, OPS_PW)
    assert ops.get_experiment_by_name("atelier-newco") is None
    # a name made outside the platform (no owner tag) is never registered into or served
    ops.create_registered_model("dreambooth-acme-handmade")
    with pytest.raises(AccessDenied, match="was not created by the platform"):
        require_owner(ops, "dreambooth-acme-handmade", "acme")


def test_customer_add_again_resets_the_password_and_keeps_the_grants(server, registered, monkeypatch):
    settings, _ = registered
    with pytest.MonkeyPatch.context() as mp:
        _as(mp, server, OPS, OPS_PW)
        again = add_customer(settings, "acme", "acme-New-Password-456")
    assert again.models == ["dreambooth-acme-robot"]
    client = _as(monkeypatch, server, "acme", "acme-New-Password-456")
    assert client.get_registered_model("dreambooth-acme-robot").name == "dreambooth-acme-robot"


def test_wrong_password_is_refused(server, registered):
    resp = requests.get(
        f"{server}/api/2.0/mlflow/registered-models/get",
        params={"name": "dreambooth-acme-robot"},
        auth=("acme", "not-the-password"),
        timeout=10,
    )
    assert resp.status_code == 401
    anonymous = requests.get(f"{server}/api/2.0/mlflow/registered-models/get", params={"name": "dreambooth-acme-robot"}, timeout=10)
    assert anonymous.status_code == 401


def test_the_worker_identity_runs_the_flows_work_but_cannot_manage_users(server, registered, tiny_model, monkeypatch, tmp_path):
    """The stack's worker is not the admin: MANAGE on every experiment and model through a role (it
    registers a version of a model the operator made, a new model, grants the customer READ, moves
    aliases), and no say over users."""
    from atelier.registry.isolation import auth_client

    settings, passwords = registered
    worker = settings.model_copy(update={"tracking_username": WORKER, "tracking_password": WORKER_PW})
    sample = tmp_path / "000.png"
    Image.new("RGB", (8, 8), "blue").save(sample)
    client, versions = _as(monkeypatch, server, WORKER, WORKER_PW), {}
    for subject in ("robot", "lamp"):  # a model the operator registered, and a new one
        versions[subject] = reg = register_dreambooth(
            worker,
            "acme",
            subject,
            tiny_model,
            {"training.key": f"w-{subject}", "customer": "acme"},
            {"lr": 1},
            [1.0, 0.5],
            {"m": 1.0},
            [sample],
            sample,
            "dpmsolver++",
            2,
            2.0,
        )
        client.set_registered_model_alias(reg.name, "champion", reg.version)
    auth = auth_client(worker)
    for call in (
        lambda: auth.create_user("mallory", "Mallory-pw-123456"),
        lambda: auth.update_user_admin(WORKER, True),
        lambda: auth.update_user_password("acme", "Taken-over-123456"),
        lambda: auth.get_user("acme"),
        lambda: auth.delete_user("globex"),
    ):
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403|Permission"):
            call()
    _as(monkeypatch, server, OPS, OPS_PW)
    auth_client(settings).update_user_password("acme", "acme-Worker-test-789")  # (a password only: no grant)
    acme = _as(monkeypatch, server, "acme", "acme-Worker-test-789")  # the customer reads both: the worker granted them
    assert acme.get_model_version_by_alias("dreambooth-acme-lamp", "champion").tags["atelier.customer"] == "acme"
    assert acme.get_model_version_by_alias("dreambooth-acme-robot", "champion").version == versions["robot"].version
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403|Permission"):
        _as(monkeypatch, server, "globex", passwords["globex"]).get_registered_model("dreambooth-acme-lamp")
