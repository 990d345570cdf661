"""The Docker engine and the images for tests/test_containers.py, shared with conftest.py so the images can be
built in the background while the rest of the suite runs.

Building the images (`make images`: the Debian base, the wheelhouse, two `docker build`s) takes about four minutes
on a fresh 2-core machine and keeps only about one core busy (downloads, layer writes). When the session has
container tests, conftest.py starts the build as soon as the tests are collected and moves the container module
to the end of the session; the module's `stack` fixture then waits for that build instead of starting its own.
A build that fails is reported by the fixture, with its output, exactly as one it ran itself."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERD_FLAGS = ["--storage-driver=overlay2", "--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-masq=false"]
BUILD_TIMEOUT = 2400


def docker_answers() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0


class _State:
    dockerd: subprocess.Popen | None = None  # one this process started (stopped by pid at the end)
    dockerd_log: Path | None = None
    build: subprocess.Popen | None = None
    build_log: Path | None = None
    build_started = 0.0


def start_engine() -> str | None:
    """Make sure a Docker engine answers: the machine's, or a dockerd started here. None when one answers,
    else why none can (for the fixture to skip or fail with)."""
    if docker_answers():
        return None
    if not (shutil.which("dockerd") and shutil.which("docker")):
        return "no Docker engine here (Debian: apt-get install docker.io docker-compose mmdebstrap)"
    if os.geteuid() != 0:
        return "the Docker engine is not running and starting one needs root"
    if _State.dockerd is None or _State.dockerd.poll() is not None:
        _State.dockerd_log = Path(tempfile.mkdtemp(prefix="atelier-dockerd-")) / "dockerd.log"
        _State.dockerd = subprocess.Popen(
            ["dockerd", *DOCKERD_FLAGS], stdout=_State.dockerd_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 60
    while not docker_answers():
        if _State.dockerd.poll() is not None or time.monotonic() > deadline:
            _State.dockerd.kill()
            return f"dockerd did not start: {_State.dockerd_log.read_text()[-1500:]}"
        time.sleep(1)
    return None


def start_build() -> bool:
    """Start `make images` in the background when an engine answers (or can be started); True if it runs."""
    if _State.build is not None:
        return True
    if start_engine() is not None or not shutil.which("make"):
        return False
    _State.build_log = Path(tempfile.mkdtemp(prefix="atelier-images-")) / "make-images.log"
    _State.build_started = time.monotonic()
    _State.build = subprocess.Popen(
        ["make", "images", "PY=python3"], cwd=ROOT, stdout=_State.build_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    return True


def built_images() -> tuple[int, str]:
    """Wait for the images (starting the build now if none was started): the build's exit code and output."""
    if not start_build():
        done = subprocess.run(["make", "images", "PY=python3"], cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        return done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
    left = BUILD_TIMEOUT - (time.monotonic() - _State.build_started)
    try:
        code = _State.build.wait(timeout=max(left, 1))
    except subprocess.TimeoutExpired:
        _State.build.kill()
        code = -9
    return code, _State.build_log.read_text(errors="replace")[-6000:]


def stop() -> None:
    """At the end of the session: a build still running is killed (make and what it started), a dockerd
    started here is stopped, each by its own pid."""
    build, dockerd = _State.build, _State.dockerd
    _State.build = _State.dockerd = None
    if build is not None and build.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(build.pid, signal.SIGTERM)  # its own session: make's group holds the docker build it runs
        with contextlib.suppress(subprocess.TimeoutExpired):
            build.wait(30)
    if dockerd is not None and dockerd.poll() is None:
        dockerd.terminate()
        try:
            dockerd.wait(30)
        except subprocess.TimeoutExpired:
            dockerd.kill()
