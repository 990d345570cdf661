"""What the production topology costs a flow run, against the embedded default, in one command.

    python benchmarks/stack.py [--repeats 2]

Starts `atelier up` on free ports with databases of its own (dropped at the end; PostgreSQL must run
on 127.0.0.1:5432), makes two workspaces with the same demo subject, one embedded (SQLite, folders,
a temporary Prefect server per run) and one on the stack (Prefect and MLflow servers on PostgreSQL,
S3), then times, alternating the two:
  first run   `atelier finetune` of a new subject: train, sample, judge, register, gate
  rerun       the same again: every cached task reused, no new version
  batch       `atelier batch-generate` of 8 items (manifest and outputs local / in S3)
Each is a fresh `atelier` process, as a user runs it. Prints seconds and stack/embedded ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ATELIER = str(Path(sys.executable).parent / "atelier")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(env: dict, *args: str) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([ATELIER, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"atelier {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="subjects trained per topology (each a first run and a rerun)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="atelier-stack-bench-"))
    prefix = f"atelier_bench_{os.getpid()}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ATELIER_", "AWS_"))}
    base["PREFECT_LOGGING_LEVEL"] = "WARNING"
    embedded = {**base, "ATELIER_WORKSPACE": str(root / "embedded")}
    stack = {
        **base,
        "ATELIER_WORKSPACE": str(root / "stack"),
        "ATELIER_STACK__DATABASE_PREFIX": prefix,
        "ATELIER_STACK__PREFECT_PORT": str(_port()),
        "ATELIER_STACK__MLFLOW_PORT": str(_port()),
        "ATELIER_STACK__S3_PORT": str(_port()),
    }
    try:
        print(f"atelier up: {_run(stack, 'up'):.1f} s")
        from atelier.cli.stack_processes import read_env_file

        stack.update(read_env_file(root / "stack" / ".atelier" / "stack" / "stack.env"))
        from atelier.cli.demo_data import write_demo_photos

        times: dict[str, dict[str, list[float]]] = {"embedded": {}, "stack": {}}
        for env in (embedded, stack):
            _run(env, "init")
        for i in range(args.repeats):
            for name, env in (("embedded", embedded), ("stack", stack)):
                subject = f"robot{i}"  # another photo count per subject: another training, not a reused one
                photos = [str(p) for p in write_demo_photos(root / f"photos{i}", count=5 + i)]
                _run(env, "subject", "add", "acme", subject, *photos, "--class", "toy")
                t = times[name]
                t.setdefault("first run", []).append(_run(env, "finetune", "acme", subject))
                t.setdefault("rerun", []).append(_run(env, "finetune", "acme", subject))
                manifest = root / f"{name}-{i}.jsonl"
                manifest.write_text("".join(json.dumps({"id": f"i{k}", "prompt": f"a sks toy {k}", "steps": 8}) + "\n" for k in range(8)))
                if name == "stack":
                    import boto3

                    s3 = boto3.client(
                        "s3",
                        endpoint_url=env["ATELIER_S3_ENDPOINT_URL"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                        region_name=env["AWS_DEFAULT_REGION"],
                    )
                    s3.upload_file(str(manifest), "atelier", manifest.name)
                    src, out = f"s3://atelier/{manifest.name}", f"s3://atelier/bench-out/{i}"
                else:
                    src, out = str(manifest), str(root / f"out-{i}")
                t.setdefault("batch", []).append(_run(env, "batch-generate", "acme", subject, "--manifest", src, "--out", out))
        print(f"\n{'run':<10} {'embedded s':>11} {'stack s':>9} {'stack/embedded':>15}   (median of {args.repeats}, alternating)")
        for what in ("first run", "rerun", "batch"):
            e, s = statistics.median(times["embedded"][what]), statistics.median(times["stack"][what])
            print(f"{what:<10} {e:>11.1f} {s:>9.1f} {s / e:>14.2f}x")
    finally:
        subprocess.run([ATELIER, "down", "--drop-databases"], env=stack, capture_output=True)


if __name__ == "__main__":
    main()
