"""What the DreamBooth trainer sets up before its loop: the base model's parts (loaded, marked
trainable, placed), the optimizer and LR schedule, the frozen VAE's latents of an image folder, prompt
token ids, LoRA adapters, and a clean accelerate state for each run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from transformers import CLIPTextModel, CLIPTokenizer

from atelier.models.dreambooth.config import TrainConfig
from atelier.models.dreambooth.images import stack_folder

LATENTS_FORMAT = "1"  # what a cached latents file holds; a change of Encoded's arithmetic bumps it


class Encoded:
    """Latent distributions (mean, std) of a folder of images under the frozen VAE.

    With `cache` (a folder that belongs to one base model and one image set: the caller keys it), the
    distributions are kept there as safetensors (tensors only: nothing in the file can run) and read
    back by the next run instead of decoding and encoding the images again: 200 class priors at 512 px
    cost seconds to decode and encode, a warm read milliseconds. The file's name and metadata carry
    what else decides the numbers (resolution, crop, dtype, image count); any mismatch re-encodes."""

    def __init__(
        self, vae: AutoencoderKL, folder: Path, cfg: TrainConfig, device: torch.device, dtype: torch.dtype, cache: Path | None = None
    ) -> None:
        self.scaling = vae.config.scaling_factor
        self.cached = False
        meta = {"format": LATENTS_FORMAT, "resolution": str(cfg.resolution), "center_crop": str(cfg.center_crop), "dtype": str(dtype)}
        path = (
            cache / f"latents-{cfg.resolution}-{'crop' if cfg.center_crop else 'resize'}-{str(dtype).split('.')[-1]}.safetensors"
            if cache
            else None
        )
        if path is not None and self._read(path, meta, device):
            return
        pixels = stack_folder(folder, cfg.resolution, cfg.center_crop)
        means, stds = [], []
        with torch.no_grad():
            for chunk in pixels.split(8):
                dist = vae.encode(chunk.to(device, dtype)).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        # one layout whether encoded or read back (the VAE may hand back channels-last tensors, and the UNet's
        # first convolution picks its kernel, and so its rounding, by layout)
        self.mean, self.std = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
        if path is not None:
            self._write(path, {**meta, "count": str(len(self.mean))})

    def _read(self, path: Path, meta: dict[str, str], device: torch.device) -> bool:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                stored = f.metadata() or {}
                if any(stored.get(k) != v for k, v in meta.items()):
                    return False
                mean, std = f.get_tensor("mean"), f.get_tensor("std")
        except (OSError, SafetensorError, KeyError):
            return False  # missing, torn or foreign: encode again (and replace it)
        if mean.shape != std.shape or len(mean) != int(stored.get("count", -1)):
            return False
        self.mean, self.std, self.cached = mean, std, True
        return True

    def _write(self, path: Path, meta: dict[str, str]) -> None:
        import os

        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"mean": self.mean.cpu(), "std": self.std.cpu()}, str(tmp), metadata=meta)
        os.replace(tmp, path)  # whole or absent: a reader never sees half a file

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, batch: int, gen: torch.Generator, world: int = 1, rank: int = 0) -> torch.Tensor:
        """Draw the global batch (every process draws the same), return this process's slice."""
        idx = torch.randint(len(self), (batch * world,), generator=gen, device=gen.device)
        eps = torch.randn(self.mean[idx].shape, generator=gen, device=gen.device)
        mine = slice(rank * batch, (rank + 1) * batch)
        return (self.mean[idx][mine] + self.std[idx][mine] * eps[mine]) * self.scaling


def token_ids(tokenizer: CLIPTokenizer, prompt: str, device: torch.device) -> torch.Tensor:
    return tokenizer(
        prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids.to(device)


def add_lora(cfg: TrainConfig, unet, text_encoder, weight_dtype: torch.dtype) -> None:
    """Freeze the base weights (kept in the mixed-precision dtype: half the memory) and add trainable
    LoRA adapters, kept in fp32 so that small updates are not rounded away."""
    from peft import LoraConfig as PeftLoraConfig

    rank = cfg.lora.rank
    unet.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    unet.add_adapter(PeftLoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=cfg.lora.unet_target_modules))
    models = [unet]
    if cfg.train_text_encoder:
        text_encoder.requires_grad_(False)
        text_encoder.to(dtype=weight_dtype)
        text_encoder.add_adapter(
            PeftLoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=cfg.lora.text_encoder_target_modules)
        )
        models.append(text_encoder)
    for m in models:
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()


def fresh_accelerator(precision: str, accumulation: int) -> Accelerator:
    """accelerate keeps one process-wide state; a long-lived worker trains many models with different
    precision and accumulation, so each run starts from a clean state (the process group is kept)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=accumulation,
        cpu=not torch.cuda.is_available(),
        step_scheduler_with_optimizer=False,
    )


@dataclass
class Models:
    """The base model's parts, as the run uses them (trainable, placed, prepared or compiled)."""

    tokenizer: CLIPTokenizer
    text_encoder: torch.nn.Module
    vae: AutoencoderKL
    unet: torch.nn.Module
    noise_scheduler: DDPMScheduler


def load_models(cfg: TrainConfig, base: Path, weight_dtype: torch.dtype, device: torch.device) -> Models:
    """The base model's parts, with what trains marked (a LoRA's adapters added) and on the device (a
    fused optimizer is made for parameters there); the frozen ones are placed by `_place`."""
    m = Models(
        CLIPTokenizer.from_pretrained(str(base / "tokenizer")),
        CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder"),
        AutoencoderKL.from_pretrained(str(base), subfolder="vae"),
        UNet2DConditionModel.from_pretrained(str(base), subfolder="unet"),
        DDPMScheduler.from_pretrained(str(base), subfolder="scheduler"),
    )
    m.vae.requires_grad_(False)
    m.text_encoder.requires_grad_(cfg.train_text_encoder)
    if cfg.lora is not None:
        with torch.random.fork_rng(devices=[]):  # adapter init from the run's seed: reruns start alike
            torch.manual_seed(cfg.seed)
            add_lora(cfg, m.unet, m.text_encoder, weight_dtype)
    if cfg.gradient_checkpointing:
        m.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            m.text_encoder.gradient_checkpointing_enable()
    if device.type == "cuda" and cfg.channels_last:
        m.unet.to(memory_format=torch.channels_last)
    m.unet.to(device)
    if cfg.train_text_encoder:
        m.text_encoder.to(device)
    return m


def make_optimizer(cfg: TrainConfig, params: list, device: torch.device, graphs: bool):
    """AdamW (fused on CUDA and on the CPU; capturable, with its LR on the device, for a captured step) and its LR
    schedule, stepped once per optimizer step by the loop (not once per process by accelerate), so its
    state means the same whatever the number of processes that saved or resume it."""
    lr = torch.tensor(cfg.learning_rate, device=device) if graphs else cfg.learning_rate
    optimizer = torch.optim.AdamW(
        params,
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        # torch's fused kernel also runs on the CPU: 3.4 ms a step for the tiny model's 3M parameters on 2 cores,
        # against 23 ms for the default per-tensor loop, a tenth of the embedded default's 210 ms step
        **({"fused": True} if cfg.fused_adam and device.type in ("cuda", "cpu") else {}),
        **({"capturable": True} if graphs else {}),
    )
    return optimizer, make_scheduler(cfg, optimizer)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    """The run's LR schedule (its kind, warm-up and length are per run), stepped once per optimizer step."""
    return get_scheduler(
        cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps
    )


def place(
    cfg: TrainConfig, m: Models, acc: Accelerator, optimizer, lr_scheduler, graphs: bool, weight_dtype: torch.dtype, compile: bool = False
):
    """Move the models to the device (frozen ones in the mixed-precision dtype), let accelerate wrap what
    trains (not for a captured step, which casts itself), compile when the config or `compile` asks
    (`compile`: in the default mode); returns the optimizer and scheduler to step (accelerate's wrappers,
    or the raw ones)."""
    if graphs:
        if not cfg.train_text_encoder:
            m.text_encoder.to(acc.device, dtype=weight_dtype)
    elif cfg.train_text_encoder:
        m.unet, m.text_encoder, optimizer, lr_scheduler = acc.prepare(m.unet, m.text_encoder, optimizer, lr_scheduler)
    else:
        m.unet, optimizer, lr_scheduler = acc.prepare(m.unet, optimizer, lr_scheduler)
        m.text_encoder.to(acc.device, dtype=weight_dtype)
    m.vae.to(acc.device) if weight_dtype == torch.float32 else m.vae.to(acc.device, dtype=weight_dtype)
    if acc.device.type == "cuda" and (cfg.compile_unet or compile):
        mode = None if cfg.compile_mode == "default" or not cfg.compile_unet else cfg.compile_mode
        # shapes never change during training: a dynamic-shape recompile would only cost minutes
        m.unet = torch.compile(m.unet, mode=mode, dynamic=False)
        if cfg.train_text_encoder:
            m.text_encoder = torch.compile(m.text_encoder, mode=mode, dynamic=False)
    elif fuses_norms(cfg, acc.device, graphs, weight_dtype):
        from atelier.models.dreambooth.fused_norm import fuse_group_norms  # imports Triton: only where a step is captured

        fuse_group_norms(m.unet)  # what inductor would fuse, for the uncompiled captured step
    return optimizer, lr_scheduler


def fuses_norms(cfg: TrainConfig, device: torch.device, graphs: bool, weight_dtype: torch.dtype) -> bool:
    """Whether an uncompiled run's UNet gets `fused_norm`'s GroupNorm kernels: a captured bf16 step on CUDA with
    channels_last activations, unless `ATELIER_FUSED_NORMS=0` keeps torch's own (a speed switch only)."""
    if not (graphs and device.type == "cuda" and weight_dtype == torch.bfloat16 and cfg.channels_last):
        return False
    from atelier.models.dreambooth.fused_norm import switched_on  # imports Triton

    return switched_on()


def keep_compiles(cache: Path) -> None:
    """Point torch.compile's caches at `cache` and Triton's at `cache/triton` (unless the user set
    TORCHINDUCTOR_CACHE_DIR or TRITON_CACHE_DIR): they are content-addressed by graph or kernel source,
    shapes, torch/CUDA version and config, so a later process loads its compiled graphs and kernels
    instead of compiling, and they outlive /tmp on a fresh machine's reboot and a container's own home
    (the one-pass optimizer's Triton kernel takes 8.5 s to compile on an H100: without this, every flow
    run in a new container paid it). Call before the first compile."""
    for variable, folder in (("TORCHINDUCTOR_CACHE_DIR", Path(cache)), ("TRITON_CACHE_DIR", Path(cache) / "triton")):
        if variable not in os.environ:
            folder.mkdir(parents=True, exist_ok=True)
            os.environ[variable] = str(folder)
