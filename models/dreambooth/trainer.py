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
from accelerate import Accelerator

from atelier.kernel.storage import write_json_atomic
from atelier.models.dreambooth.base import check_sd_directory
from atelier.models.dreambooth.checkpoints import (
    AsyncCheckpointer,
    LoopState,
    checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
    restore,
)
from atelier.models.dreambooth.config import TrainConfig
from atelier.models.dreambooth.outputs import save_pipeline, validation_samples
from atelier.models.dreambooth.steps import (
    Batches,
    ComputeCopies,
    EagerStep,
    GraphedStep,
    Objective,
    init_adam_state,
    uses_cuda_graphs,
)
from atelier.models.dreambooth.train_setup import Encoded, fresh_accelerator, load_models, make_optimizer, place, token_ids

__all__ = ["TrainInputs", "TrainResult", "train", "latest_checkpoint", "uses_cuda_graphs", "LOSS_READBACK_STEPS"]

ProgressFn = Callable[[int, int, float, float], None]  # step, total, loss, learning rate
StepFn = Callable[[int, int], None]  # step, total
LOSS_READBACK_STEPS = 10  # losses stay on the device between read-backs, so the host never waits per step


@dataclass(frozen=True)
class TrainInputs:
    base_model: Path
    instance_dir: Path
    class_noun: str
    work_dir: Path  # checkpoints and validation samples
    output_dir: Path  # the fine-tuned pipeline (diffusers directory, safetensors)
    class_dir: Path | None = None
    # where the class images' latents are kept between runs: a folder of this base model and this class set
    # (the caller keys it by both), so the next subject of the same class skips decoding and encoding them
    class_latents: Path | None = None


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

    # set-up: the models, the optimizer and LR schedule, a checkpoint to resume, the encoded images
    mark = _Marks(timings)
    m = load_models(cfg, base, weight_dtype, acc.device)
    mark("models")
    params = [p for module in (m.unet, m.text_encoder) for p in module.parameters() if p.requires_grad]
    trained = {k: v for k, v in (("unet", m.unet), ("text_encoder", m.text_encoder)) if any(p.requires_grad for p in v.parameters())}
    optimizer, lr_scheduler = make_optimizer(cfg, params, acc.device, graphs)
    raw_optimizer, raw_scheduler = optimizer, lr_scheduler
    optimizer, lr_scheduler = place(cfg, m, acc, optimizer, lr_scheduler, graphs, weight_dtype)
    mark("place")
    state = LoopState(cfg.seed, acc.device)
    scaler = getattr(acc, "scaler", None)
    resumed_from = None
    # the optimizer's state is placed before any activation exists: allocated later (lazily, in the
    # first step) it lands in blocks that activations freed, and those segments can then never be
    # given back, which costs the captured step's memory pool gigabytes
    ckpt = latest_checkpoint(work)
    if ckpt is not None:
        restore(load_checkpoint(ckpt), trained, raw_optimizer, raw_scheduler, scaler, state)
        resumed_from = state.step
    elif graphs:
        init_adam_state(raw_optimizer)
    mark("optimizer_state")
    instance = Encoded(m.vae, inputs.instance_dir, cfg, acc.device, weight_dtype)
    prior = Encoded(m.vae, inputs.class_dir, cfg, acc.device, weight_dtype, inputs.class_latents) if cfg.with_prior_preservation else None
    timings["class_latents_cached"] = float(prior is not None and prior.cached)
    mark("encode")
    checkpointer = AsyncCheckpointer(work, cfg.checkpoints_total_limit)
    if graphs and cfg.checkpointing_steps < cfg.max_train_steps - state.step:
        # pinning the checkpoints' host memory (12 GB for SD 1.5) holds the driver for seconds: started after
        # the encoding, it overlaps the capture and the first steps instead of stalling the VAE
        checkpointer.reserve(checkpoint_state(state, trained, raw_optimizer, raw_scheduler, scaler))
    bs = cfg.train_batch_size  # per process; the effective batch is bs * processes * accumulation
    batches = Batches(instance, prior, bs, m.noise_scheduler.config.num_train_timesteps, acc.num_processes, acc.process_index)
    ids = token_ids(m.tokenizer, cfg.fill(cfg.instance_prompt, inputs.class_noun), acc.device)
    class_ids = token_ids(m.tokenizer, cfg.fill(cfg.class_prompt, inputs.class_noun), acc.device)
    batch_ids = torch.cat([ids.repeat(bs, 1)] + ([class_ids.repeat(bs, 1)] if prior else []))
    autocast = (
        (lambda: torch.autocast("cuda", dtype=weight_dtype, cache_enabled=False))
        if graphs and weight_dtype != torch.float32
        else (acc.autocast if not graphs else contextlib.nullcontext)
    )
    models = [m.unet] + ([m.text_encoder] if cfg.train_text_encoder else [])
    # a captured mixed-precision step computes with bf16 copies of the weights instead of casting each per use
    # (a compiled UNet fuses its casts itself)
    copies = ComputeCopies(models, weight_dtype) if graphs and weight_dtype != torch.float32 and not cfg.compile_unet else None
    objective = Objective(
        m.unet,
        m.text_encoder,
        m.noise_scheduler,
        batch_ids,
        cfg.train_text_encoder,
        cfg.prior_loss_weight if prior else None,
        autocast,
        copies.call if copies else None,
    )
    if graphs:
        step: Callable[..., torch.Tensor | None] = GraphedStep(
            models, objective, params, optimizer, raw_scheduler, cfg.max_grad_norm, copies
        )
    else:
        compiled_graphs = acc.device.type == "cuda" and cfg.compile_unet and cfg.compile_mode != "default"
        step = EagerStep(acc, models, objective, params, optimizer, lr_scheduler, cfg.max_grad_norm, compiled_graphs)
    timings["load"] = time.perf_counter() - t0

    # the loop: draw, step, report; checkpoint and validate now and then
    taken = 0
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

    loop_start = time.perf_counter()
    while state.step < cfg.max_train_steps and (step_budget is None or taken < step_budget):
        loss = step(*batches.draw(state.generator))
        if loss is None:  # a micro-batch: gradients accumulate
            continue
        state.step += 1
        taken += 1
        if on_step:
            on_step(state.step, cfg.max_train_steps)
        pending.append((loss, _host_lr(raw_scheduler, cfg.learning_rate)))
        budget_hit = step_budget is not None and taken >= step_budget and state.step < cfg.max_train_steps
        # none at the last step: the finished run writes its pipeline, which is what a rerun reuses
        checkpoint = (state.step % cfg.checkpointing_steps == 0 and state.step < cfg.max_train_steps) or budget_hit
        validate = state.step % cfg.validation_steps == 0 and state.step < cfg.max_train_steps
        if checkpoint or validate or state.step % LOSS_READBACK_STEPS == 0:
            flush()
        if checkpoint:
            t = time.perf_counter()
            _checkpoint(
                checkpointer, acc, checkpoint_state(state, trained, raw_optimizer, raw_scheduler, scaler), state.step, wait=budget_hit
            )
            timings["checkpoints"] += time.perf_counter() - t
        if validate and acc.is_main_process:
            t = time.perf_counter()
            validation_dirs.append(
                validation_samples(
                    cfg, work, inputs.class_noun, acc, m.unet, m.text_encoder, m.vae, m.tokenizer, base, state.step, autocast
                )
            )
            timings["validation"] += time.perf_counter() - t
    flush()
    if isinstance(step, GraphedStep):
        timings["capture"] = step.capture_seconds
        timings.update({f"capture_{k}": v for k, v in step.memory.items()})
        timings["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        timings["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    timings["steps"] = time.perf_counter() - loop_start - timings["checkpoints"] - timings["validation"]
    timings["checkpoint_copies"], timings["checkpoint_waits"] = checkpointer.copy_seconds, checkpointer.wait_seconds

    # the end: the pipeline and the training record, once the last checkpoint is on disk
    finished = state.step >= cfg.max_train_steps
    output = None
    t = time.perf_counter()
    if acc.is_main_process:
        checkpointer.wait()  # a checkpoint still being written is whole before the run returns (or its error raised)
    if finished and acc.is_main_process:
        output = save_pipeline(
            acc, base, m.unet, m.text_encoder, inputs.output_dir, lora_text_encoder=cfg.train_text_encoder if cfg.lora is not None else None
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


class _Marks:
    """Seconds since the last mark, added to `timings` under each mark's name (the set-up's parts)."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings, self.last = timings, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[f"load_{name}"] = now - self.last
        self.last = now


def _host_lr(scheduler, base_lr: float) -> float:
    """The LR now, as a number, without reading a device tensor back (a captured step's LR lives on the device)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas:
        return base_lr * float(lambdas[0](scheduler.last_epoch))
    value = scheduler.get_last_lr()[0]
    return float(value)


def _checkpoint(checkpointer: AsyncCheckpointer, acc: Accelerator, snapshot: dict, step: int, wait: bool) -> None:
    if acc.is_main_process:
        checkpointer.save(step, snapshot)
        if wait:  # the run stops here: the checkpoint must be on disk before it returns
            checkpointer.wait()
    acc.wait_for_everyone()
