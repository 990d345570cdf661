"""The DreamBooth trainer: prior-preservation fine-tuning of a Stable Diffusion pipeline.

Semantics follow diffusers' examples/dreambooth/train_dreambooth.py (instance and class images in
one batch, loss = instance MSE + prior_loss_weight * prior MSE, VAE frozen, text encoder optional).
All randomness of the loop comes from one seeded generator whose state is checkpointed with the
weights, optimizer, LR scheduler and step, so a resumed run continues the uninterrupted loss curve.
Because the VAE is frozen, each image's latent distribution is encoded once and sampled per step.
With `lora` set, the base weights are frozen and only peft LoRA adapters train; the output is the
same kind of whole pipeline (adapters fused), plus the adapters alone under `lora/`.

Under `accelerate launch` (DDP, one process per device) every process draws the whole global batch
from the shared generator and trains on its slice, so N processes with batch b train exactly as one
process with batch N*b (gradients are averaged); checkpoints are written once and resume with any
number of processes. The LR schedule counts optimizer steps, whatever the number of processes.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from transformers import CLIPTextModel, CLIPTokenizer

from atelier.storage import atomic_dir, write_json_atomic
from models.dreambooth.base import check_sd_directory
from models.dreambooth.config import TrainConfig
from models.dreambooth.images import stack_folder
from models.dreambooth.sampling import GenerationRequest, generate, use_sampler

ProgressFn = Callable[[int, int, float, float], None]  # step, total, loss, learning rate
CKPT_PREFIX = "checkpoint-"
LOSS_READBACK_STEPS = 10  # losses stay on the device between read-backs, so the host never waits per step


@dataclass(frozen=True)
class TrainInputs:
    base_model: Path
    instance_dir: Path
    class_noun: str
    work_dir: Path  # checkpoints and validation samples
    output_dir: Path  # the fine-tuned pipeline (diffusers directory, safetensors)
    class_dir: Path | None = None


@dataclass
class TrainResult:
    finished: bool
    step: int
    losses: list[float]
    output_dir: Path | None
    resumed_from: int | None
    seconds: float
    validation_dirs: list[Path] = field(default_factory=list)


class LoopState:
    """What the loop needs besides weights and optimizer to continue exactly: step, losses, RNG."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        # on the training device: drawing noise there needs no host-to-device copy (each copy from
        # pageable memory would synchronise the stream and stall the GPU every step)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.step = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "losses": list(self.losses), "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        self.generator.set_state(state["rng"])


def latest_checkpoint(work_dir: Path) -> Path | None:
    root = Path(work_dir) / "checkpoints"
    found = sorted(root.glob(f"{CKPT_PREFIX}*")) if root.is_dir() else []
    return found[-1] if found else None


class _Encoded:
    """Latent distributions (mean, std) of a folder of images under the frozen VAE."""

    def __init__(self, vae: AutoencoderKL, folder: Path, cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> None:
        pixels = stack_folder(folder, cfg.resolution, cfg.center_crop)
        means, stds = [], []
        with torch.no_grad():
            for chunk in pixels.split(8):
                dist = vae.encode(chunk.to(device, dtype)).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        self.scaling = vae.config.scaling_factor

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, batch: int, gen: torch.Generator, world: int = 1, rank: int = 0) -> torch.Tensor:
        """Draw the global batch (every process draws the same), return this process's slice."""
        idx = torch.randint(len(self), (batch * world,), generator=gen, device=gen.device)
        eps = torch.randn(self.mean[idx].shape, generator=gen, device=gen.device)
        mine = slice(rank * batch, (rank + 1) * batch)
        return (self.mean[idx][mine] + self.std[idx][mine] * eps[mine]) * self.scaling


def _ids(tokenizer: CLIPTokenizer, prompt: str, device: torch.device) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids.to(device)


def train(cfg: TrainConfig, inputs: TrainInputs, on_progress: ProgressFn | None = None,
          step_budget: int | None = None) -> TrainResult:
    """Train, resuming from the newest checkpoint in `inputs.work_dir` when there is one.

    `step_budget` caps the optimizer steps taken by this call (for preemptible machines and tests):
    the run then checkpoints and returns `finished=False`; calling again continues it.
    """
    t0 = time.perf_counter()
    base = check_sd_directory(inputs.base_model)
    if cfg.with_prior_preservation and inputs.class_dir is None:
        raise ValueError("with_prior_preservation needs class_dir")
    work = Path(inputs.work_dir)
    precision = cfg.resolved_precision(torch.cuda.is_available())
    acc = _fresh_accelerator(precision, cfg.gradient_accumulation_steps)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)

    tokenizer = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(str(base), subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(str(base), subfolder="scheduler")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    if cfg.lora is not None:
        with torch.random.fork_rng(devices=[]):  # adapter init from the run's seed: reruns start alike
            torch.manual_seed(cfg.seed)
            _add_lora(cfg, unet, text_encoder, weight_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    cuda = acc.device.type == "cuda"
    if cuda and cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    unet.to(acc.device)
    if cfg.train_text_encoder:
        text_encoder.to(acc.device)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                                  **({"fused": True} if cuda and cfg.fused_adam else {}))
    # stepped once per optimizer step by the loop (not once per process by accelerate), so its
    # state means the same whatever the number of processes that saved or resume it
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)
    if cfg.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = acc.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
        text_encoder.to(acc.device, dtype=weight_dtype)
    vae.to(acc.device) if weight_dtype == torch.float32 else vae.to(acc.device, dtype=weight_dtype)

    graphs = cuda and cfg.compile_unet and cfg.compile_mode != "default"
    if cuda and cfg.compile_unet:
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        # shapes never change during training: a dynamic-shape recompile would only cost minutes
        unet = torch.compile(unet, mode=mode, dynamic=False)
        if cfg.train_text_encoder:
            text_encoder = torch.compile(text_encoder, mode=mode, dynamic=False)
    instance = _Encoded(vae, inputs.instance_dir, cfg, acc.device, weight_dtype)
    prior = _Encoded(vae, inputs.class_dir, cfg, acc.device, weight_dtype) if cfg.with_prior_preservation else None
    ids = _ids(tokenizer, cfg.fill(cfg.instance_prompt, inputs.class_noun), acc.device)
    class_ids = _ids(tokenizer, cfg.fill(cfg.class_prompt, inputs.class_noun), acc.device)
    bs = cfg.train_batch_size  # per process; the effective batch is bs * processes * accumulation
    world, rank = acc.num_processes, acc.process_index
    batch_ids = torch.cat([ids.repeat(bs, 1)] + ([class_ids.repeat(bs, 1)] if prior else []))
    frozen_embeddings = None
    if not cfg.train_text_encoder:
        with torch.no_grad():
            frozen_embeddings = text_encoder(batch_ids)[0]

    state = LoopState(cfg.seed, acc.device)
    acc.register_for_checkpointing(state)
    resumed_from = None
    ckpt = latest_checkpoint(work)
    if ckpt is not None:
        acc.load_state(str(ckpt))
        resumed_from = state.step

    models = [unet] + ([text_encoder] if cfg.train_text_encoder else [])
    for m in models:
        m.train()
    taken, micro = 0, []
    pending: list[tuple[torch.Tensor, float]] = []  # (step loss on the device, lr), read back in bursts
    validation_dirs: list[Path] = []

    def flush() -> None:
        """Read pending losses back from the device (one sync) and report them."""
        if not pending:
            return
        values = acc.reduce(torch.stack([loss for loss, _ in pending]), reduction="mean").tolist()
        first = state.step - len(pending) + 1
        for i, (value, (_, lr)) in enumerate(zip(values, pending)):
            state.losses.append(value)
            if on_progress:
                on_progress(first + i, cfg.max_train_steps, value, lr)
        pending.clear()

    while state.step < cfg.max_train_steps and (step_budget is None or taken < step_budget):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with acc.accumulate(*models):
            latents = instance.sample(bs, state.generator, world, rank)
            if prior is not None:
                latents = torch.cat([latents, prior.sample(bs, state.generator, world, rank)])
            kinds = 2 if prior is not None else 1
            noise = torch.randn((kinds, world * bs, *latents.shape[1:]), generator=state.generator, device=latents.device)
            noise = noise[:, rank * bs:(rank + 1) * bs].reshape(latents.shape)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (kinds, world * bs),
                                      generator=state.generator, device=latents.device)
            timesteps = timesteps[:, rank * bs:(rank + 1) * bs].reshape(-1)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            embeddings = frozen_embeddings if frozen_embeddings is not None else text_encoder(batch_ids)[0]
            pred = unet(noisy, timesteps, embeddings).sample
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            if prior is not None:
                pred, pred_prior = pred.chunk(2)
                target, target_prior = target.chunk(2)
                loss = F.mse_loss(pred.float(), target.float()) + cfg.prior_loss_weight * F.mse_loss(pred_prior.float(), target_prior.float())
            else:
                loss = F.mse_loss(pred.float(), target.float())
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            if acc.sync_gradients:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        micro.append(loss.detach().float())
        if not acc.sync_gradients:
            continue
        state.step += 1
        taken += 1
        pending.append((torch.stack(micro).mean(), lr_scheduler.get_last_lr()[0]))
        micro = []
        budget_hit = step_budget is not None and taken >= step_budget and state.step < cfg.max_train_steps
        checkpoint = state.step % cfg.checkpointing_steps == 0 or budget_hit
        validate = state.step % cfg.validation_steps == 0 and state.step < cfg.max_train_steps
        if checkpoint or validate or state.step % LOSS_READBACK_STEPS == 0:
            flush()
        if checkpoint:
            _save_checkpoint(acc, work, state.step, cfg.checkpoints_total_limit)
        if validate and acc.is_main_process:
            validation_dirs.append(_validation_samples(cfg, inputs, acc, unet, text_encoder, vae, tokenizer, base, state.step))
    flush()

    finished = state.step >= cfg.max_train_steps
    output = None
    if finished and acc.is_main_process:
        output = _save_pipeline(acc, base, unet, text_encoder, inputs.output_dir,
                                lora_text_encoder=cfg.train_text_encoder if cfg.lora is not None else None)
        write_json_atomic(work / "training.json", {"steps": state.step, "losses": state.losses, "resumed_from": resumed_from,
                                                   "seconds": time.perf_counter() - t0})
    acc.wait_for_everyone()
    return TrainResult(finished, state.step, list(state.losses), output, resumed_from, time.perf_counter() - t0, validation_dirs)


def _add_lora(cfg: TrainConfig, unet, text_encoder, weight_dtype: torch.dtype) -> None:
    """Freeze the base weights (kept in the mixed-precision dtype: half the memory) and add trainable
    LoRA adapters, kept in fp32 so that small updates are not rounded away."""
    from peft import LoraConfig as PeftLoraConfig

    rank = cfg.lora.rank
    unet.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    unet.add_adapter(PeftLoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=cfg.lora.unet_target_modules))
    models = [unet]
    if cfg.train_text_encoder:
        text_encoder.requires_grad_(False)
        text_encoder.to(dtype=weight_dtype)
        text_encoder.add_adapter(PeftLoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                target_modules=cfg.lora.text_encoder_target_modules))
        models.append(text_encoder)
    for m in models:
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()


def _fresh_accelerator(precision: str, accumulation: int) -> Accelerator:
    """accelerate keeps one process-wide state; a long-lived worker trains many models with different
    precision and accumulation, so each run starts from a clean state (the process group is kept)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=accumulation, cpu=not torch.cuda.is_available(),
                       step_scheduler_with_optimizer=False)


def _save_checkpoint(acc: Accelerator, work: Path, step: int, keep: int) -> Path:
    root = work / "checkpoints"
    final = root / f"{CKPT_PREFIX}{step:07d}"
    tmp = root / f".tmp-{step:07d}"
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))
    except Exception as exc:  # torch says "unexpected pos", safetensors "No space left on device (os error 28)"
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint behind
        free = shutil.disk_usage(root).free
        if isinstance(exc, OSError) or "No space left" in str(exc) or free < 64 * 2**20:
            from atelier.errors import DiskError

            raise DiskError(f"disk holding {root}", f"could not take checkpoint {step} ({free // 2**20} MiB free: {exc})"[:300],
                            "free some space and rerun: training resumes from the last whole checkpoint") from None
        raise
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob(f"{CKPT_PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _pipeline(acc: Accelerator, base: Path, unet, text_encoder, vae=None, tokenizer=None) -> StableDiffusionPipeline:
    extra = {"vae": vae, "tokenizer": tokenizer} if vae is not None else {}
    return StableDiffusionPipeline.from_pretrained(
        str(base), unet=acc.unwrap_model(unet, keep_torch_compile=False),
        text_encoder=acc.unwrap_model(text_encoder, keep_torch_compile=False), safety_checker=None,
        requires_safety_checker=False, local_files_only=True, **extra)


def _validation_samples(cfg: TrainConfig, inputs: TrainInputs, acc: Accelerator, unet, text_encoder, vae, tokenizer,
                        base: Path, step: int) -> Path:
    out = Path(inputs.work_dir) / "validation" / f"step-{step:07d}"
    with torch.random.fork_rng(devices=[]):
        pipe = _pipeline(acc, base, unet, text_encoder, vae, tokenizer)
        use_sampler(pipe, cfg.sampling.sampler)
        pipe.set_progress_bar_config(disable=True)
        requests = [GenerationRequest(cfg.fill(p, inputs.class_noun), cfg.seed + i, cfg.sampling.steps, cfg.sampling.guidance_scale)
                    for i, p in enumerate(cfg.validation_prompts)]
        with atomic_dir(out, replace=True) as tmp:
            with acc.autocast():  # trained weights in fp32, frozen ones in the mixed-precision dtype
                images = generate(pipe, requests, cfg.sampling.batch_size)
            for i, img in enumerate(images):
                img.save(tmp / f"{i:02d}.png")
    for m in (unet, text_encoder):
        if any(p.requires_grad for p in m.parameters()):  # back to training mode after sampling
            m.train()
    return out


def _save_pipeline(acc: Accelerator, base: Path, unet, text_encoder, output_dir: Path,
                   lora_text_encoder: bool | None = None) -> Path:
    """Write the fine-tuned pipeline. A LoRA run (`lora_text_encoder` not None) writes its adapters
    under `lora/` and the whole pipeline with them fused into the fp32 base weights, so serving and
    lineage treat both kinds of run alike."""
    with atomic_dir(Path(output_dir), replace=True) as tmp:
        if lora_text_encoder is None:
            _pipeline(acc, base, unet, text_encoder).save_pretrained(tmp, safe_serialization=True)
            _forget_paths(tmp, base)
            return Path(output_dir)
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        def adapters(model):
            return convert_state_dict_to_diffusers(get_peft_model_state_dict(acc.unwrap_model(model, keep_torch_compile=False),
                                                                    save_embedding_layers=False))

        StableDiffusionPipeline.save_lora_weights(tmp / "lora", unet_lora_layers=adapters(unet),
                                                  text_encoder_lora_layers=adapters(text_encoder) if lora_text_encoder else None,
                                                  safe_serialization=True)
        pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False,
                                                       local_files_only=True)
        pipe.load_lora_weights(str(tmp / "lora"))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        pipe.save_pretrained(tmp, safe_serialization=True)
        _forget_paths(tmp, base)
    return Path(output_dir)


def _forget_paths(pipeline_dir: Path, base: Path) -> None:
    """diffusers and transformers write the base model's absolute path (`_name_or_path`) into the saved
    configs; the same weights trained in another workspace would then hash differently. Lineage names
    the base model by id and hash instead."""
    import json

    for path in Path(pipeline_dir).rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and str(data.get("_name_or_path", "")).startswith(str(base)):
            data["_name_or_path"] = "base-model"
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
