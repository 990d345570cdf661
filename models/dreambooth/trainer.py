"""The DreamBooth trainer: prior-preservation fine-tuning of a Stable Diffusion pipeline.

Semantics follow diffusers' examples/dreambooth/train_dreambooth.py (instance and class images in
one batch, loss = instance MSE + prior_loss_weight * prior MSE, VAE frozen, text encoder optional).
All randomness of the loop comes from one seeded generator whose state is checkpointed with the
weights, optimizer, LR scheduler and step, so a resumed run continues the uninterrupted loss curve.
Because the VAE is frozen, each image's latent distribution is encoded once and sampled per step.
With `lora` set, the base weights are frozen and only peft LoRA adapters train; the output is the
same kind of whole pipeline (adapters fused), plus the adapters alone under `lora/`.

On one CUDA device (`cuda_graphs`, the default there) the whole optimizer step (text encoder and
UNet forward, loss, backward, gradient clipping, the fused AdamW update) is captured once as a CUDA
graph after three ordinary steps and replayed for every later step: a step of SD 1.5 launches
thousands of small kernels, and launching them cost more than running them. The random draws
(which images, noise, timesteps) stay outside the graph, from the same generator in the same order,
so a captured run draws what an eager one draws. Nothing is compiled, so there is no compile to wait
for on a fresh machine.

Under `accelerate launch` (DDP, one process per device) every process draws the whole global batch
from the shared generator and trains on its slice, so N processes with batch b train exactly as one
process with batch N*b (gradients are averaged); checkpoints are written once and resume with any
number of processes. The LR schedule counts optimizer steps, whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from transformers import CLIPTextModel, CLIPTokenizer

from atelier.kernel.storage import write_json_atomic
from atelier.models.dreambooth.base import check_sd_directory
from atelier.models.dreambooth.checkpoints import AsyncCheckpointer, latest_checkpoint, load_checkpoint
from atelier.models.dreambooth.config import TrainConfig
from atelier.models.dreambooth.outputs import save_pipeline, validation_samples
from atelier.models.dreambooth.train_setup import Encoded, add_lora, fresh_accelerator, token_ids

__all__ = ["TrainInputs", "TrainResult", "train", "latest_checkpoint", "LOSS_READBACK_STEPS"]

ProgressFn = Callable[[int, int, float, float], None]  # step, total, loss, learning rate
StepFn = Callable[[int, int], None]  # step, total
LOSS_READBACK_STEPS = 10  # losses stay on the device between read-backs, so the host never waits per step
EAGER_STEPS_BEFORE_CAPTURE = 3  # lazy state (optimizer moments, cuBLAS workspaces) exists before a graph is captured


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
    timings: dict[str, float] = field(default_factory=dict)  # load, steps, checkpoints, validation, save (seconds)


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


def uses_cuda_graphs(cfg: TrainConfig, precision: str, processes: int) -> bool:
    """Whether a run captures its step as a CUDA graph: on CUDA, one process, no gradient accumulation
    or checkpointing (both step outside a fixed graph), bf16 or fp32 (fp16's grad scaler reads back
    from the device every step), and no compiler-made graphs already (compile_mode reduce-overhead)."""
    return (
        cfg.cuda_graphs
        and torch.cuda.is_available()
        and processes == 1
        and cfg.gradient_accumulation_steps == 1
        and not cfg.gradient_checkpointing
        and precision in ("bf16", "no")
        and not (cfg.compile_unet and cfg.compile_mode != "default")
    )


def train(
    cfg: TrainConfig,
    inputs: TrainInputs,
    on_progress: ProgressFn | None = None,
    step_budget: int | None = None,
    on_step: StepFn | None = None,
) -> TrainResult:
    """Train, resuming from the newest checkpoint in `inputs.work_dir` when there is one.

    `on_step(step, total)` is called as each optimizer step ends (for a progress bar: no device sync);
    `on_progress(step, total, loss, lr)` with each step's loss, which is read back from the device in
    bursts (LOSS_READBACK_STEPS), so its calls come in groups.

    `step_budget` caps the optimizer steps taken by this call (for preemptible machines and tests):
    the run then checkpoints and returns `finished=False`; calling again continues it.
    """
    t0 = time.perf_counter()
    timings = {"load": 0.0, "steps": 0.0, "checkpoints": 0.0, "validation": 0.0, "save": 0.0, "capture": 0.0}
    base = check_sd_directory(inputs.base_model)
    if cfg.with_prior_preservation and inputs.class_dir is None:
        raise ValueError("with_prior_preservation needs class_dir")
    work = Path(inputs.work_dir)
    precision = cfg.resolved_precision(torch.cuda.is_available())
    graphs = uses_cuda_graphs(cfg, precision, int(os.environ.get("WORLD_SIZE", "1")))
    # a captured step casts under its own autocast (without a cast cache, which a graph must not keep)
    acc = fresh_accelerator("no" if graphs else precision, cfg.gradient_accumulation_steps)
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
            add_lora(cfg, unet, text_encoder, weight_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    cuda = acc.device.type == "cuda"
    if cuda and cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    trained = {k: m for k, m in (("unet", unet), ("text_encoder", text_encoder)) if any(p.requires_grad for p in m.parameters())}
    unet.to(acc.device)
    if cfg.train_text_encoder:
        text_encoder.to(acc.device)
    lr = torch.tensor(cfg.learning_rate, device=acc.device) if graphs else cfg.learning_rate  # a graph reads the LR from the device
    optimizer = torch.optim.AdamW(
        params,
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        **({"fused": True} if cuda and cfg.fused_adam else {}),
        **({"capturable": True} if graphs else {}),
    )
    # stepped once per optimizer step by the loop (not once per process by accelerate), so its
    # state means the same whatever the number of processes that saved or resume it
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps
    )
    raw_optimizer, raw_scheduler = optimizer, lr_scheduler
    if graphs:
        if not cfg.train_text_encoder:
            text_encoder.to(acc.device, dtype=weight_dtype)
    elif cfg.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = acc.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
        text_encoder.to(acc.device, dtype=weight_dtype)
    vae.to(acc.device) if weight_dtype == torch.float32 else vae.to(acc.device, dtype=weight_dtype)

    if cuda and cfg.compile_unet:
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        # shapes never change during training: a dynamic-shape recompile would only cost minutes
        unet = torch.compile(unet, mode=mode, dynamic=False)
        if cfg.train_text_encoder:
            text_encoder = torch.compile(text_encoder, mode=mode, dynamic=False)
    compiled_graphs = cuda and cfg.compile_unet and cfg.compile_mode != "default"
    state = LoopState(cfg.seed, acc.device)
    scaler = getattr(acc, "scaler", None)
    resumed_from = None
    # the optimizer's state is placed before any activation exists: allocated later (lazily, in the
    # first step) it lands in blocks that activations freed, and those segments can then never be
    # given back, which costs the captured step's memory pool gigabytes
    ckpt = latest_checkpoint(work)
    if ckpt is not None:
        _restore(load_checkpoint(ckpt), trained, raw_optimizer, raw_scheduler, scaler, state, acc)
        resumed_from = state.step
    elif graphs:
        _init_adam_state(raw_optimizer)
    checkpointer = AsyncCheckpointer(work, cfg.checkpoints_total_limit)
    if graphs and cfg.checkpointing_steps < cfg.max_train_steps - state.step:
        checkpointer.reserve(_checkpoint_state(state, trained, raw_optimizer, raw_scheduler, scaler))
    instance = Encoded(vae, inputs.instance_dir, cfg, acc.device, weight_dtype)
    prior = Encoded(vae, inputs.class_dir, cfg, acc.device, weight_dtype) if cfg.with_prior_preservation else None
    ids = token_ids(tokenizer, cfg.fill(cfg.instance_prompt, inputs.class_noun), acc.device)
    class_ids = token_ids(tokenizer, cfg.fill(cfg.class_prompt, inputs.class_noun), acc.device)
    bs = cfg.train_batch_size  # per process; the effective batch is bs * processes * accumulation
    world, rank = acc.num_processes, acc.process_index
    batch_ids = torch.cat([ids.repeat(bs, 1)] + ([class_ids.repeat(bs, 1)] if prior else []))
    frozen_embeddings = None
    if not cfg.train_text_encoder:
        with torch.no_grad():
            frozen_embeddings = text_encoder(batch_ids)[0]

    timings["load"] = time.perf_counter() - t0

    autocast = (
        (lambda: torch.autocast("cuda", dtype=weight_dtype, cache_enabled=False))
        if graphs and weight_dtype != torch.float32
        else (acc.autocast if not graphs else contextlib.nullcontext)
    )
    kinds = 2 if prior is not None else 1

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's images, noise and timesteps, from the loop's generator."""
        latents = instance.sample(bs, state.generator, world, rank)
        if prior is not None:
            latents = torch.cat([latents, prior.sample(bs, state.generator, world, rank)])
        noise = torch.randn((kinds, world * bs, *latents.shape[1:]), generator=state.generator, device=latents.device)
        noise = noise[:, rank * bs : (rank + 1) * bs].reshape(latents.shape)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (kinds, world * bs), generator=state.generator, device=latents.device
        )
        return latents, noise, timesteps[:, rank * bs : (rank + 1) * bs].reshape(-1)

    def loss_of(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        with autocast():
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            embeddings = frozen_embeddings if frozen_embeddings is not None else text_encoder(batch_ids)[0]
            pred = unet(noisy, timesteps, embeddings).sample
        target = (
            noise_scheduler.get_velocity(latents, noise, timesteps) if noise_scheduler.config.prediction_type == "v_prediction" else noise
        )
        if prior is not None:
            pred, pred_prior = pred.chunk(2)
            target, target_prior = target.chunk(2)
            return F.mse_loss(pred.float(), target.float()) + cfg.prior_loss_weight * F.mse_loss(pred_prior.float(), target_prior.float())
        return F.mse_loss(pred.float(), target.float())

    step_fn = _GraphedStep(loss_of, params, optimizer, cfg.max_grad_norm) if graphs else None
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
        for i, (value, (_, lr_value)) in enumerate(zip(values, pending)):
            state.losses.append(value)
            if on_progress:
                on_progress(first + i, cfg.max_train_steps, value, lr_value)
        pending.clear()

    if graphs:  # blocks the VAE cached on the default stream cannot serve the side stream that the steps run on
        torch.cuda.empty_cache()
    loop_start = time.perf_counter()
    while state.step < cfg.max_train_steps and (step_budget is None or taken < step_budget):
        if step_fn is not None:
            micro.append(step_fn(*draw(), capture=taken >= EAGER_STEPS_BEFORE_CAPTURE))
            raw_scheduler.step()
        else:
            if compiled_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with acc.accumulate(*models):
                loss = loss_of(*draw())
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
        if on_step:
            on_step(state.step, cfg.max_train_steps)
        pending.append((torch.stack(micro).mean(), _host_lr(raw_scheduler, cfg.learning_rate)))
        micro = []
        budget_hit = step_budget is not None and taken >= step_budget and state.step < cfg.max_train_steps
        # none at the last step: the finished run writes its pipeline, which is what a rerun reuses
        checkpoint = (state.step % cfg.checkpointing_steps == 0 and state.step < cfg.max_train_steps) or budget_hit
        validate = state.step % cfg.validation_steps == 0 and state.step < cfg.max_train_steps
        if checkpoint or validate or state.step % LOSS_READBACK_STEPS == 0:
            flush()
        if checkpoint:
            t = time.perf_counter()
            _checkpoint(checkpointer, acc, state, trained, raw_optimizer, raw_scheduler, scaler, wait=budget_hit)
            timings["checkpoints"] += time.perf_counter() - t
        if validate and acc.is_main_process:
            t = time.perf_counter()
            validation_dirs.append(
                validation_samples(cfg, work, inputs.class_noun, acc, unet, text_encoder, vae, tokenizer, base, state.step, autocast)
            )
            timings["validation"] += time.perf_counter() - t
    flush()
    timings["capture"] = step_fn.capture_seconds if step_fn is not None else 0.0
    if step_fn is not None:
        timings.update({f"capture_{k}": v for k, v in step_fn.memory.items()})
        timings["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        timings["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    timings["steps"] = time.perf_counter() - loop_start - timings["checkpoints"] - timings["validation"]
    timings["checkpoint_copies"], timings["checkpoint_waits"] = checkpointer.copy_seconds, checkpointer.wait_seconds

    finished = state.step >= cfg.max_train_steps
    output = None
    t = time.perf_counter()
    if acc.is_main_process:
        checkpointer.wait()  # a checkpoint still being written is whole before the run returns (or its error raised)
    if finished and acc.is_main_process:
        output = save_pipeline(
            acc, base, unet, text_encoder, inputs.output_dir, lora_text_encoder=cfg.train_text_encoder if cfg.lora is not None else None
        )
    timings["save"] = time.perf_counter() - t
    if finished and acc.is_main_process:
        write_json_atomic(
            work / "training.json",
            {
                "steps": state.step,
                "losses": state.losses,
                "resumed_from": resumed_from,
                "seconds": time.perf_counter() - t0,
                "timings": timings,
                "cuda_graphs": graphs,
            },
        )
    acc.wait_for_everyone()
    return TrainResult(finished, state.step, list(state.losses), output, resumed_from, time.perf_counter() - t0, validation_dirs, timings)


class _GraphedStep:
    """One optimizer step (forward, loss, backward, clip, AdamW) that is run eagerly until `capture`,
    then captured once as a CUDA graph and replayed. Inputs are copied into static tensors first."""

    def __init__(self, loss_of, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, max_grad_norm: float) -> None:
        self.loss_of, self.params, self.optimizer, self.max_grad_norm = loss_of, params, optimizer, max_grad_norm
        self.static: list[torch.Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.stream = torch.cuda.Stream()
        self.capture_seconds = 0.0
        self.memory: dict[str, float] = {}

    def _body(self) -> torch.Tensor:
        loss = self.loss_of(*self.static)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return loss.detach()

    def __call__(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, capture: bool) -> torch.Tensor:
        if self.static is None:
            self.static = [latents.clone(), noise.clone(), timesteps.clone()]
        else:
            for buf, value in zip(self.static, (latents, noise, timesteps)):
                buf.copy_(value)
        if self.graph is None and capture:
            t = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated in the graph's pool, written (not added) per replay
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the eager steps' cached blocks would otherwise sit beside the graph's own
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.loss = self._body()
            self.graph = graph
            self.capture_seconds = time.perf_counter() - t
            self.memory = {
                "allocated_gib": torch.cuda.memory_allocated() / 2**30,
                "reserved_gib": torch.cuda.memory_reserved() / 2**30,
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            }
        if self.graph is not None:
            self.graph.replay()
            return self.loss.float().clone()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):  # eager steps on the capture stream: its handles exist when capturing
            loss = self._body()
            self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(self.stream)
        return loss.float()


def _host_lr(scheduler, base_lr: float) -> float:
    """The LR now, as a number, without reading a device tensor back (a captured step's LR lives on the device)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas:
        return base_lr * float(lambdas[0](scheduler.last_epoch))
    value = scheduler.get_last_lr()[0]
    return float(value)


def _trained_tensors(model) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a model: its trainable parameters (all of them, or a LoRA's adapters)."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)  # DDP
    return {n: p.detach() for n, p in inner.named_parameters() if p.requires_grad}


def _checkpoint_state(state: LoopState, trained: dict, optimizer, scheduler, scaler) -> dict:
    return {
        "models": {k: _trained_tensors(m) for k, m in trained.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "loop": state.state_dict(),
    }


def _init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's per-parameter state now, as its first step would (step counter on the device for
    a capturable optimizer, moments shaped and strided like their parameter)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def _checkpoint(
    checkpointer: AsyncCheckpointer, acc: Accelerator, state: LoopState, trained: dict, optimizer, scheduler, scaler, wait: bool
) -> None:
    if acc.is_main_process:
        checkpointer.save(state.step, _checkpoint_state(state, trained, optimizer, scheduler, scaler))
        if wait:  # the run stops here: the checkpoint must be on disk before it returns
            checkpointer.wait()
    acc.wait_for_everyone()


def _restore(ckpt: dict, trained: dict, optimizer, scheduler, scaler, state: LoopState, acc: Accelerator) -> None:
    for name, model in trained.items():
        params = dict(getattr(model, "module", model).named_parameters())
        saved = ckpt["models"].get(name, {})
        missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} trained tensors of the {name} (first: {missing[0]}): "
                "it was written by another configuration; remove it to start over"
            )
        with torch.no_grad():
            for n, tensor in saved.items():
                params[n].copy_(tensor)
    # a captured step reads its LR from a device tensor: loading must refill that tensor, not replace it
    # with the checkpoint's (host) copy, and the scheduler's base LRs come back as plain numbers
    kept = [{k: g[k] for k in ("lr", "initial_lr") if isinstance(g.get(k), torch.Tensor)} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, tensors in zip(optimizer.param_groups, kept):
        for key, tensor in tensors.items():
            tensor.fill_(float(group[key]))
            group[key] = tensor
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        for key, value in optimizer.state.get(p, {}).items():  # moments in their parameter's layout (fused AdamW needs it)
            if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.base_lrs = [float(x) for x in scheduler.base_lrs]
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state.load_state_dict(ckpt["loop"])
