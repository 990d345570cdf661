"""Image generation with classifier-free guidance: class priors, validation samples, serving.

diffusers' StableDiffusionPipeline runs the conditional and unconditional branches of
classifier-free guidance as one batch (negative and positive embeddings concatenated).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from diffusers.utils import logging as diffusers_logging
from PIL import Image

# Long work reports progress through Atelier's callbacks; library bars would only clutter logs.
diffusers_logging.disable_progress_bar()

SAMPLERS = {
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "pndm": (PNDMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    seed: int
    steps: int = 25
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


def load_pipeline(
    path: Path,
    sampler: str = "dpmsolver++",
    dtype: torch.dtype | None = None,
    compile_mode: str = "none",
    fused_norms: bool = True,
) -> StableDiffusionPipeline:
    dtype = dtype or (torch.float16 if torch.cuda.is_available() else torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    use_sampler(pipe, sampler)
    pipe.set_progress_bar_config(disable=True)
    return speed_up(pipe.to(device()), compile_mode, fused_norms)


def fuses_norms(pipe: StableDiffusionPipeline, compile_mode: str, fused_norms: bool) -> bool:
    """Whether an eager pipeline gets `fused_norm`'s GroupNorm kernels: asked for (`fused_norms`), on CUDA in fp16
    or bf16, uncompiled (inductor fuses its own), and not turned off for the process by `ATELIER_FUSED_NORMS=0`.
    On by default: on an H100 the class-image sampler made 7.51 images/s against torch's norms' 6.73 (1.12x; the VAE
    decode 181 ms against 231), the same images to a mean of 0.09/255 (`benchmarks/sampler_speed.py`; docs/gpu.md)."""
    if not (fused_norms and compile_mode == "none" and pipe.device.type == "cuda" and pipe.unet.dtype in (torch.float16, torch.bfloat16)):
        return False
    from atelier.models.dreambooth.fused_norm import switched_on  # imports Triton

    return switched_on()


def speed_up(pipe: StableDiffusionPipeline, compile_mode: str, fused_norms: bool = True) -> StableDiffusionPipeline:
    """On CUDA: with `fused_norms`, the eager pipeline's GroupNorms (and their SiLU) in fused kernels over
    channels_last activations (`fuses_norms`), or, with a `compile_mode`, fused QKV projections, channels_last,
    and torch.compile of the UNet and the VAE decoder.

    `compile_mode` "none" leaves the pipeline eager; "reduce-overhead" adds CUDA graphs. Shapes are
    pinned (dynamic=False) and `generate` pads a short last batch to the full batch size (the padding
    is discarded), so a compiled pipeline compiles once per resolution, never again for a last batch of
    another size (200 class images in batches of 16 end with 8: that recompile took a minute). Images
    match the eager pipeline's up to floating-point rounding. On the CPU this does nothing: compiling
    costs more than it gains on the tiny models run there.
    """
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, not {compile_mode!r}")
    if fuses_norms(pipe, compile_mode, fused_norms):
        from atelier.models.dreambooth.fused_norm import fuse_group_norms

        for model in (pipe.unet, pipe.vae.decoder):
            model.to(memory_format=torch.channels_last)
            fuse_group_norms(model)
        return pipe
    if compile_mode == "none" or pipe.device.type != "cuda":
        return pipe
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    mode = None if compile_mode == "default" else compile_mode
    pipe.unet = torch.compile(pipe.unet, mode=mode, dynamic=False)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, dynamic=False)
    pipe.atelier_fixed_batch = True  # generate() pads short batches: one shape, one compile
    return pipe


def scheduler_for(sampler: str, config):
    """The named sampler's scheduler, from a scheduler config (the base model's noise schedule)."""
    cls, extra = SAMPLERS[sampler]
    return cls.from_config(config, **extra)


def use_sampler(pipe: StableDiffusionPipeline, sampler: str) -> None:
    pipe.scheduler = scheduler_for(sampler, pipe.scheduler.config)


def pixel_size(request: GenerationRequest, sample_size: int, scale: int) -> tuple[int, int]:
    """(height, width) in pixels: the request's, else the UNet's native size (sample_size latents x scale)."""
    return request.height or sample_size * scale, request.width or sample_size * scale


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def batched(requests: list[GenerationRequest], batch_size: int, pad: bool = False) -> Iterable[tuple[list[int], list[GenerationRequest]]]:
    """(indices, requests) per batch; a batch shares steps, guidance and size. With `pad`, a short
    batch that follows full ones repeats its last request up to `batch_size` (callers keep the first
    len(indices) images): one shape for a compiled or captured forward."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r.steps, r.guidance_scale, r.height, r.width), []).append(i)
    for idxs in groups.values():
        for chunk in _batches(idxs, batch_size):
            reqs = [requests[i] for i in chunk]
            if pad and len(reqs) < batch_size and len(idxs) > len(reqs):
                reqs = reqs + [reqs[-1]] * (batch_size - len(reqs))
            yield chunk, reqs


def seeded_latents(requests: list[GenerationRequest], channels: int, height: int, width: int) -> torch.Tensor:
    """Each image's starting noise from its own seeded generator (on the CPU), so that an image does not
    depend on the batch it landed in or the device it runs on. (The arithmetic after it may: a batch of
    another size is blocked differently by the matrix kernels, which can round a pixel differently.)"""
    return torch.stack(
        [torch.randn((channels, height, width), generator=torch.Generator(device="cpu").manual_seed(r.seed)) for r in requests]
    )


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    requests: list[GenerationRequest],
    batch_size: int = 4,
    on_image: Callable[[int, Image.Image], None] | None = None,
) -> list[Image.Image]:
    """Generate one image per request, batching requests that share steps, guidance and size."""
    out: list[Image.Image | None] = [None] * len(requests)
    scale = pipe.vae_scale_factor
    for chunk, reqs in batched(requests, batch_size, pad=getattr(pipe, "atelier_fixed_batch", False)):
        r = reqs[0]
        h, w = pixel_size(r, pipe.unet.config.sample_size, scale)
        latents = seeded_latents(reqs, pipe.unet.config.in_channels, h // scale, w // scale).to(pipe.device, pipe.unet.dtype)
        images = pipe(
            [q.prompt for q in reqs],
            negative_prompt=[q.negative_prompt or "" for q in reqs],
            num_inference_steps=r.steps,
            guidance_scale=r.guidance_scale,
            height=h,
            width=w,
            latents=latents,
        ).images[: len(chunk)]
        for i, img in zip(chunk, images):
            out[i] = img
            if on_image:
                on_image(i, img)
    return [img for img in out if img is not None]
