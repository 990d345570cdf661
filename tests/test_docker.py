"""docker/: no Docker engine runs here, so the files are checked statically. The compose file against
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
        [str(BIN / "hadolint"), str(DOCKER / "Dockerfile.worker"), str(DOCKER / "Dockerfile.trainer")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_gives_clients_the_settings_that_atelier_up_writes(settings):
    from atelier.cli.stack_processes import client_environment, database_names

    compose = _compose()
    env = compose["x-atelier-env"]
    assert set(client_environment(settings)) <= set(env)
    for name in ("setup", "worker"):
        assert compose["services"][name]["environment"] == env
    mlflow = compose["services"]["mlflow"]
    assert env.items() <= mlflow["environment"].items()
    assert compose["services"]["trainer"]["environment"]["ATELIER_WORK_POOL"] == "atelier-gpu"
    init = (DOCKER / "postgres-init.sql").read_text()
    for db in database_names(settings).values():
        assert f"CREATE DATABASE {db};" in init
        assert any(db in str(v) for v in (env["ATELIER_LEDGER_URL"], mlflow["environment"], compose["services"]["prefect"]["environment"]))
    # the same bucket layout as `atelier up`: mlflow/, dvc/, prefect-results/
    assert (
        compose["services"]["mlflow"]["command"][compose["services"]["mlflow"]["command"].index("--default-artifact-root") + 1]
        == env["ATELIER_ARTIFACT_ROOT"]
    )
    assert all(env[k].startswith("s3://atelier/") for k in ("ATELIER_ARTIFACT_ROOT", "ATELIER_DVC_REMOTE", "ATELIER_PREFECT_RESULTS"))


def test_compose_requires_credentials_everywhere_and_publishes_on_loopback_only():
    compose = _compose()
    text = (DOCKER / "compose.yaml").read_text()
    assert ":-atelier" not in text and "atelier-secret" not in text  # no default password anywhere
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET", "PREFECT_AUTH_STRING"):
        assert f"${{{var}:?" in text, f"{var} has no required-variable check"
    mlflow = compose["services"]["mlflow"]
    assert mlflow["command"][mlflow["command"].index("--app-name") + 1] == "atelier-auth"
    assert "password" not in " ".join(mlflow["command"]).lower() and "postgres" not in " ".join(mlflow["command"])
    assert "PREFECT_SERVER_API_AUTH_STRING" in compose["services"]["prefect"]["environment"]
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_images_install_the_lock_and_every_package_of_the_project():
    import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    for name in ("Dockerfile.worker", "Dockerfile.trainer"):
        text = (DOCKER / name).read_text()
        assert "pip install --no-deps -r requirements/lock.txt" in text
        assert "torch==2.13.0" in text
        for folder in folders:  # every folder of the atelier import root
            assert f"COPY {folder} {folder}" in text, f"{name} does not copy {folder}"
    assert "prefecthq/prefect:3.8.8" in _compose()["services"]["prefect"]["image"]  # the server matches the client pin
