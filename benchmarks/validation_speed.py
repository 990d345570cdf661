"""Validation samples in the middle of a captured run: the pipeline way against the captured forward.

    python benchmarks/validation_speed.py --tmp /tmp/b      # needs CUDA; SD 1.5's shape, built in --tmp once

Trains the SD 1.5-shape UNet + text encoder a few captured steps (the trainer's `GraphedStep` with the
bf16 weight copies), then times one validation (1 prompt, DPM-Solver++ 25 steps, guidance 7.5, 512 px:
sd15.yaml's settings), best of 3 after a warm-up, both ways in this process:
- before: a StableDiffusionPipeline built around the run's modules, run eagerly under autocast with VAE
  slicing (what `outputs.validation_samples` did);
- now: `validation.ValidationSampler` on the run's modules, its UNet forward captured once with the
  bf16 copies, in the training graph's memory pool.
Prints seconds per validation, the ratio, what each adds to the device's peak memory, and how far the
two images are apart (the bf16 copies are autocast's numbers; kernels differ, so a few levels).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tmp", type=Path, required=True, help="work folder; the SD 1.5-shape model is built there once")
    ap.add_argument("--steps", type=int, default=25, help="denoising steps per sample")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from atelier.models.dreambooth.sampling import GenerationRequest, generate, use_sampler
    from atelier.models.dreambooth.validation import ValidationSampler
    from benchmarks.dreambooth_gpu import build_sd15
    from benchmarks.gpu_timing import best_seconds
    from benchmarks.step_speed import build, inputs

    base = args.tmp / "sd15"
    if not (base / "model_index.json").is_file():
        build_sd15(base, None)
    step, objective, _, _ = build(base, {})
    for i in range(5):  # eager steps, the capture, replays
        step(*inputs(i))
    torch.cuda.synchronize()
    unet, text, copies = objective.unet, objective.text_encoder, step.copies
    vae = AutoencoderKL.from_pretrained(str(base), subfolder="vae").to("cuda", torch.bfloat16)
    tokenizer = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    requests = [GenerationRequest("a photo of sks toy in the jungle", 0, args.steps, 7.5)]

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)

    def before():
        with torch.random.fork_rng(devices=[]):
            pipe = StableDiffusionPipeline.from_pretrained(
                str(base), unet=unet, text_encoder=text, vae=vae, tokenizer=tokenizer, safety_checker=None, requires_safety_checker=False
            )
            use_sampler(pipe, "dpmsolver++")
            pipe.set_progress_bar_config(disable=True)
            pipe.vae.enable_slicing()
            with autocast():
                return generate(pipe, requests, 4)

    sampler = ValidationSampler(
        unet, text, vae, tokenizer, objective.noise_scheduler.config, autocast, copies.call, True, step.graph.pool()
    )

    def now():
        return sampler.images(requests, "dpmsolver++", 4)

    results = {}
    for name, fn in (("before: a pipeline, eager, autocast", before), ("now: captured forward, bf16 copies", now)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_reserved()
        t = time.perf_counter()
        images = fn()  # the first call (the capture, for the new way)
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        results[name] = (best_seconds(fn), first, (torch.cuda.max_memory_reserved() - held) / 2**30, np.asarray(images[0], dtype=int))
    (old, *_, a), (new, *_, b) = results.values()
    print(f"{'way':<38} {'s/validation':>12} {'first call s':>12} {'+peak GiB':>10}")
    for name, (best, first, extra, _) in results.items():
        print(f"{name:<38} {best:>12.3f} {first:>12.3f} {extra:>10.2f}")
    print(f"ratio: {old / new:.2f}x; images apart by at most {np.abs(a - b).max()} levels (mean {np.abs(a - b).mean():.2f})")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
