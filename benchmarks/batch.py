"""Per-item overhead of batch generation against calling the pipeline directly, in one process.

    python benchmarks/batch.py [--items 64] [--steps 25] [--batch-size 8] [--repeats 3] [--model dreambooth-acme-robot@champion]

Needs a workspace with a registered subject model (`make demo` makes one; ATELIER_WORKSPACE picks
another). The same pipeline object (loaded from the registry) serves every variant, run interleaved:
  direct       models.dreambooth.sampling.generate() on the requests, images kept in memory
  direct+png   the same, each image saved as a PNG file (what any caller does at the least)
  batch core   models.batch.generate.run_generation(): PNG, sha256, atomic writes of image and record
  batch flow   the batch-generate Prefect flow end to end (pin, manifest, load from the registry,
               generate, output manifest, report), once, after the others
Target (issue 5): batch core at most 5% per-item overhead over direct.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="dreambooth-acme-robot@champion")
    args = ap.parse_args()

    from atelier.kernel.settings import load_settings

    settings = load_settings()
    settings.apply_environment()
    from atelier.kernel.objectstore import LocalStore
    from atelier.models.batch.generate import run_generation
    from atelier.models.batch.manifest import parse_generation_manifest
    from atelier.models.dreambooth.sampling import GenerationRequest, generate
    from atelier.registry.serving import load_python_model, pin

    pinned = pin(settings, args.model)
    model = load_python_model(settings, pinned.name, pinned.version)
    text = "".join(
        json.dumps({"id": f"i{k:04d}", "prompt": f"a sks toy, picture {k}", "steps": args.steps}) + "\n" for k in range(args.items)
    )
    items, _ = parse_generation_manifest(text)
    requests = [
        GenerationRequest(prompt=i.prompt, seed=i.seed, steps=args.steps, guidance_scale=model.defaults["guidance_scale"]) for i in items
    ]
    tmp = Path(tempfile.mkdtemp(prefix="atelier-batch-bench-"))

    def direct() -> None:
        generate(model.pipe, requests, batch_size=args.batch_size)

    def direct_png(run: int) -> None:
        out = tmp / f"png-{run}"
        out.mkdir()
        generate(model.pipe, requests, batch_size=args.batch_size, on_image=lambda k, img: img.save(out / f"{k}.png"))

    def core(run: int) -> None:
        run_generation(model.pipe, items, LocalStore(tmp / f"core-{run}"), pinned.model, model.defaults, args.batch_size)

    direct()  # warm-up
    times: dict[str, list[float]] = {"direct": [], "direct+png": [], "batch core": []}
    cpu: dict[str, list[float]] = {name: [] for name in times}
    for run in range(args.repeats):
        for name, fn in (("direct", direct), ("direct+png", lambda: direct_png(run)), ("batch core", lambda: core(run))):  # noqa: B023 (called in this iteration)
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)

    from atelier.flows.batch import batch_generate

    manifest = tmp / "manifest.jsonl"
    manifest.write_text(text)
    customer, subject = pinned.name.split("-")[1:3]
    t, c = time.perf_counter(), time.process_time()
    batch_generate(customer, subject, str(manifest), str(tmp / "flow"), args.model, args.batch_size)
    times["batch flow"], cpu["batch flow"] = [time.perf_counter() - t], [time.process_time() - c]

    # the fastest of the interleaved runs: this work is deterministic, so the spread is other load
    base = min(times["direct"])
    print(f"\n{args.items} items, {args.steps} steps, batch {args.batch_size}, {pinned.model}, fastest of {args.repeats} interleaved runs")
    print(f"{'variant':<14}{'seconds':>9}{'ms/item':>9}{'overhead/item':>15}{'ratio':>8}{'median s':>10}{'cpu s':>8}")
    for name, ts in times.items():
        m = min(ts)
        print(
            f"{name:<14}{m:>9.2f}{1000 * m / args.items:>9.1f}{1000 * (m - base) / args.items:>12.2f} ms{m / base:>8.3f}"
            f"{statistics.median(ts):>10.2f}{min(cpu[name]):>8.1f}"
        )
    core_ratio = min(times["batch core"]) / base
    print(
        f"\nbatch core per-item overhead over direct: {100 * (core_ratio - 1):+.1f}% (target <= 5%); "
        f"the flow adds a fixed {min(times['batch flow']) - min(times['batch core']):.1f} s per run (Prefect, registry load)"
    )


if __name__ == "__main__":
    main()
