"""The whole DreamBooth job, wall clock: class images + 800 training steps + the saved pipeline.

Used by `benchmarks/dreambooth_gpu.py --e2e`. Each row runs in a fresh process (so compiled graphs,
CUDA graphs and allocator caches of one row never weigh on the next) with its work folder removed at
its end (a row's checkpoints never fill the disk for the next), and reports its wall clock split into
start (loading models), compile (CUDA-graph capture or torch.compile), class images, training steps,
checkpoints, validation and save, with its peak GPU memory.

- baseline: what diffusers' examples/dreambooth/train_dreambooth.py does for this job: class images
  with StableDiffusionPipeline in fp16 (the model's PNDM scheduler, 50 steps, batch 4, saved as
  files), then the fp16 loop with a GradScaler (VAE and text encoder run every step, foreach AdamW),
  its default checkpoint at step 500 (the whole training state, as accelerate's save_state writes
  it), then the pipeline saved with save_pretrained.
- atelier: Atelier's own code path as the flow runs it, with configs/dreambooth/sd15.yaml's
  settings: class priors (ensure_class_priors: DPM-Solver++ 20 steps, batch 16), then train()
  (CUDA-graph step, checkpoints every 500 steps written in the background, validation samples every
  200 steps, the pipeline saved). "cold" starts with empty caches in a fresh process, which is also
  the second subject of a new class on the same base model: the default path compiles nothing, so
  there is nothing else to cache. "warm (priors cached)" is the second subject of the same class on
  the same base model (the class set comes from the cache). "compiled" adds torch.compile of the
  UNet (`compile_unet: true`), for comparison.
- atelier back to back: the resident trainer (models/dreambooth/service.py, `atelier trainer
  serve`, compiling inside the captured step as it does on a GPU) fed 8 subjects of one class, as 8 flow runs would feed it: its class images made once from a
  cold cache, then 8 trainings in one process, each pipeline written while the next subject trains.
  Its "subjects per GPU-hour" is compared with the example run 8 times (the baseline row once, then 7
  more without its class images, which the example finds in its class folder and keeps).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("baseline", "atelier cold", "atelier warm (priors cached)", "atelier back to back", "atelier compiled")
SUBJECTS = 8


def _peak() -> float:
    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else float("nan")


class _DeviceMemory:
    """The most device memory in use while the row runs, as nvidia-smi counts it (the CUDA context and
    every allocator's share included), polled every 100 ms."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if torch.cuda.is_available() else None

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, (total - free) / 2**30)

    def __enter__(self) -> "_DeviceMemory":
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def baseline_job(base: Path, instance: Path, work: Path, count: int, steps: int, size: int) -> dict:
    from diffusers import StableDiffusionPipeline

    from atelier.models.dreambooth.config import TrainConfig
    from atelier.models.dreambooth.images import stack_folder
    from benchmarks.dreambooth_gpu import example_ids, example_models, example_step

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    split = {}
    t = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(str(base), dtype=dtype, safety_checker=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    klass = work / "class"
    klass.mkdir(parents=True)
    for i in range(0, count, 4):
        for j, img in enumerate(pipe(["a photo of toy"] * min(4, count - i), num_inference_steps=50, height=size, width=size).images):
            img.save(klass / f"{i + j:04d}.jpg")
    del pipe
    torch.cuda.empty_cache() if cuda else None
    split["class images"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = TrainConfig(resolution=size)
    m = example_models(base, cfg, device)
    inst, cls = stack_folder(instance, size), stack_folder(klass, size)
    ids = example_ids(base, cfg, device)
    split["start"] = time.perf_counter() - t
    checkpoints = 0.0
    t = time.perf_counter()
    for step in range(steps):
        example_step(m, torch.stack([inst[step % len(inst)], cls[step % len(cls)]]), ids, cfg)
        if step + 1 == 500:  # the example's default checkpointing_steps
            c = time.perf_counter()
            (work / "checkpoint-500").mkdir()
            torch.save(
                {
                    "unet": m["unet"].state_dict(),
                    "text_encoder": m["text"].state_dict(),
                    "optimizer": m["opt"].state_dict(),
                    "scaler": m["scaler"].state_dict(),
                },
                work / "checkpoint-500" / "state.pt",
            )
            checkpoints += time.perf_counter() - c
    split["training steps"] = time.perf_counter() - t - checkpoints
    split["checkpoints"] = checkpoints
    t = time.perf_counter()
    out = StableDiffusionPipeline.from_pretrained(
        str(base), unet=m["unet"], text_encoder=m["text"], safety_checker=None, requires_safety_checker=False
    )
    out.save_pretrained(work / "pipeline", safe_serialization=True)
    split["save"] = time.perf_counter() - t
    return split


def _fingerprint(base: Path, cache: Path) -> str:
    """The base model's content hash as the flow gets it: hashed once, then cached by the files'
    paths, sizes and mtimes (the fingerprint-base-model task), so a warm job does not re-read 4 GB."""
    from atelier.kernel.hashing import stat_signature
    from atelier.models.dreambooth.base import model_hash

    known = json.loads(cache.read_text()) if cache.is_file() else {}
    signature = stat_signature(base)
    if signature not in known:
        known[signature] = model_hash(base)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known))
    return known[signature]


def _sd15_config(count: int, steps: int, size: int, **update):
    from atelier.models.dreambooth.config import load_train_config

    cfg = load_train_config(
        ROOT / "configs" / "dreambooth" / "sd15.yaml", {"resolution": size, "max_train_steps": steps, "num_class_images": count}
    )
    return cfg.model_copy(update=update) if update else cfg


def _class_priors(base: Path, cfg, cache: Path, fingerprints: Path, split: dict):
    """The flow's first two tasks: the base model's fingerprint, then the class priors (cached by both);
    returns the priors and where their latents are kept, as tasks/dreambooth.py keys them."""
    from atelier.models.dreambooth.priors import PriorSpec, ensure_class_priors

    t = time.perf_counter()
    base_hash = _fingerprint(base, fingerprints)
    split["fingerprint"] = time.perf_counter() - t
    t = time.perf_counter()
    s = cfg.class_sampling
    prompt = cfg.fill(cfg.class_prompt, "toy")
    spec = PriorSpec(base_hash, prompt, cfg.num_class_images, cfg.resolution, cfg.class_prior_seed, s.sampler, s.steps, s.guidance_scale)
    priors = ensure_class_priors(cache, spec, base, batch_size=s.batch_size, compile_mode=s.compile_mode)
    split["class images"] = time.perf_counter() - t
    return priors, cache / "latents" / f"{base_hash[:16]}-{priors.key}"


def atelier_job(base: Path, instance: Path, work: Path, cache: Path, count: int, steps: int, size: int, compiled: bool) -> dict:
    from atelier.models.dreambooth.train_setup import keep_compiles
    from atelier.models.dreambooth.trainer import TrainInputs, train

    cfg = _sd15_config(count, steps, size, **({"compile_unet": True} if compiled else {}))
    keep_compiles(cache.parent / "torch-compile")  # as the flow's training task does: Triton's kernels too
    split: dict = {}
    priors, latents = _class_priors(base, cfg, cache, cache.parent / "fingerprints.json", split)
    result = train(cfg, TrainInputs(base, instance, "toy", work, work / "pipeline", priors.path, latents))
    timings = result.timings
    split.update(
        {
            "start": timings["load"],
            "compile": timings["capture"],
            "training steps": timings["steps"] - timings["capture"],
            "checkpoints": timings["checkpoints"],
            "validation": timings["validation"],
            "save": timings["save"],
            "priors reused": priors.reused,
            "class latents cached": bool(timings.get("class_latents_cached")),
            **{
                k: round(v, 2)
                for k, v in timings.items()
                if k.startswith(("capture_", "peak_", "checkpoint_", "load_", "first_steps", "steady_", "slowest_", "save_"))
            },
        }
    )
    return split


def resident_job(base: Path, instance: Path, work: Path, cache: Path, count: int, steps: int, size: int, subjects: int) -> dict:
    import threading

    from atelier.models.dreambooth.service import ResidentTrainer, token_path, train_resident
    from atelier.models.dreambooth.train_setup import keep_compiles
    from atelier.models.dreambooth.trainer import TrainInputs
    from benchmarks.dreambooth_gpu import write_images

    cfg = _sd15_config(count, steps, size)
    shutil.rmtree(cache, ignore_errors=True)  # the class images once, from a cold cache, inside this row
    folders = [write_images(work / f"photos-{i}", 5, size, 3000 + 100 * i) for i in range(subjects)]
    split: dict = {}
    t = time.perf_counter()
    priors, latents = _class_priors(base, cfg, cache, cache.parent / "fingerprints-resident.json", split)
    print(f"progress: {count} class images in {split['class images']:.1f} s", flush=True)
    sock = work / "trainer.sock"
    # as `atelier trainer serve` runs on a GPU host: compiled, torch.compile's artifacts kept on disk
    compiling = torch.cuda.is_available()
    compiles = cache.parent / "torch-compile"
    split["compile cache warm"] = compiling and compiles.is_dir() and any(compiles.iterdir())
    if compiling:
        keep_compiles(compiles)
    trainer = ResidentTrainer(sock, work / "runs", cache / "latents", log=lambda line: print(line, flush=True), compile=compiling)
    threading.Thread(target=trainer.serve, kwargs={"max_jobs": subjects}, daemon=True).start()
    while not token_path(sock).is_file():
        time.sleep(0.05)
    results: dict[int, dict] = {}

    def subject(i: int) -> None:  # one flow run's training task
        job = work / "runs" / f"subject-{i}"
        r = train_resident(sock, cfg, TrainInputs(base, folders[i], "toy", job, job / "pipeline", priors.path, latents))
        results[i] = {"done_at": time.perf_counter() - t, **r.timings}
        print(
            f"progress: subject {i + 1}/{subjects} done at {results[i]['done_at']:.1f} s "
            f"(start {r.timings['load']:.1f}, steps {r.timings['steps']:.1f}, save {r.timings['save']:.1f} s in the background)",
            flush=True,
        )
        shutil.rmtree(job, ignore_errors=True)  # 8 pipelines and their checkpoints would fill the disk

    clients = []
    for i in range(subjects):  # all submitted at once, served in the order they connect
        clients.append(threading.Thread(target=subject, args=(i,)))
        clients[-1].start()
        time.sleep(0.2)
    for c in clients:
        c.join()
    per = [results[i] for i in sorted(results)]
    split.update(
        {
            "start": sum(r["load"] for r in per),
            "compile": sum(r["capture"] for r in per),
            "training steps": sum(r["steps"] - r["capture"] for r in per),
            "checkpoints": sum(r["checkpoints"] for r in per),
            "validation": sum(r["validation"] for r in per),
            "save": sum(r.get("save_handoff", r["save"]) for r in per),
            "save (background)": sum(r["save"] for r in per),
            "subjects": len(per),
            "first start": per[0]["load"] if per else 0.0,
            "later starts": [round(r["load"], 2) for r in per[1:]],
            "done at": [round(r["done_at"], 1) for r in per],
        }
    )
    return split


def run_row(
    row: str, base: Path, instance: Path, tmp: Path, count: int, steps: int, size: int, out: Path, subjects: int = SUBJECTS
) -> None:
    """One row in this process (called by the subprocess that `run_all` starts)."""
    work = tmp / f"work-{row.replace(' ', '-').replace(',', '')}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        with _DeviceMemory() as device_memory:
            if row == "baseline":
                split = baseline_job(base, instance, work, count, steps, size)
            elif row == "atelier back to back":
                split = resident_job(base, instance, work, tmp / "priors-cache-resident", count, steps, size, subjects)
            else:
                split = atelier_job(base, instance, work, tmp / "priors-cache", count, steps, size, compiled="compiled" in row)
        result = {
            "row": row,
            "total": time.perf_counter() - t,
            "split": split,
            "peak_gib": _peak(),
            "device_peak_gib": device_memory.peak,
            "job": f"{count} class images + {steps} steps + save",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a row's checkpoints and pipeline never fill the disk for the next
    out.write_text(json.dumps(result))


def run_all(
    rows: list[str], base: Path, instance: Path, tmp: Path, count: int, steps: int, size: int, results: Path, subjects: int = SUBJECTS
) -> dict:
    """Each row in a fresh process; results accumulate in `results` (JSON), so rows may be run by
    several commands on one machine and the table printed when all are in."""
    done = json.loads(results.read_text()) if results.is_file() else {}
    if "atelier cold" in rows:  # cold: nothing cached (a workspace's first job: no class images, no compiled kernels)
        shutil.rmtree(tmp / "priors-cache", ignore_errors=True)
        shutil.rmtree(tmp / "torch-compile", ignore_errors=True)
        (tmp / "fingerprints.json").unlink(missing_ok=True)
    for row in rows:
        one = tmp / "row.json"
        one.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "dreambooth_gpu.py"),
            "--e2e-row",
            row,
            "--e2e-base",
            str(base),
            "--e2e-instance",
            str(instance),
            "--e2e-tmp",
            str(tmp),
            "--class-images",
            str(count),
            "--e2e-steps",
            str(steps),
            "--e2e-size",
            str(size),
            "--e2e-subjects",
            str(subjects),
            "--json",
            str(one),
        ]
        tail: list[str] = []
        with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:  # a long row says how far it got as it goes (a killed command still shows it)
                if line.startswith("progress:"):
                    print(f"{row} {line.rstrip()}", flush=True)
                tail = (tail + [line])[-60:]
        if proc.returncode != 0 or not one.is_file():
            done[row] = {"row": row, "error": "".join(tail)[-1500:]}
        else:
            done[row] = json.loads(one.read_text())
        print(f"{row}: {json.dumps(done[row])}", flush=True)
        results.write_text(json.dumps(done, indent=1))
    return done


def example_repeated(baseline: dict, n: int) -> float:
    """The example run n times: once whole, then without its class images (it keeps them in its class folder)."""
    return baseline["total"] + (n - 1) * (baseline["total"] - baseline["split"].get("class images", 0.0))


def print_table(done: dict) -> None:
    """The rows as a table; a back-to-back row's ratio is per GPU-hour against the example run as many times."""
    parts = ("fingerprint", "start", "compile", "class images", "training steps", "checkpoints", "validation", "save")
    b = done.get("baseline", {})
    first = next((r for r in done.values() if "job" in r), {})
    print(
        f"\n{first.get('job', 'job'):<34}{'wall s':>8}{'vs base':>8}"
        + "".join(f"{p:>15}" for p in parts)
        + f"{'peak GiB':>9}{'smi GiB':>9}{'steady ms':>10}"
    )
    for row, r in done.items():
        if "error" in r:
            print(f"{row:<34} failed: {r['error'][-300:]}")
            continue
        n = r["split"].get("subjects")
        if "total" not in b:
            ratio = "no base"
        elif n:  # n subjects in one wall clock: compared with the example run n times, not once
            ratio = f"{example_repeated(b, n) / r['total']:.2f}x/h"
        else:
            ratio = f"{b['total'] / r['total']:.2f}x"
        print(
            f"{row:<34}{r['total']:>8.1f}{ratio:>8}"
            + "".join(f"{r['split'].get(p, 0.0):>15.1f}" for p in parts)
            + f"{r['peak_gib']:>9.1f}{r.get('device_peak_gib', float('nan')):>9.1f}"
            + f"{r['split'].get('steady_ms_per_step', float('nan')):>10.1f}"  # a step between read-backs (training.json)
        )
    for row, r in done.items():
        n = r.get("split", {}).get("subjects")
        if not n:
            continue
        rate = n / r["total"] * 3600
        line = f"{row}: {n} subjects in {r['total']:.1f} s = {rate:.1f} subjects per GPU-hour"
        if "total" in b:
            example = example_repeated(b, n)
            line += f"; the example run {n} times: {example:.0f} s = {n / example * 3600:.1f} per GPU-hour; {example / r['total']:.2f}x"
        print(line)
