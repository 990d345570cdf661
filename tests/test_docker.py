"""docker/, checked without an engine (tests/test_containers.py builds and runs it): the compose file against
the Compose Specification's JSON schema (vendored in check-jsonschema), the Dockerfiles with hadolint,
and both against what `atelier up` runs, so the two topologies cannot drift apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_file_follows_the_compose_specification():
    done = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DOCKER / "compose.yaml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfiles_pass_hadolint():
    done = subprocess.run(
        [str(BIN / "hadolint"), *(str(DOCKER / n) for n in ("Dockerfile", "Dockerfile.trainer", "Dockerfile.postgres"))],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_gives_clients_the_settings_that_atelier_up_writes(settings):
    from atelier.cli.stack_processes import client_environment, database_names

    compose = _compose()
    services = compose["services"]
    operator = services["cli"]["environment"]
    # every setting `atelier up` writes to stack.env, except the workspace (the image's /workspace)
    assert set(client_environment(settings)) - {"ATELIER_WORKSPACE"} <= set(operator)
    assert services["setup"]["environment"].items() >= operator.items()
    for name in ("worker-1", "worker-2"):
        env = services[name]["environment"]
        assert env["ATELIER_TRACKING_USERNAME"] == "atelier-worker"  # not the admin
        assert env["PREFECT_RESULTS_DEFAULT_SERIALIZER"] == "atelier-json"
    # one role per database, named after it, as `atelier up` names the databases
    text = (DOCKER / "compose.yaml").read_text()
    for db in database_names(settings).values():
        assert f"{db}:${{ATELIER_DB_PASSWORD_{db.removeprefix('atelier_').upper()}" in text and f"@postgres:5432/{db}" in text
    assert all(operator[k].startswith("s3://atelier/") for k in ("ATELIER_ARTIFACT_ROOT", "ATELIER_DVC_REMOTE", "ATELIER_PREFECT_RESULTS"))
    assert "--default-artifact-root s3://atelier/mlflow" in " ".join(services["mlflow"]["command"])


def test_compose_requires_credentials_everywhere_and_publishes_on_loopback_only():
    compose = _compose()
    text = (DOCKER / "compose.yaml").read_text()
    assert ":-atelier" not in text and "atelier-secret" not in text  # no default password anywhere
    template = (DOCKER / "env.template").read_text()
    names = [line.split("=", 1)[0] for line in template.splitlines() if "=" in line and not line.startswith("#")]
    secrets = [n for n in names if any(word in n for word in ("PASSWORD", "SECRET", "KEY", "JWT", "AUTH_STRING"))]
    assert len(secrets) == 15
    for var in secrets:
        assert f"${{{var}:?" in text, f"{var} has no required-variable check"
    mlflow = " ".join(compose["services"]["mlflow"]["command"])
    assert "--app-name atelier-auth" in mlflow and "password" not in mlflow.lower().replace("_password", "")
    assert "PREFECT_SERVER_API_AUTH_STRING" in compose["services"]["prefect"]["environment"]
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
        assert "privileged" not in service
        if "/var/run/docker.sock:/var/run/docker.sock" in service.get("volumes", []):
            assert name in ("worker-1", "worker-2", "trainer"), f"{name} sees the Docker socket"
    assert "minio" not in text.lower()
    # the GPU pool's flow runs train in the resident trainer, which holds no credential and no Docker socket
    resident, gpu_worker = compose["services"]["resident-trainer"], compose["services"]["trainer"]
    assert resident["environment"] == {"ATELIER_TRAINER_SOCKET": gpu_worker["environment"]["ATELIER_TRAINER_SOCKET"]}
    assert resident["volumes"] == ["workspace:/workspace"] and "resident-trainer" in gpu_worker["depends_on"]


def test_images_install_only_from_the_wheelhouse_and_every_package_of_the_project():
    import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    for name in ("Dockerfile", "Dockerfile.trainer"):
        text = (DOCKER / name).read_text()
        assert "FROM ${BASE}" in text and "ARG BASE=atelier-base:bookworm" in text  # built here, no registry
        installs = [line for line in text.splitlines() if "pip install" in line]
        assert installs and all("--no-index" in line for line in installs), installs
        assert "USER 1000:1000" in text
        for folder in folders:  # every folder of the atelier import root
            assert f"COPY {folder} /opt/atelier/src/{folder}" in text, f"{name} does not copy {folder}"
    for name in ("Dockerfile", "Dockerfile.trainer", "Dockerfile.postgres"):
        text = (DOCKER / name).read_text()
        assert not any(word in text for word in ("PASSWORD=", "SECRET=", "_KEY=")), f"{name} bakes a secret"


def test_the_docker_pool_takes_no_job_variables_and_passes_the_worker_settings():
    from atelier.flows.docker_worker import docker_job_template, flow_environment

    template = docker_job_template("atelier:abc", "p_default", "p_workspace")
    assert template["variables"] == {"type": "object", "properties": {}, "additionalProperties": False}
    job = template["job_configuration"]
    assert job["image_pull_policy"] == "Never" and job["privileged"] is False and "env" not in job
    assert job["volumes"] == ["p_workspace:/workspace"] and job["networks"] == ["p_default"]
    gpu = docker_job_template("t", "n", "v", gpus=True)["job_configuration"]["container_create_kwargs"]
    assert gpu["device_requests"][0]["capabilities"] == [["gpu"]]
    env = flow_environment(
        {"ATELIER_LEDGER_URL": "x", "AWS_SECRET_ACCESS_KEY": "y", "HOME": "/root", "PREFECT_API_KEY": "z", "SSH_AUTH_SOCK": "s"}
    )
    assert env == {"ATELIER_LEDGER_URL": "x", "AWS_SECRET_ACCESS_KEY": "y"}


def test_new_env_fills_every_secret_once_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / ".env"
    run = [sys.executable, str(DOCKER / "new_env.py"), "--out", str(out), "--project", "p1", "--docker-gid", "998"]
    first = subprocess.run(run, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    values = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line and not line.startswith("#"))
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert all(values.values()), [k for k, v in values.items() if not v]
    assert len({v for k, v in values.items() if "PASSWORD" in k}) == 7  # the superuser, each database role and each MLflow user its own
    assert values["PREFECT_AUTH_STRING"].startswith("atelier:") and values["DOCKER_GID"] == "998"
    assert not any(v in first.stdout for v in values.values() if len(v) > 20)  # never printed
    before = out.read_text()
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode == 2 and out.read_text() == before
