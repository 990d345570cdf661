"""The production stack of `atelier up` for the integration tests: one per test session, on free ports
and databases of its own (dropped at the end), shared by test_stack.py (flows on the stack, outages)
and test_stack_trust.py (tenant isolation, durability), which run in that order on it.

Every command runs as a user would run it, in its own process, with only the settings of the stack's
env file."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ports import free_ports

ATELIER = str(Path(sys.executable).parent / "atelier")
PREFECT = str(Path(sys.executable).parent / "prefect")
BUCKET = "atelier"


def _postgres_up() -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", 5432)) == 0


class Stack:
    def __init__(self, root: Path) -> None:
        self.ws = root / "ws"
        self.prefix = f"atelier_it_{os.getpid()}"
        internal = free_ports(7, consecutive=True)  # SeaweedFS's internal servers
        prefect_port, mlflow_port, s3_port = free_ports(3, avoid=internal)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ATELIER_", "AWS_"))}
        base.update(
            {
                "ATELIER_WORKSPACE": str(self.ws),
                "ATELIER_STACK__DATABASE_PREFIX": self.prefix,
                "ATELIER_STACK__PREFECT_PORT": str(prefect_port),
                "ATELIER_STACK__MLFLOW_PORT": str(mlflow_port),
                "ATELIER_STACK__S3_PORT": str(s3_port),
                "ATELIER_STACK__S3_INTERNAL_PORT": str(internal[0]),
                "ATELIER_STACK__WORKER_LIMIT": "1",
                "PREFECT_LOGGING_LEVEL": "INFO",
            }
        )
        self.env = base
        self.up_output = ""
        self.server_home = root

    def run(self, *args: str, check: bool = True, extra: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        done = subprocess.run(
            list(args), env={**self.env, **(extra or {})}, capture_output=True, text=True, timeout=timeout, cwd=self.ws.parent
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args[:4])} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def load_env_file(self) -> None:
        from atelier.cli.stack_processes import read_env_file

        self.env.update(read_env_file(self.ws / ".atelier" / "stack" / "stack.env"))

    def s3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.env["ATELIER_S3_ENDPOINT_URL"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def sql(self, part: str, query: str, *params) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=f"{self.prefix}_{part}")
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                rows = cur.fetchall() if cur.description else []  # an UPDATE (a test playing the attacker) has none
            conn.commit()
            return rows
        finally:
            conn.close()

    def mlflow(self, user: str | None = None, password: str | None = None):
        """A client of the stack's MLflow as the platform's identity, or as `user`."""
        from mlflow import MlflowClient

        os.environ["MLFLOW_TRACKING_USERNAME"] = user or self.env["ATELIER_TRACKING_USERNAME"]
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password or self.env["ATELIER_TRACKING_PASSWORD"]
        return MlflowClient(self.env["ATELIER_TRACKING_URI"])

    def kill(self, service: str) -> None:
        """SIGKILL the service's whole process group, as a crash would."""
        record = json.loads((self.ws / ".atelier" / "stack" / f"{service}.json").read_text())
        os.killpg(record["pid"], signal.SIGKILL)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    if not _postgres_up():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    s = Stack(tmp_path_factory.mktemp("stack"))
    try:
        t0 = time.perf_counter()
        up = s.run(ATELIER, "up")
        print(f"atelier up: {time.perf_counter() - t0:.1f} s\n{up.stdout}")
        assert "worker   running" in up.stdout
        s.up_output = up.stdout
        s.server_home = Path(re.search(r"servers' state in (\S+);", up.stdout).group(1))
        assert not any(
            secret in up.stdout + up.stderr for secret in json.loads((s.ws / ".atelier/stack/secrets.json").read_text()).values()
        )
        s.load_env_file()
        s.run(ATELIER, "init")
        from atelier.cli.demo_data import write_demo_photos

        for subject in ("robot", "robot2", "robot3"):
            photos = write_demo_photos(s.ws.parent / f"photos-{subject}", count=5)
            s.run(ATELIER, "subject", "add", "acme", subject, *map(str, photos), "--class", "toy")
        yield s
    finally:
        s.run(ATELIER, "down", "--drop-databases", check=False)
        if str(getattr(s, "server_home", "")).startswith("/var/lib/atelier/stacks/"):
            shutil.rmtree(s.server_home, ignore_errors=True)  # the service user's copy of this test's data
