"""Peak memory and wall time of whole commands, as a user waits for them: the command's process and every
process it starts (Prefect's server, flow runs, DVC), sampled every 0.1 s, resident memory summed.

    python benchmarks/memory.py                      # `atelier demo` in a fresh workspace, then ocr-calibrate
                                                     # with MinMax (the default) against Percentile (the old default)
    python benchmarks/memory.py --skip-baseline      # without the Percentile run (it needs about 16 GB)
    python benchmarks/memory.py -- atelier info      # any command
    python benchmarks/memory.py --everyday           # `atelier demo`, then every everyday command in its workspace,
                                                     # each against `atelier --version` (the CLI's floor)

Prints one line per command: wall seconds, peak resident GB, and the ratio to the baseline where there is one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(argv: list[str], env: dict[str, str], timeout: float = 3600) -> tuple[float, float, int]:
    """(wall s, peak RSS of the process tree in GB, exit code)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    code = proc.wait()
    if code != 0:
        print(f"  {' '.join(argv[:4])} exited {code}: {proc.stderr.read()[-600:]}", file=sys.stderr)
    return time.perf_counter() - t0, peak / 2**30, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-baseline", action="store_true", help="do not run ocr-calibrate --method Percentile")
    parser.add_argument("--everyday", action="store_true", help="after the demo, every everyday command (no ocr-calibrate runs)")
    parser.add_argument("command", nargs="*", help="a command to measure instead (after --)")
    args = parser.parse_args()
    atelier = str(Path(sys.executable).parent / "atelier")
    with tempfile.TemporaryDirectory(prefix="atelier-mem-") as tmp:
        env = {**os.environ, "ATELIER_WORKSPACE": str(Path(tmp) / "workspace")}
        if args.command:
            wall, peak, _ = measure(args.command, env)
            print(f"{' '.join(args.command)}: {wall:.1f} s, peak {peak:.2f} GB")
            return
        rows = [("atelier demo (init, demo data, fine-tune, DVC stages, OCR calibration)", measure([atelier, "demo"], env))]
        if args.everyday:
            everyday(atelier, env, Path(tmp), rows)
            return
        fresh = {**env, "PREFECT_TASKS_REFRESH_CACHE": "true"}  # both recompute every task, as the demo's first run did
        rows.append(("atelier ocr-calibrate --method MinMax (default)", measure([atelier, "ocr-calibrate", "--method", "MinMax"], fresh)))
        if not args.skip_baseline:
            rows.append(
                (
                    "atelier ocr-calibrate --method Percentile (baseline)",
                    measure([atelier, "ocr-calibrate", "--method", "Percentile"], fresh),
                )
            )
        subprocess.run([atelier, "down"], env=env, capture_output=True)
    base = rows[-1][1] if not args.skip_baseline else None
    for name, (wall, peak, code) in rows:
        ratio = (
            f"  ({peak / base[1]:.2f}x the baseline's memory, {wall / base[0]:.2f}x its time)"
            if base and name.endswith("(default)")
            else ""
        )
        print(f"{name}: {wall:.1f} s, peak {peak:.2f} GB{'' if code == 0 else f', exit {code}'}{ratio}", flush=True)


def everyday(atelier: str, env: dict[str, str], tmp: Path, rows: list) -> None:
    """Each command a user runs in a day, in the demo's workspace, as a separate process: wall time and
    peak memory of its process tree, and the ratio to `atelier --version` (Python and the CLI alone)."""
    import json

    from atelier.cli.demo_data import write_demo_photos

    workspace = Path(env["ATELIER_WORKSPACE"])
    documents = workspace / "data" / "documents" / "synthetic" / "evaluation"
    manifest = tmp / "batch.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"i{i}", "prompt": f"a sks toy, view {i}"}) + "\n" for i in range(4)))
    photos = write_demo_photos(tmp / "photos", count=4)
    model = "dreambooth-acme-robot"
    commands = [
        ("atelier --version (the floor)", ["--version"]),
        ("atelier info", ["info"]),
        ("atelier subject list", ["subject", "list"]),
        ("atelier models", ["models"]),
        ("atelier lineage MODEL@champion", ["lineage", f"{model}@champion"]),
        ("atelier lineage MODEL@champion --verify", ["lineage", f"{model}@champion", "--verify"]),
        ("atelier compare MODEL@champion MODEL/1", ["compare", f"{model}@champion", f"{model}/1"]),
        ("atelier ledger verify", ["ledger", "verify"]),
        ("atelier audit", ["audit"]),
        ("atelier runs", ["runs"]),
        (
            "atelier generate MODEL@champion (1 prompt)",
            ["generate", f"{model}@champion", "--prompt", "a sks toy", "--out", str(tmp / "gen")],
        ),
        ("atelier batch-generate (4 items)", ["batch-generate", "acme", "robot", "--manifest", str(manifest), "--out", str(tmp / "batch")]),
        ("atelier ocr (the evaluation set's pages)", ["ocr", str(documents), "--out", str(tmp / "ocr.jsonl")]),
        ("atelier batch-ocr (the same pages)", ["batch-ocr", str(documents), "--out", str(tmp / "batch-ocr")]),
        ("atelier finetune acme robot (inputs unchanged: no-op)", ["finetune", "acme", "robot"]),
        ("atelier subject add (4 photos)", ["subject", "add", "acme", "second", "--class", "toy", *map(str, photos)]),
        ("atelier finetune acme second (a new subject)", ["finetune", "acme", "second"]),
    ]
    for name, argv in commands:
        rows.append((name, measure([atelier, *argv], env)))
    subprocess.run([atelier, "down"], env=env, capture_output=True)
    floor = rows[1][1][1]
    for name, (wall, peak, code) in rows:
        print(
            f"{name}: {wall:.1f} s, peak {peak:.2f} GB ({peak / floor:.1f}x the floor){'' if code == 0 else f', exit {code}'}", flush=True
        )


if __name__ == "__main__":
    main()
