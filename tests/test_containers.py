"""The production stack in real containers (docker/compose.yaml on the images of `make images`), as a team runs it:
build, `compose up`, two customers each fine-tune a subject on the tiny model in flow-run containers of the
Docker work pool, batch generation, isolation between the customers, `ledger verify`, then `compose down` and
`up` again with both champions still loading. One compose project per run (its own ports, volumes and
network), removed at the end with its volumes.

Needs a Docker engine: where none answers and this process is root with Debian's docker.io installed, the
session starts `dockerd` itself (stopped by pid at the end); elsewhere the module skips, saying why, unless
ATELIER_REQUIRE_CONTAINERS=1 (CI sets it), which turns the skip into a failure. The images are built in the
background from the start of the session and this module runs last (tests/container_engine.py, conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests import container_engine
from tests.ports import free_ports

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
pytestmark = [pytest.mark.container, pytest.mark.slow]


def _skip_or_fail(reason: str):
    if os.environ.get("ATELIER_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"containers are required here (ATELIER_REQUIRE_CONTAINERS=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine():
    """A Docker engine that answers: the machine's, or one started for this session (conftest.py stops it by pid)."""
    reason = container_engine.start_engine()
    if reason is not None:
        _skip_or_fail(reason)
    if not shutil.which("docker-compose"):
        _skip_or_fail("docker-compose is missing (Debian: apt-get install docker-compose)")


class Compose:
    def __init__(self, root: Path) -> None:
        self.project = f"atelier_it{os.getpid()}"
        self.env_file = root / ".env"
        self.prefect_port, self.mlflow_port, self.s3_port = free_ports(3)
        done = subprocess.run(
            [
                "python3",
                str(ROOT / "docker" / "new_env.py"),
                "--out",
                str(self.env_file),
                "--project",
                self.project,
                "--ports",
                f"{self.prefect_port},{self.mlflow_port},{self.s3_port}",
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert oct(self.env_file.stat().st_mode & 0o777) == "0o600"
        self.values = dict(line.split("=", 1) for line in self.env_file.read_text().splitlines() if "=" in line and line[0] != "#")
        # only what docker-compose needs: the caller's variables would override docker/.env's
        self.base_env = {k: os.environ[k] for k in ("PATH", "HOME", "DOCKER_HOST") if k in os.environ}

    def run(self, *args: str, check: bool = True, timeout: float = 900, stdin: str | None = None) -> subprocess.CompletedProcess:
        argv = ["docker-compose", "-f", str(COMPOSE_FILE), "--env-file", str(self.env_file), "-p", self.project, *args]
        done = subprocess.run(argv, env=self.base_env, capture_output=True, text=True, timeout=timeout, input=stdin)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def cli(self, *args: str, check: bool = True, stdin: str | None = None, volumes: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        mounts = [x for v in volumes for x in ("-v", v)]
        return self.run("run", "--rm", "-T", *mounts, "cli", *args, check=check, stdin=stdin)

    def up(self) -> None:
        self.run("up", "-d", timeout=900)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            state = self.run("ps", "-a").stdout
            if "_setup_1" in state and "Exit 0" in state and state.count("Up") >= 6:
                return
            if "Exit 1" in state or "Exit 2" in state:
                raise AssertionError(state + self.run("logs", "--tail", "60", check=False).stdout[-6000:])
            time.sleep(3)
        raise AssertionError("the stack did not come up:\n" + self.run("logs", "--tail", "40", check=False).stdout[-6000:])

    def s3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.s3_port}",
            aws_access_key_id=self.values["S3_ACCESS_KEY"],
            aws_secret_access_key=self.values["S3_SECRET_KEY"],
            region_name="us-east-1",
        )

    def prefect(self, path: str, body: dict) -> list | dict:
        import base64

        req = urllib.request.Request(
            f"http://127.0.0.1:{self.prefect_port}/api{path}",
            data=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": "Basic " + base64.b64encode(self.values["PREFECT_AUTH_STRING"].encode()).decode(),
            },
        )
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (the test's own loopback port)
            return json.loads(resp.read())


@pytest.fixture(scope="module")
def stack(engine, tmp_path_factory):
    code, output = container_engine.built_images()  # started in the background when the session began (conftest.py)
    assert code == 0, output
    compose = Compose(tmp_path_factory.mktemp("compose"))
    try:
        compose.up()
        yield compose
    finally:
        compose.run("down", "-v", "--remove-orphans", check=False, timeout=300)


def _status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:  # noqa: S310
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_every_service_asks_for_credentials_and_listens_on_loopback_only(stack):
    assert _status(f"http://127.0.0.1:{stack.prefect_port}/api/flows/count") == 401
    assert _status(f"http://127.0.0.1:{stack.mlflow_port}/api/2.0/mlflow/registered-models/search") == 401
    assert _status(f"http://127.0.0.1:{stack.s3_port}/atelier/") == 403  # unsigned
    ports = subprocess.run(
        ["docker", "ps", "--filter", f"label=com.docker.compose.project={stack.project}", "--format", "{{.Ports}}"],
        capture_output=True,
        text=True,
    ).stdout
    published = [p for p in ports.replace(",", "\n").split() if "->" in p]
    assert published and all(p.startswith("127.0.0.1:") for p in published), ports
    users = subprocess.run(
        ["docker", "ps", "--filter", f"label=com.docker.compose.project={stack.project}", "-q"], capture_output=True, text=True
    ).stdout.split()
    for cid in users:
        user = subprocess.run(["docker", "inspect", "-f", "{{.Config.User}}", cid], capture_output=True, text=True).stdout.strip()
        assert user not in ("", "root", "0"), f"container {cid} runs as root"
    text = COMPOSE_FILE.read_text().lower()
    assert "minio" not in text


PHOTOS = "/photos"


def _add_subject(stack, tmp_path_factory, customer: str, subject: str) -> None:
    from atelier.cli.demo_data import write_demo_photos

    folder = tmp_path_factory.mktemp(f"photos-{customer}")
    photos = write_demo_photos(folder, count=4)
    folder.chmod(0o755)
    for p in photos:
        p.chmod(0o644)
    names = " ".join(f"{PHOTOS}/{p.name}" for p in photos)
    stack.cli("sh", "-c", f"atelier subject add {customer} {subject} {names} --class toy", volumes=(f"{folder}:{PHOTOS}:ro",))


def _flow_runs(stack, deployment_names: set[str]) -> dict[str, dict]:
    runs = stack.prefect("/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 50})
    deps = {d["id"]: d["name"] for d in stack.prefect("/deployments/filter", {"limit": 50})}
    return {deps[r["deployment_id"]]: r for r in runs if deps.get(r.get("deployment_id")) in deployment_names}


def _wait_for(stack, names: set[str], timeout: float = 1500) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _flow_runs(stack, names)
        if len(runs) == len(names) and all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs.values()):
            return runs
        time.sleep(5)
    raise AssertionError(
        f"flow runs did not finish: {_flow_runs(stack, names)}\n{stack.run('logs', '--tail', '60', check=False).stdout[-5000:]}"
    )


SCHEDULES = """retrain:
  - {customer: acme, subject: robot, cron: "0 3 * * *", paused: true}
  - {customer: globex, subject: widget, cron: "0 3 * * *", paused: true}
batch_generate:
  - {customer: acme, subject: robot, cron: "0 4 * * *", paused: true, manifest: "s3://atelier/in/prompts.jsonl", out: "s3://atelier/out/acme"}
"""


def _load_as(stack, customer: str, model: str) -> subprocess.CompletedProcess:
    """Load a champion with a customer's own credentials (written by `customer add`), nothing of the platform's."""
    code = (
        f"import mlflow.pyfunc, pandas as pd; m = mlflow.pyfunc.load_model('models:/{model}');"
        "print('ROWS', len(m.predict(pd.DataFrame({'prompt': ['a sks toy'], 'seed': [1], 'steps': [2]}))))"
    )
    script = f'set -a; . /workspace/.atelier/customers/{customer}.env; set +a; exec python3 -c "{code}"'
    return stack.cli(
        "env", "-i", "PATH=/opt/atelier/venv/bin:/usr/bin:/bin", "HOME=/home/atelier", "HF_HUB_OFFLINE=1", "sh", "-c", script, check=False
    )


@pytest.fixture(scope="module")
def trained(stack, tmp_path_factory):
    _add_subject(stack, tmp_path_factory, "acme", "robot")
    _add_subject(stack, tmp_path_factory, "globex", "widget")
    stack.cli("sh", "-c", "cat > /workspace/schedules.yaml", stdin=SCHEDULES)
    stack.cli("atelier", "deploy")
    runs = {}
    for name in ("retrain-acme-robot", "retrain-globex-widget"):  # one after the other: two trainings on 2 cores thrash
        stack.cli("atelier", "run", name)
        runs.update(_wait_for(stack, {name}))
    for customer in ("acme", "globex"):
        done = stack.cli("atelier", "customer", "add", customer)
        assert "AWS_SECRET_ACCESS_KEY=" not in done.stdout  # the keys are in a 0600 file, not the output
    return runs


def test_two_customers_fine_tune_in_flow_run_containers_of_the_docker_pool(stack, trained):
    for name, run in trained.items():
        assert run["state_type"] == "COMPLETED", (name, run["state_name"], stack.run("logs", "--tail", "80", check=False).stdout[-6000:])
        # the worker started a container for it: Prefect records the container as the run's infrastructure
        assert run["work_pool_name"] == "atelier" and run["infrastructure_pid"], run
    containers = {r["infrastructure_pid"] for r in trained.values()}
    assert len(containers) == 2
    # two workers serve the pool (a second machine is one more of them)
    workers = stack.prefect("/work_pools/atelier/workers/filter", {})
    assert len([w for w in workers if w["status"] == "ONLINE"]) == 2, workers
    listed = stack.cli("atelier", "models").stdout
    assert "dreambooth-acme-robot" in listed and "dreambooth-globex-widget" in listed


def test_no_deployment_or_flow_run_can_choose_the_container(stack, trained):
    deployment = next(d for d in stack.prefect("/deployments/filter", {"limit": 50}) if d["name"] == "retrain-acme-robot")
    for job_variables in ({"image": "busybox"}, {"command": "id"}, {"volumes": ["/:/host"]}, {"env": {"AWS_SECRET_ACCESS_KEY": "x"}}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            stack.prefect(f"/deployments/{deployment['id']}/create_flow_run", {"job_variables": job_variables})
        assert refused.value.code == 422, job_variables


def test_batch_generation_runs_in_a_container_and_writes_s3(stack, trained):
    lines = "".join(json.dumps({"id": f"item-{i}", "prompt": f"a sks toy number {i}", "steps": 4}) + "\n" for i in range(2))
    stack.s3().put_object(Bucket="atelier", Key="in/prompts.jsonl", Body=lines.encode())
    stack.cli("atelier", "run", "batch-acme-robot")
    run = _wait_for(stack, {"batch-acme-robot"}, timeout=600)["batch-acme-robot"]
    assert run["state_type"] == "COMPLETED", run["state_name"]
    keys = {o["Key"] for o in stack.s3().list_objects_v2(Bucket="atelier", Prefix="out/acme/").get("Contents", [])}
    assert {"out/acme/images/item-0.png", "out/acme/images/item-1.png", "out/acme/manifest.jsonl"} <= keys


def test_each_customer_loads_its_own_champion_only_and_the_ledger_verifies(stack, trained):
    own = _load_as(stack, "acme", "dreambooth-acme-robot@champion")
    assert own.returncode == 0 and "ROWS 1" in own.stdout, own.stderr[-3000:]
    other = _load_as(stack, "acme", "dreambooth-globex-widget@champion")
    assert other.returncode != 0 and ("PERMISSION_DENIED" in other.stderr or "403" in other.stderr), other.stderr[-2000:]
    other = _load_as(stack, "globex", "dreambooth-acme-robot@champion")
    assert other.returncode != 0 and ("PERMISSION_DENIED" in other.stderr or "403" in other.stderr), other.stderr[-2000:]
    verified = stack.cli("atelier", "ledger", "verify")
    assert "verified" in verified.stdout.lower() or verified.returncode == 0


def _customer_env(stack, customer: str) -> dict[str, str]:
    text = stack.cli("cat", f"/workspace/.atelier/customers/{customer}.env").stdout
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_the_cross_tenant_matrix_of_atelier_up_is_refused_by_the_compose_stack_too(stack, trained):
    """tests/trust_matrix.py, the requests test_stack_trust.py makes of `atelier up`'s stack, at this stack's ports."""
    from types import SimpleNamespace

    import requests

    from tests.trust_matrix import cross_tenant_refusals

    env = {
        "ATELIER_TRACKING_URI": f"http://127.0.0.1:{stack.mlflow_port}",
        "ATELIER_S3_ENDPOINT_URL": f"http://127.0.0.1:{stack.s3_port}",
        "ATELIER_PREFECT_API_URL": f"http://127.0.0.1:{stack.prefect_port}/api",
        "ATELIER_PREFECT_API_AUTH_STRING": stack.values["PREFECT_AUTH_STRING"],
        "AWS_ACCESS_KEY_ID": stack.values["S3_ACCESS_KEY"],
    }
    admin = ("atelier-ops", stack.values["MLFLOW_ADMIN_PASSWORD"])
    api = f"{env['ATELIER_TRACKING_URI']}/api/2.0/mlflow"
    champion = requests.get(f"{api}/registered-models/alias?name=dreambooth-acme-robot&alias=champion", auth=admin, timeout=30)
    version = champion.json()["model_version"]
    experiment = requests.get(f"{api}/experiments/get-by-name?experiment_name=atelier-acme", auth=admin, timeout=30).json()
    keys = [o["Key"] for o in stack.s3().list_objects_v2(Bucket="atelier", Prefix="mlflow/").get("Contents", [])]
    tenants = {
        "creds": {c: _customer_env(stack, c) for c in ("acme", "globex")},
        "acme_version": SimpleNamespace(version=version["version"]),
        "acme_run": version["run_id"],
        "acme_experiment": experiment["experiment"]["experiment_id"],
        "acme_object": next(k for k in keys if k.startswith("mlflow/acme/") and k.endswith("MLmodel")),
        "globex_object": next(k for k in keys if k.startswith("mlflow/globex/") and k.endswith("MLmodel")),
    }
    deployment = next(d for d in stack.prefect("/deployments/filter", {"limit": 50}) if d["name"] == "retrain-acme-robot")
    refused = cross_tenant_refusals(env, tenants, deployment["id"], "touch /workspace/command-override-ran")
    print(f"{len(refused)} attempts, {sum(refused.values())} refused")
    assert len(refused) >= 30
    assert [name for name, ok in refused.items() if not ok] == []
    assert stack.cli("test", "-e", "/workspace/command-override-ran", check=False).returncode == 1
    # SeaweedFS's master, volume and filer are not published at all (and inside, mutual TLS as with `atelier up`)
    published = subprocess.run(["docker", "port", f"{stack.project}_s3_1"], capture_output=True, text=True).stdout
    assert published.strip().startswith("9000/tcp -> 127.0.0.1:") and len(published.strip().splitlines()) == 1, published


def test_down_and_up_keep_both_champions(stack, trained):
    stack.run("down", timeout=300)
    stack.up()
    for customer, model in (("acme", "dreambooth-acme-robot@champion"), ("globex", "dreambooth-globex-widget@champion")):
        done = _load_as(stack, customer, model)
        assert done.returncode == 0 and "ROWS 1" in done.stdout, done.stderr[-3000:]
