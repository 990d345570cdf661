"""How long a Prefect-backed command waits before it works: a temporary Prefect server per command
(ATELIER_PREFECT_SERVER=temporary, the old default) against the workspace's background server.

    python benchmarks/prefect_server.py [--repeats 3]

Each measurement is a whole `atelier runs` process (Python start, imports, Prefect, one API read) in a
fresh workspace; the background server's one-off start is reported apart. Alternating, median of N.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(env: dict[str, str], *args: str) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "atelier.cli", *args], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"atelier {' '.join(args)} failed: {done.stderr[-800:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="atelier-prefect-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "ATELIER_PREFECT_SERVER"}
    env["ATELIER_WORKSPACE"] = str(root / "ws")
    _timed(env, "init")
    temporary_env = {**env, "ATELIER_PREFECT_SERVER": "temporary"}
    try:
        first = _timed(env, "runs")  # starts the background server
        temporary, background = [], []
        for _ in range(args.repeats):
            temporary.append(_timed(temporary_env, "runs"))
            background.append(_timed(env, "runs"))
    finally:
        _timed(env, "down")
    t, b = statistics.median(temporary), statistics.median(background)
    print(f"`atelier runs`, whole command, median of {args.repeats} (alternating):")
    print(f"  temporary Prefect server per command: {t:6.1f} s")
    print(f"  workspace's background server:        {b:6.1f} s   ({t / b:.1f}x faster)")
    print(f"  the background server's one-off start (first command): {first:.1f} s")


if __name__ == "__main__":
    main()
