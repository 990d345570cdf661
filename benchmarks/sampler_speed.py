"""Where the class-image sampler's time goes, and what makes it shorter: one process, one GPU, SD 1.5's shape.

    python benchmarks/sampler_speed.py --tmp /tmp/b                 # every variant, 48 images each
    python benchmarks/sampler_speed.py --tmp /tmp/b --only fused --profile

Each variant loads the pipeline as `sampling.load_pipeline` does (fp16, DPM-Solver++), generates one batch to
warm up, then times `generate` over `--images` images at batch 16 (CFG doubles it: the UNet sees 32), the
way class priors are made: images/s against the first variant, run in the same process. Its parts are timed
alone too: one UNet forward at batch 32 and one VAE decode of 16 latents (best of a few, waited for on the
device). `--profile` sums one batch's GPU kernel time by kind (gpu_timing's kinds) and says how busy the GPU
was over that batch's wall clock; a busy GPU gains nothing from CUDA graphs. `--ops` prints one batch's
operators by device time with their input shapes (which of diffusers' ops launched those kernels). Every variant's first images are
compared with the first variant's (mean and largest pixel difference, 0-255): a faster variant must make the
same pictures up to rounding.

Variants: `torch-norms` (torch's GroupNorm on NCHW fp16), `fused` (`load_pipeline`'s default: fused_norm's
GroupNorm kernels over channels_last, UNet and VAE decoder; `fused-unet`: the UNet's only), `fused-kernels`
(`fuse_kernels`: those, the GEGLU gates in fused_geglu's kernels and the transformers' output kept
channels_last; not the default until measured), `fused+graph` (that UNet's forward captured as a CUDA graph per shape, no compile).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_timing import best_seconds, kernels_by_kind  # noqa: E402

BATCH = 16
PROMPT = "a photo of toy"


def graph_unet(pipe) -> None:
    """Replace the UNet's forward by a CUDA graph replay per input shape (captured on first use)."""
    forward = pipe.unet.forward
    graphs: dict = {}

    def replay(sample, timestep, encoder_hidden_states, **kwargs):
        key = (tuple(sample.shape), tuple(encoder_hidden_states.shape))
        if key not in graphs:
            static = (sample.clone(), torch.as_tensor(timestep, device=sample.device).clone(), encoder_hidden_states.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    forward(*static, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = forward(*static, **kwargs)
            graphs[key] = (graph, static, out)
        graph, static, out = graphs[key]
        static[0].copy_(sample)
        static[1].copy_(timestep)
        static[2].copy_(encoder_hidden_states)
        graph.replay()
        return (out[0].clone(),)

    pipe.unet.forward = replay


VARIANTS = {
    "torch-norms": {"fused_norms": False},
    "fused-unet": {"fused_norms": False, "fuse": "norms", "unet_only": True},
    "fused": {"fused_norms": True},
    "fused-kernels": {"fused_norms": False, "fuse": "kernels"},
    "fused+graph": {"fused_norms": True, "graph": True},
}


def requests(n: int, first_seed: int = 0):
    from atelier.models.dreambooth.sampling import GenerationRequest

    return [GenerationRequest(PROMPT, first_seed + i, 20, 7.5, 512, 512) for i in range(n)]


def profile_batch(pipe) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from atelier.models.dreambooth.sampling import generate

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        generate(pipe, requests(BATCH, 1000), batch_size=BATCH)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    by_kind, _ = kernels_by_kind(prof, top=25, indent="    ")
    total = sum(by_kind.values())
    print(f"  one batch of {BATCH}: {wall * 1000:.0f} ms wall, {total:.0f} ms of kernels ({100 * total / wall / 1000:.0f}% busy)")
    return {"wall_ms": wall * 1000, "kernel_ms": total, "by_kind": by_kind}


def ops_table(pipe, rows: int = 30) -> str:
    """One batch's operators by device time, grouped by input shapes: which of diffusers' ops launch the kernels
    `profile_batch` counts (an add over two layouts or with a broadcast, a copy to contiguous)."""
    from torch.profiler import ProfilerActivity, profile

    from atelier.models.dreambooth.sampling import generate

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        generate(pipe, requests(BATCH, 1000), batch_size=BATCH)
        torch.cuda.synchronize()
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_device_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=90
    )


def run_variant(base: Path, variant: dict, images: int, do_profile: bool, do_ops: bool = False) -> tuple[dict, np.ndarray]:
    from atelier.models.dreambooth.sampling import generate, load_pipeline

    gc.collect()  # the variant before: its pipeline (a graphed one's forward refers back to its UNet)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    pipe = load_pipeline(base, "dpmsolver++", fused_norms=variant["fused_norms"])
    if variant.get("fuse"):  # what load_pipeline's default does, with another swap or on the UNet only
        from atelier.models.dreambooth.fused_norm import fuse_group_norms, fuse_kernels

        swap = fuse_kernels if variant["fuse"] == "kernels" else fuse_group_norms
        for model in (pipe.unet,) if variant.get("unet_only") else (pipe.unet, pipe.vae.decoder):
            model.to(memory_format=torch.channels_last)
            swap(model)
    if variant.get("graph"):
        graph_unet(pipe)
    load = time.perf_counter() - t
    t = time.perf_counter()
    first = generate(pipe, requests(BATCH), batch_size=BATCH)  # warm-up; these seeds are compared across variants
    torch.cuda.synchronize()
    warm = time.perf_counter() - t
    t = time.perf_counter()
    generate(pipe, requests(images, 100), batch_size=BATCH)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    with torch.no_grad():
        unet = pipe.unet.config  # the class-image batch's shapes (CFG doubles it), from the model's own config
        latents = torch.randn(2 * BATCH, unet.in_channels, unet.sample_size, unet.sample_size, device=pipe.device, dtype=pipe.unet.dtype)
        text = torch.randn(2 * BATCH, pipe.tokenizer.model_max_length, unet.cross_attention_dim, device=pipe.device, dtype=pipe.unet.dtype)
        step = torch.tensor(500.0, device=pipe.device)
        pipe.unet(latents, step, text, return_dict=False)
        unet_ms = 1000 * best_seconds(lambda: pipe.unet(latents, step, text, return_dict=False), 5)
        pipe.vae.decode(latents[:BATCH], return_dict=False)
        vae_ms = 1000 * best_seconds(lambda: pipe.vae.decode(latents[:BATCH], return_dict=False), 3)
    out = {
        "images_per_s": images / seconds,
        "seconds": seconds,
        "load_s": load,
        "warmup_s": warm,
        "unet_forward_ms": unet_ms,
        "vae_decode_ms": vae_ms,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    if do_profile:
        out["profile"] = profile_batch(pipe)
    if do_ops:
        print(ops_table(pipe), flush=True)
    return out, np.stack([np.asarray(img, dtype=np.int16) for img in first])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tmp", type=Path, required=True, help="work folder; the SD 1.5-shape model is built there once")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--only", default="", help="comma list of variants (the first variant always runs: the ratios' baseline)")
    ap.add_argument("--profile", action="store_true", help="each variant: one batch's kernel time by kind")
    ap.add_argument("--ops", action="store_true", help="each variant: one batch's operators by device time and input shapes")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sampler_speed.py measures a GPU: no CUDA device here")
    from benchmarks.dreambooth_gpu import build_sd15

    base = args.tmp / "sd15"
    if not (base / "model_index.json").is_file():
        build_sd15(base, None)
    only = [o for o in args.only.split(",") if o]
    first = next(iter(VARIANTS))
    results: dict = {}
    reference = None
    for name, variant in VARIANTS.items():
        if only and name not in only and name != first:
            continue
        print(name, flush=True)
        try:
            results[name], pixels = run_variant(base, variant, args.images, args.profile, args.ops)
        except Exception as exc:  # noqa: BLE001 - one failed variant should not hide the others
            results[name] = {"error": f"{exc.__class__.__name__}: {str(exc)[:400]}"}
            print(" ", results[name]["error"], flush=True)
            continue
        if reference is None:
            reference = pixels
        diff = np.abs(pixels - reference)
        results[name]["pixel_diff_mean"], results[name]["pixel_diff_max"] = float(diff.mean()), int(diff.max())
        print(" ", json.dumps({k: v for k, v in results[name].items() if k != "profile"}), flush=True)
    ref = results.get(first, {}).get("images_per_s")
    print(
        f"\n{'variant':<14} {'images/s':>9} {'vs first':>9} {'UNet b32 ms':>12} {'VAE b16 ms':>11} {'warm-up s':>10} {'peak GiB':>9} {'px diff':>12}"
    )
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<14} {r['error'][:200]}")
            continue
        ratio = f"{r['images_per_s'] / ref:.2f}x" if ref else "n/a"
        px = f"{r['pixel_diff_mean']:.2f}/{r['pixel_diff_max']}"
        print(
            f"{name:<14} {r['images_per_s']:>9.2f} {ratio:>9} {r['unet_forward_ms']:>12.1f} {r['vae_decode_ms']:>11.1f} "
            f"{r['warmup_s']:>10.1f} {r['peak_gib']:>9.1f} {px:>12}"
        )
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.images} images a variant, batch {BATCH}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
