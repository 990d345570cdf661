"""Validation samples during a training run, made from the run's own modules.

No pipeline is built: the loop below is StableDiffusionPipeline's (prompt and negative prompt encoded
apart, classifier-free guidance as one batch, the scheduler's step, one image decoded at a time, the
same post-processing), run on the modules the run trains. On a captured run (a CUDA graph step with bf16
weight copies) the UNet's forward for the guidance batch is captured once as a CUDA graph, computing
with the same bf16 copies as the training step and in the training graph's memory pool, and replayed
for every denoising step: where the eager pipeline cast every float32 weight for every call and launched
about a thousand kernels, a step is one graph launch, and sampling adds no device memory of its own.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from atelier.kernel.storage import atomic_dir
from atelier.models.dreambooth.sampling import GenerationRequest, batched, pixel_size, scheduler_for, seeded_latents
from atelier.models.dreambooth.steps import plain_call

ModuleCall = Callable[..., object]  # (module, *args) -> its output: a plain call, or one with the bf16 copies in place


class CapturedForward:
    """One CUDA graph of `forward(x, t, emb)` for one set of shapes and dtypes; inputs are copied into
    the graph's own tensors, and the output is the graph's (read it before the next replay)."""

    def __init__(self, forward: Callable, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, pool=None) -> None:
        self.inputs = (x.clone(), t.clone(), emb.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward(*self.inputs)  # warm-up on the capture stream: its library handles exist before capturing
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.output = forward(*self.inputs)
        torch.cuda.empty_cache()  # the warm-up's blocks, cached on a stream nothing else uses

    def __call__(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self.inputs, (x, t, emb)):
            static.copy_(value)
        self.graph.replay()
        return self.output


class ValidationSampler:
    """Images for prompts from a run's UNet, text encoder and VAE, as StableDiffusionPipeline makes
    them. `call` runs a module (with the step's bf16 copies in place, on a captured run); `capture`
    replays the UNet's forward as a CUDA graph (one per batch shape), in memory pool `pool` when given
    (the training graph's: its activations are dead between steps, so sampling needs no memory of its own)."""

    def __init__(
        self,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        vae,
        tokenizer,
        scheduler_config,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        call: ModuleCall = plain_call,
        capture: bool = False,
        pool=None,
    ) -> None:
        self.unet, self.text_encoder, self.vae, self.tokenizer = unet, text_encoder, vae, tokenizer
        self.scheduler_config, self.autocast, self.call = scheduler_config, autocast, call
        self.capture, self.pool = capture and torch.cuda.is_available(), pool
        self.captured: dict[tuple, CapturedForward] = {}
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.processor = VaeImageProcessor(vae_scale_factor=self.scale)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.call(self.unet, x, t, emb).sample

    def _forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not self.capture:
            return self._unet(x, t, emb)
        key = (x.shape, x.dtype, t.shape, t.dtype, emb.shape, emb.dtype)
        if key not in self.captured:
            self.captured[key] = CapturedForward(self._unet, x, t, emb, self.pool)
        return self.captured[key](x, t, emb)

    def _encode(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return self.call(self.text_encoder, ids)[0].to(self.text_encoder.dtype)

    @torch.no_grad()
    def images(self, requests: list[GenerationRequest], sampler: str, batch_size: int) -> list[Image.Image]:
        scheduler = scheduler_for(sampler, self.scheduler_config)
        device, config = self.unet.device, self.unet.config
        out: list[Image.Image | None] = [None] * len(requests)
        with self.autocast():
            for chunk, reqs in batched(requests, batch_size, pad=self.capture):
                r = reqs[0]
                h, w = (side // self.scale for side in pixel_size(r, config.sample_size, self.scale))
                guided = r.guidance_scale > 1 and config.time_cond_proj_dim is None
                emb = self._encode([q.prompt for q in reqs], device)
                if guided:
                    emb = torch.cat([self._encode([q.negative_prompt or "" for q in reqs], device), emb])
                scheduler.set_timesteps(r.steps, device=device)
                latents = seeded_latents(reqs, config.in_channels, h, w).to(device, self.unet.dtype) * scheduler.init_noise_sigma
                for t in scheduler.timesteps:
                    x = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
                    noise = self._forward(x, t, emb)
                    if guided:
                        uncond, text = noise.chunk(2)
                        noise = uncond + r.guidance_scale * (text - uncond)
                    latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                # one image at a time, as with VAE slicing: sampling mid-run must not raise training's peak memory
                decoded = torch.cat([self.vae.decode(z).sample for z in (latents / self.vae.config.scaling_factor).split(1)])
                images = self.processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * len(reqs))
                for i, img in zip(chunk, images):
                    out[i] = img
        return [img for img in out if img is not None]

    def write(self, out: Path, requests: list[GenerationRequest], sampler: str, batch_size: int) -> Path:
        """The images as 00.png, 01.png... in `out` (replaced whole); the run's random state is left as it was."""
        with torch.random.fork_rng(devices=[]), atomic_dir(Path(out), replace=True) as tmp:
            for i, img in enumerate(self.images(requests, sampler, batch_size)):
                img.save(tmp / f"{i:02d}.png")
        return Path(out)


def run_sampler(acc, m, autocast, copies=None, graph: torch.cuda.CUDAGraph | None = None) -> ValidationSampler:
    """The sampler for a run's validation: its modules unwrapped (no DDP or torch.compile wrapper: a
    compiled module would compile again for sampling's shapes), on a captured run with the step's bf16
    copies (`copies`, a steps.ComputeCopies) and captured in the training graph's memory pool."""

    def unwrap(module):
        return acc.unwrap_model(module, keep_torch_compile=False)

    return ValidationSampler(
        unwrap(m.unet),
        unwrap(m.text_encoder),
        m.vae,
        m.tokenizer,
        m.noise_scheduler.config,
        autocast,
        copies.call if copies is not None else plain_call,
        capture=copies is not None,
        pool=graph.pool() if graph is not None else None,
    )


def validation_samples(sampler: ValidationSampler, cfg, work_dir: Path, class_noun: str, step: int) -> Path:
    """Samples of the validation prompts at `step`, in work_dir/validation/step-NNNNNNN (cfg: a TrainConfig)."""
    requests = [
        GenerationRequest(cfg.fill(p, class_noun), cfg.seed + i, cfg.sampling.steps, cfg.sampling.guidance_scale)
        for i, p in enumerate(cfg.validation_prompts)
    ]
    return sampler.write(Path(work_dir) / "validation" / f"step-{step:07d}", requests, cfg.sampling.sampler, cfg.sampling.batch_size)
