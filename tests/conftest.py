"""Test set-up. One Atelier workspace and one Prefect test harness per session: a temporary Prefect
server costs seconds to start, and the tiny base model seconds to build.

The environment is set before anything imports Prefect, which reads its settings at import.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

SESSION_ROOT = Path(tempfile.mkdtemp(prefix="atelier-tests-"))
os.environ["ATELIER_WORKSPACE"] = str(SESSION_ROOT / "workspace")
os.environ["ATELIER_PREFECT_SERVER"] = "temporary"  # CLI subprocesses leave no background server behind (test_local_servers starts its own)
(SESSION_ROOT / "workspace").mkdir()
os.environ.pop("ATELIER_CONFIG", None)
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

from atelier.kernel.settings import load_settings  # noqa: E402

load_settings().apply_environment()

from tests.stack_harness import stack  # noqa: E402,F401 (the session's `atelier up` stack, for the integration modules)


def pytest_collection_modifyitems(session, config, items):  # noqa: ARG001
    """The container tests last, so the images they need build in the background meanwhile."""
    containers = [item for item in items if item.get_closest_marker("container")]
    if containers:
        items[:] = [item for item in items if not item.get_closest_marker("container")] + containers


def pytest_collection_finish(session):
    """Start building the container tests' images now (tests/container_engine.py): about four minutes on a fresh
    2-core machine, mostly spent waiting on downloads and layer writes, overlapped with the rest of the suite."""
    if session.config.option.collectonly or os.environ.get("ATELIER_PREBUILD_IMAGES") == "0":
        return
    if any(item.get_closest_marker("container") for item in session.items):
        from tests import container_engine

        container_engine.start_build()


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001
    from tests import container_engine

    container_engine.stop()
    shutil.rmtree(SESSION_ROOT, ignore_errors=True)


@pytest.fixture(autouse=True)
def _compile_caches_stay_with_their_test(monkeypatch):
    """keep_compiles points the process's torch.compile and Triton caches at a workspace (in os.environ);
    a later test, or a command it starts, must not inherit an earlier test's folder."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "")  # records what was there (or that nothing was): put back after the test
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def settings():
    return load_settings()


@pytest.fixture(scope="session")
def workspace(settings):
    """The session's initialised workspace, with the tiny base model built once."""
    from atelier.kernel.workspace import init_workspace
    from atelier.models.dreambooth.tiny import write_tiny_model

    init_workspace(settings)
    write_tiny_model(settings.tiny_model_dir)
    return settings


@pytest.fixture(scope="session")
def tiny_model(workspace) -> Path:
    return workspace.tiny_model_dir


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    from atelier.cli.demo_data import write_demo_photos

    return write_demo_photos(tmp_path / "photos", count=5)


@pytest.fixture
def tiny_config():
    from atelier.models.dreambooth.config import load_train_config
    from atelier.tasks.dreambooth import TINY_CONFIG

    return load_train_config(TINY_CONFIG)
