"""Where a DreamBooth step's time goes, and what makes it shorter: one process, one GPU, SD 1.5's shape.

    python benchmarks/step_speed.py --tmp /tmp/b --profile       # profile + every variant (needs CUDA)
    python benchmarks/step_speed.py --tmp /tmp/b --only copies,copies+bf16-norms

Each variant trains UNet + text encoder (prior preservation, 1 + 1 images at 512 px, fused AdamW,
clipping) with the trainer's own `Objective` and `GraphedStep` (the whole step captured as one CUDA
graph) and reports ms per replayed step after warm-up, against `baseline` (the step before the bf16
weight copies and the fused clipping) run in the same process; `copies` ends the step in four passes
(gradients to float32, norm, fused AdamW, copies refreshed), `one-pass` in OnePassAdamW's one kernel, the
trainer's default now.
`--profile` first sums a replayed step's GPU kernel time by kind (copies and casts, optimizer, matrix
multiplies, convolutions, attention, norms, reductions, elementwise) and lists the top kernels, for the
variant `--profile-variant` names (`compiled+one-pass`: the resident trainer's); `--trace FILE` keeps one
step's kernels in order.

The variants' other knobs: the attention backend (pinned with sdpa_kernel), GroupNorm and LayerNorm in
bf16 (autocast runs them in float32, so every bf16 activation entering a norm is read and written twice
as wide), and torch.compile of the UNet inside the captured step: the whole model (`compiled+one-pass`,
what the resident trainer runs) or only its repeated blocks (`regional+one-pass`, `compile_regions`:
one compiled graph per block shape; on an H100 0.9 ms a step slower, and its compile no shorter where it
counts), cuDNN's convolution algorithms timed on first use instead of picked by its heuristics
(`*+cudnn-bench`: no faster), and inductor's choice of convolution layouts (`compiled+one-pass/*-layout-opt`:
the compiled backward copies activations between layouts), the UNet in NCHW (`one-pass/nchw`: slower), diffusers'
shortcut `.contiguous()` skipped (`one-pass/shortcut-in-place`), GroupNorm with its SiLU in fused_norm's Triton
kernels (`one-pass+fused-norms`: the single job's step now) and with the GEGLU gates in fused_geglu's and the
transformers' output kept channels_last (`one-pass+fused-kernels`, `fuse_kernels`: not measured yet). docs/gpu.md
has the measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atelier.models.dreambooth.steps import ComputeCopies, GraphedStep, Objective, init_adam_state  # noqa: E402
from benchmarks.gpu_timing import kernels_by_kind  # noqa: E402

# --- the variants' kernel-level choices (only this benchmark uses them; the trainer took what paid) ---
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


@dataclass(frozen=True)
class SpeedOptions:
    bf16_norms: bool = False
    attention: str = "auto"
    compile: bool = False
    compile_text: bool = False  # the text encoder too, as the trainer compiles a trained one
    regional: bool = False  # compile the repeated blocks only (compile_regions)
    cudnn_benchmark: bool = False  # cuDNN times its convolution algorithms on first use instead of its heuristics
    channels_last: bool = True  # the UNet's memory format (the trainer's default: channels_last)
    shortcut_in_place: bool = False  # diffusers' ResnetBlock2D makes its shortcut's input contiguous in training mode
    fused_norms: bool = False  # GroupNorm (+ SiLU) in fused_norm's Triton kernels, as the trainer's captured step runs them
    kernels: bool = False  # fuse_kernels: the GroupNorms, GEGLU gates, transformers' output channels_last (not yet the trainer's)


# the blocks SD's UNet and CLIP's text encoder repeat: one compiled graph serves every block of a shape
REGIONS = ("ResnetBlock2D", "Transformer2DModel", "CLIPEncoderLayer")


def compile_regions(module: torch.nn.Module) -> None:
    """Regional compilation (`--only regional+one-pass`): torch.compile, in place, each submodule whose
    class is in REGIONS instead of the whole model. Blocks of one shape share one compiled graph
    (parameters are graph inputs); what lies between the blocks (the UNet's input and output
    convolutions, up- and down-samplers, time embedding) stays eager. On an H100 it was no faster than
    the whole-model compile (docs/gpu.md), so the trainer does not use it. (diffusers'
    `compile_repeated_blocks` does the same walk, but only for models that declare `_repeated_blocks`:
    SD's UNet does not, and CLIP's text encoder is not a diffusers model.)"""
    import torch._dynamo

    # one graph per distinct block shape: SD 1.5's UNet has about 20 (the default limit is 8)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for sub in module.modules():
        if type(sub).__name__ in REGIONS:
            sub.compile(dynamic=False)  # shapes never change during training


def _in_compute_dtype(norm):
    """A norm's forward that runs in the autocast dtype (its parameters cast, statistics still in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super(type(self), self).forward(x)
        dt = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            w = self.weight.to(dt) if self.weight is not None else None
            b = self.bias.to(dt) if self.bias is not None else None
            return norm(self, x.to(dt), w, b)

    return forward


class _AutocastGroupNorm(torch.nn.GroupNorm):
    forward = _in_compute_dtype(lambda self, x, w, b: F.group_norm(x, self.num_groups, w, b, self.eps))


class _AutocastLayerNorm(torch.nn.LayerNorm):
    forward = _in_compute_dtype(lambda self, x, w, b: F.layer_norm(x, self.normalized_shape, w, b, self.eps))


def norms_in_compute_dtype(module: torch.nn.Module) -> int:
    """Make the module's GroupNorm and LayerNorm layers run in the autocast dtype; returns how many."""
    swapped = 0
    for m in module.modules():
        if type(m) is torch.nn.GroupNorm:
            m.__class__ = _AutocastGroupNorm
            swapped += 1
        elif type(m) is torch.nn.LayerNorm:
            m.__class__ = _AutocastLayerNorm
            swapped += 1
    return swapped


def attention_context(backend: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context that pins scaled_dot_product_attention to one backend ("auto": PyTorch's choice)."""
    if backend == "auto":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]
    return lambda: sdpa_kernel([chosen])


def step_context(dtype: torch.dtype | None, options: SpeedOptions) -> Callable[[], contextlib.AbstractContextManager]:
    """What the step runs under: autocast to `dtype` without a cast cache (a CUDA graph must not keep
    one), and the attention backend."""
    attention = attention_context(options.attention)

    @contextlib.contextmanager
    def ctx():
        with contextlib.ExitStack() as stack:
            if dtype is not None:
                stack.enter_context(torch.autocast("cuda", dtype=dtype, cache_enabled=False))
            stack.enter_context(attention())
            yield

    return ctx


def apply(unet: torch.nn.Module, text_encoder: torch.nn.Module, options: SpeedOptions):
    """The UNet and text encoder as the step calls them (compiled when asked)."""
    if options.bf16_norms:
        norms_in_compute_dtype(unet)
        norms_in_compute_dtype(text_encoder)
    if options.fused_norms or options.kernels:
        from atelier.models.dreambooth.fused_norm import fuse_group_norms, fuse_kernels

        (fuse_kernels if options.kernels else fuse_group_norms)(unet)
    if options.compile:
        unet = torch.compile(unet, dynamic=False)
    if options.compile_text:
        text_encoder = torch.compile(text_encoder, dynamic=False)
    if options.regional:
        compile_regions(unet)
        compile_regions(text_encoder)
    return unet, text_encoder


def build(base: Path, variant: dict):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    options = SpeedOptions(**variant.get("options", {}))
    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet").cuda()
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
    text = CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder").cuda()
    sched = DDPMScheduler.from_pretrained(str(base), subfolder="scheduler")
    params = [p for m in (unet, text) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=torch.tensor(5e-6, device="cuda"), fused=True, capturable=True)
    init_adam_state(opt)
    g = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(0, 49407, (2, 77), device="cuda", generator=g)
    unet, text = apply(unet, text, options)
    copies = ComputeCopies([unet, text], torch.bfloat16) if variant.get("copies", True) else None
    objective = Objective(unet, text, sched, ids, True, 1.0, step_context(torch.bfloat16, options), copies.call if copies else None)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    if not variant.get("fused_clip", True):
        opt.defaults["fused"] = False  # clip_grad_norm_'s own scaling pass (the optimizer stays fused)
    step = GraphedStep([unet, text], objective, params, opt, lr, 1.0, copies, one_pass=variant.get("one_pass", True))
    if options.shortcut_in_place:
        shortcut_inputs_in_place(unet)
    return step, objective, params, opt


def shortcut_inputs_in_place(unet: torch.nn.Module) -> int:
    """diffusers' ResnetBlock2D calls `.contiguous()` on its shortcut convolution's input in training mode (for
    DDP's stride warning): on a channels_last UNet that converts the activation to NCHW and back in the backward.
    The block's own `training` flag is read for nothing else (its dropout is a child module with its own flag)."""
    n = 0
    for m in unet.modules():
        if type(m).__name__ == "ResnetBlock2D" and getattr(m, "conv_shortcut", None) is not None:
            m.training = False
            n += 1
    return n


def inputs(seed: int):
    g = torch.Generator("cuda").manual_seed(seed)
    return (
        torch.randn(2, 4, 64, 64, device="cuda", generator=g),
        torch.randn(2, 4, 64, 64, device="cuda", generator=g),
        torch.randint(0, 1000, (2,), device="cuda", generator=g),
    )


def time_variant(base: Path, variant: dict, steps: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with process_settings(variant):
        return _time_variant(base, variant, steps)


@contextlib.contextmanager
def process_settings(variant: dict):
    """What a variant sets for the whole process rather than on its modules: cuDNN's algorithm search and
    inductor's options (read when the first call compiles)."""
    torch.backends.cudnn.benchmark = variant.get("options", {}).get("cudnn_benchmark", False)
    try:
        with torch._inductor.config.patch(variant.get("inductor", {})):
            yield
    finally:
        torch.backends.cudnn.benchmark = False


def _time_variant(base: Path, variant: dict, steps: int) -> dict:
    t0 = time.perf_counter()
    step, *_ = build(base, variant)
    load = time.perf_counter() - t0
    losses = []
    t0 = time.perf_counter()
    for i in range(8):  # 3 eager, capture, replays
        losses.append(step(*inputs(i)))
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    batches = [inputs(100 + i) for i in range(steps)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        losses.append(step(*b))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {
        "ms_per_step": 1000 * seconds / steps,
        "steps_per_s": steps / seconds,
        "load_s": load,
        "warm_s": warm,
        "capture_s": step.capture_seconds,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "first_losses": [round(float(x), 5) for x in losses[:8]],
        "one_pass": step.update is not None,
    }
    del step, losses
    return out


def profile(base: Path, steps: int, variant_name: str, trace: Path | None = None) -> dict:
    """A replayed step's GPU kernel time by kind (a compiled variant's kernels are its compiled graphs').
    `trace` keeps the kernels in order (a chrome trace): a replayed graph names no operator that launched
    them, but their neighbours and grid sizes say what they are."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof_ctx

    with process_settings(VARIANTS[variant_name]):
        step, objective, params, opt = build(base, VARIANTS[variant_name])
        for i in range(3):  # the compile, if any, happens here, under the variant's settings
            step(*inputs(i))
    torch.cuda.synchronize()
    with prof_ctx(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(*inputs(10 + i))  # the first call captures the step, every call replays it
        torch.cuda.synchronize()
    print("\nGPU kernel time per step:")
    by_kind, top = kernels_by_kind(prof, steps)
    total = sum(by_kind.values())
    print(f"  in all: {total:.1f} ms")
    if trace:
        prof.export_chrome_trace(str(trace))
    del step, objective, params, opt
    return {"kernel_ms_per_step": total, "by_kind": by_kind, "top": top}


VARIANTS = {
    "baseline": {"copies": False, "fused_clip": False},  # the trainer before the compute copies
    "fused-clip": {"copies": False},
    "copies": {"one_pass": False},  # four passes after the backward: gradients to float32, norm, AdamW, copies
    "one-pass": {},  # the trainer's default: OnePassAdamW (norm, then one kernel)
    "copies+bf16-norms": {"options": {"bf16_norms": True}},
    "attn-flash": {"options": {"attention": "flash"}},
    "attn-cudnn": {"options": {"attention": "cudnn"}},
    "attn-efficient": {"options": {"attention": "efficient"}},
    "compiled": {"copies": False, "options": {"compile": True}},
    # what the resident trainer runs: UNet and text encoder compiled, computing with the bf16 copies
    "compiled+copies": {"one_pass": False, "options": {"compile": True, "compile_text": True}},
    "compiled+one-pass": {"options": {"compile": True, "compile_text": True}},
    "regional+one-pass": {"options": {"regional": True}},
    # inductor's choice of convolution layouts: measured no faster either way (docs/gpu.md), kept to measure on the next torch
    "compiled+one-pass/no-layout-opt": {"options": {"compile": True, "compile_text": True}, "inductor": {"layout_optimization": False}},
    "compiled+one-pass/forced-layout-opt": {
        "options": {"compile": True, "compile_text": True},
        "inductor": {"force_layout_optimization": True},
    },
    "one-pass+cudnn-bench": {"options": {"cudnn_benchmark": True}},
    "one-pass/nchw": {"options": {"channels_last": False}},
    "one-pass/shortcut-in-place": {"options": {"shortcut_in_place": True}},
    "one-pass+fused-norms": {"options": {"fused_norms": True}},
    "one-pass+fused-kernels": {"options": {"kernels": True}},
    "compiled+one-pass+cudnn-bench": {"options": {"compile": True, "compile_text": True, "cudnn_benchmark": True}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tmp", type=Path, required=True, help="work folder; the SD 1.5-shape model is built there once")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--only", default="")
    ap.add_argument("--profile", action="store_true", help="first: a replayed step's kernel time by kind")
    ap.add_argument("--profile-variant", default="one-pass", help="the variant the profile runs")
    ap.add_argument("--trace", type=Path, default=None, help="with --profile: one step's kernels, in order, as a chrome trace")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from atelier.models.dreambooth.train_setup import keep_compiles
    from benchmarks.dreambooth_gpu import build_sd15

    keep_compiles(args.tmp / "torch-compile")  # a second run of the compiled variants loads their compiled graphs
    base = args.tmp / "sd15"
    if not (base / "model_index.json").is_file():
        build_sd15(base, None)
    results: dict = {}
    if args.profile:
        results["profile"] = profile(base, 1 if args.trace else 3, args.profile_variant, args.trace)
    only = [o for o in args.only.split(",") if o]
    for name, variant in VARIANTS.items():
        if only and name not in only and name != "baseline":
            continue
        try:
            results[name] = time_variant(base, variant, args.steps)
        except Exception as exc:  # noqa: BLE001 - one failed variant should not hide the others
            results[name] = {"error": f"{exc.__class__.__name__}: {str(exc)[:400]}"}
        print(name, json.dumps(results[name]), flush=True)
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
    ref = results.get("baseline", {}).get("ms_per_step")
    print(f"\n{'variant':<24} {'ms/step':>8} {'steps/s':>8} {'vs default':>10} {'peak GiB':>9} {'warm s':>7}")
    for name, r in results.items():
        if name == "profile":
            continue
        if "error" in r:
            print(f"{name:<24} {r['error'][:200]}")
            continue
        ratio = f"{ref / r['ms_per_step']:.2f}x" if ref else "n/a"
        print(
            f"{name:<24} {r['ms_per_step']:>8.1f} {r['steps_per_s']:>8.2f} {ratio:>10} {r['peak_reserved_gib']:>9.1f} {r['warm_s']:>7.1f}"
        )
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
