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
    trained_tensors,
)
from atelier.models.dreambooth.config import TrainConfig
from atelier.models.dreambooth.handoff import HostWeights, Pending
from atelier.models.dreambooth.outputs import save_pipeline
from atelier.models.dreambooth.pace import Pace
from atelier.models.dreambooth.steps import (
    Batches,
    ComputeCopies,
    EagerStep,
    GraphedStep,
    Objective,
    init_adam_state,
    uses_cuda_graphs,
)
from atelier.models.dreambooth.train_setup import (
    Encoded,
    fresh_accelerator,
    load_models,
    make_optimizer,
    make_scheduler,
    place,
    token_ids,
)
from atelier.models.dreambooth.validation import ValidationSampler, run_sampler, validation_samples

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
    # a run with defer_save: the pipeline still being written (wait() before reading output_dir)
    pending: "Pending | None" = field(default=None, repr=False, compare=False)


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
    session = TrainerSession(cfg, inputs.base_model)
    try:
        return session.run(cfg, inputs, on_progress, step_budget, on_step)
    finally:
        session.close()


# what a run may change without a new session: the rest shapes the models, the optimizer or the step
PER_RUN_FIELDS = frozenset(
    {
        "identifier",
        "instance_prompt",
        "class_prompt",
        "resolution",
        "center_crop",
        "with_prior_preservation",
        "prior_loss_weight",
        "num_class_images",
        "class_prior_seed",
        "class_sampling",
        "lr_scheduler",
        "lr_warmup_steps",
        "max_train_steps",
        "train_batch_size",
        "max_grad_norm",
        "seed",  # (not with LoRA: the adapters are initialised from it)
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "validation_prompts",
        "sampling",
        "sample_prompts",
        "samples_per_prompt",
    }
)


def session_key(cfg: TrainConfig, base: Path) -> str:
    """What a kept session must match for a run to reuse it: the base model (path, sizes and times of
    its files) and the configuration that shapes the models, optimizer and step."""
    import json

    from atelier.kernel.hashing import stat_signature

    fields = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in PER_RUN_FIELDS or (k == "seed" and cfg.lora is not None)}
    return json.dumps({"base": str(Path(base).resolve()), "files": stat_signature(Path(base)), "config": fields}, sort_keys=True)


class TrainerSession:
    """What a run sets up before its first step that does not depend on the subject: the base model's
    parts on the device, what trains, the optimizer (and its accelerate wrappers), the checkpoints'
    host buffers. `train()` makes one per run; a resident trainer (`models.dreambooth.service`) makes one
    with `keep=True` and runs subject after subject in it, each starting from the base weights again
    (restored from a host copy taken at load) with a fresh optimizer state and LR schedule, which is
    what a new process would start from."""

    def __init__(self, cfg: TrainConfig, base_model: Path, keep: bool = False, compile: bool = False) -> None:
        # compile: torch.compile in the captured step whatever compile_unet says (speed only: in no key)
        t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        mark = _Marks(self.timings)
        self.base = check_sd_directory(base_model)
        self.key = session_key(cfg, self.base) if keep else ""
        self.precision = cfg.resolved_precision(torch.cuda.is_available())
        self.graphs = uses_cuda_graphs(cfg, self.precision, int(os.environ.get("WORLD_SIZE", "1")))
        # a captured step casts under its own autocast (without a cast cache, which a graph must not keep)
        self.acc = fresh_accelerator("no" if self.graphs else self.precision, cfg.gradient_accumulation_steps)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        m = self.m = load_models(cfg, self.base, self.weight_dtype, self.acc.device)
        mark("models")
        self.params = [p for module in (m.unet, m.text_encoder) for p in module.parameters() if p.requires_grad]
        self.trained = {
            k: v for k, v in (("unet", m.unet), ("text_encoder", m.text_encoder)) if any(p.requires_grad for p in v.parameters())
        }
        self.raw_optimizer, self.raw_scheduler = make_optimizer(cfg, self.params, self.acc.device, self.graphs)
        self.compiled = self.acc.device.type == "cuda" and (cfg.compile_unet or (compile and self.graphs))
        self.optimizer, self.lr_scheduler = place(
            cfg, m, self.acc, self.raw_optimizer, self.raw_scheduler, self.graphs, self.weight_dtype, self.compiled
        )
        self.models = [m.unet] + ([m.text_encoder] if cfg.train_text_encoder else [])
        mark("place")
        # the base weights, to start the next subject from (pinned host memory: restored at PCIe speed)
        self.pristine = (
            {n: t.to("cpu", copy=True).pin_memory() if t.is_cuda else t.clone() for n, t in _trainable(self.trained).items()}
            if keep
            else None
        )
        self.checkpoint_buffers: dict[str, torch.Tensor] = {}
        self.host_weights = HostWeights()  # the trained weights at each run's end, for the background save
        self.runs = 0
        self.load_seconds = time.perf_counter() - t0

    def reusable_for(self, cfg: TrainConfig, base: Path) -> bool:
        return bool(self.key) and getattr(self.acc, "scaler", None) is None and session_key(cfg, base) == self.key

    def _reset(self, cfg: TrainConfig) -> None:
        """Back to the state a fresh session starts in: base weights, empty optimizer moments, the LR
        schedule at step 0 (the session's LR tensor refilled, not replaced: a captured step reads it)."""
        with torch.no_grad():
            current = _trainable(self.trained)
            for name, tensor in self.pristine.items():
                current[name].copy_(tensor, non_blocking=True)
        if self.graphs:
            for st in self.raw_optimizer.state.values():
                for value in st.values():
                    if isinstance(value, torch.Tensor):
                        value.zero_()
        else:
            self.raw_optimizer.state.clear()
        for group in self.raw_optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(cfg.learning_rate)
            else:
                group["lr"] = cfg.learning_rate
            group.pop("initial_lr", None)

    def close(self) -> None:
        """Let the device memory go (a resident trainer replacing its session calls this first)."""
        for name in (
            "m",
            "params",
            "trained",
            "optimizer",
            "raw_optimizer",
            "lr_scheduler",
            "raw_scheduler",
            "models",
            "pristine",
            "host_weights",
        ):
            self.__dict__.pop(name, None)
        self.checkpoint_buffers = {}
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(
        self,
        cfg: TrainConfig,
        inputs: TrainInputs,
        on_progress: ProgressFn | None = None,
        step_budget: int | None = None,
        on_step: StepFn | None = None,
        defer_save: bool = False,
    ) -> TrainResult:
        """One subject's training (see `train`) in this session. With `defer_save` the weights are
        copied to host memory and the pipeline is written in the background: the result's `pending`
        says when it is whole, and the session is free for the next subject at once."""
        t0 = time.perf_counter()
        timings = {"load": 0.0, "steps": 0.0, "checkpoints": 0.0, "validation": 0.0, "save": 0.0, "capture": 0.0}
        if self.runs == 0:
            timings.update(self.timings)
            t0 -= self.load_seconds
        else:
            self._reset(cfg)
            timings["session_reused"] = 1.0
        self.runs += 1
        mark = _Marks(timings)
        base, acc, m, graphs, weight_dtype = self.base, self.acc, self.m, self.graphs, self.weight_dtype
        raw_optimizer, trained, params, optimizer = self.raw_optimizer, self.trained, self.params, self.optimizer
        if cfg.with_prior_preservation and inputs.class_dir is None:
            raise ValueError("with_prior_preservation needs class_dir")
        work = Path(inputs.work_dir)
        # the LR schedule is the run's (its length and warm-up are per run); stepped by the loop
        raw_scheduler, lr_scheduler = self.raw_scheduler, self.lr_scheduler
        if self.runs > 1:
            raw_scheduler = lr_scheduler = make_scheduler(cfg, raw_optimizer)
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
        prior = (
            Encoded(m.vae, inputs.class_dir, cfg, acc.device, weight_dtype, inputs.class_latents) if cfg.with_prior_preservation else None
        )
        timings["class_latents_cached"] = float(prior is not None and prior.cached)
        mark("encode")
        checkpointer = AsyncCheckpointer(work, cfg.checkpoints_total_limit, self.checkpoint_buffers)
        # pinning the checkpoints' host memory (12 GB for SD 1.5) holds the driver for seconds: beside the eager
        # steps and the capture, which launch thousands of kernels, it stalled them (4 s on an H100); started
        # once the captured step replays (one launch a step), the steps queued on the device cover it
        reserve = graphs and cfg.checkpointing_steps < cfg.max_train_steps - state.step
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
        models = self.models
        # a captured mixed-precision step computes with bf16 copies of the weights (compiled or not) instead of casts
        copies = ComputeCopies(models, weight_dtype) if graphs and weight_dtype != torch.float32 else None
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
        sampler: ValidationSampler | None = None  # built at the first validation (after the capture, in its pool)

        pace = Pace(state.step)

        def flush() -> None:
            """Read pending losses back from the device (one sync) and report them."""
            if not pending:
                return
            values = acc.reduce(torch.stack([loss for loss, _ in pending]), reduction="mean").tolist()
            pace.read_back(state.step)
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
            if reserve and getattr(step, "graph", None) is not None:
                checkpointer.reserve(checkpoint_state(state, trained, raw_optimizer, raw_scheduler, scaler))
                reserve = False
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
                checkpointer.reserved()  # the sampler's first call captures a graph: no pinning beside it
                sampler = sampler or run_sampler(acc, m, autocast, copies, getattr(step, "graph", None))
                validation_dirs.append(validation_samples(sampler, cfg, work, inputs.class_noun, state.step))
                timings["validation"] += time.perf_counter() - t
            if checkpoint or validate:
                pace.restart(state.step)  # the next window counts steps only
        flush()
        timings.update(pace.summary())
        if isinstance(step, GraphedStep):
            timings["capture"] = step.capture_seconds
            timings["one_pass_adamw"] = float(step.update is not None)
            timings.update({f"capture_{k}": v for k, v in step.memory.items()})
            timings["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            timings["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        timings["steps"] = time.perf_counter() - loop_start - timings["checkpoints"] - timings["validation"]
        timings["checkpoint_copies"], timings["checkpoint_waits"] = checkpointer.copy_seconds, checkpointer.wait_seconds

        # the end: the pipeline and the training record, once the last checkpoint is on disk
        finished = state.step >= cfg.max_train_steps
        t = time.perf_counter()
        if acc.is_main_process:
            checkpointer.wait()  # a checkpoint still being written is whole before the run returns (or its error raised)
        unet, text_encoder = m.unet, m.text_encoder
        whole = finished and acc.num_processes == 1 and cfg.lora is None
        deferred = defer_save and whole
        # deferred: the weights leave the device now; the session is free for the next subject while they are written.
        # Written now from a GPU: staged in one pass into the checkpoints' pinned buffers, free again, instead
        # of safetensors copying a thousand device tensors one at a time into fresh pageable memory
        staged = {}
        if whole and (deferred or acc.device.type == "cuda"):
            checkpointer.reserved()
            staging_start = time.perf_counter()
            staging = self.host_weights if deferred else HostWeights(dict(self.checkpoint_buffers), pin=False)
            staged = staging.stage({"unet": unet, "text_encoder": text_encoder})
            timings["save_staging"] = time.perf_counter() - staging_start
        output = inputs.output_dir if finished and acc.is_main_process else None
        record = {"steps": state.step, "losses": state.losses, "resumed_from": resumed_from}
        record |= {"cuda_graphs": graphs, "compiled": self.compiled}

        def write() -> None:
            """The pipeline, then the training record (which, with model_index.json, says the run is done)."""
            if output is None:
                return
            w = time.perf_counter()
            parts = (staged["unet"](), staged["text_encoder"]()) if staged else (unet, text_encoder)
            save_pipeline(acc, base, *parts, output, lora_text_encoder=cfg.train_text_encoder if cfg.lora is not None else None)
            timings["save"] = time.perf_counter() - w if deferred else time.perf_counter() - t
            write_json_atomic(work / "training.json", {**record, "seconds": time.perf_counter() - t0, "timings": timings})

        if deferred:
            timings["save_handoff"] = time.perf_counter() - t
            pending = self.host_weights.reader = Pending(write)
        else:
            write()
            pending = None
        acc.wait_for_everyone()
        # the captured step's memory (its pool, the gradients and the clip scale that live in it) goes with the run
        del step, objective, copies, sampler
        raw_optimizer.zero_grad(set_to_none=True)
        raw_optimizer.__dict__.pop("grad_scale", None)
        if graphs:
            torch.cuda.empty_cache()
        return TrainResult(
            finished, state.step, list(state.losses), output, resumed_from, time.perf_counter() - t0, validation_dirs, timings, pending
        )


def _trainable(trained: dict) -> dict[str, torch.Tensor]:
    """The trained tensors of every trained model, by model and name (what a reset restores)."""
    return {f"{k}/{n}": t for k, m in trained.items() for n, t in trained_tensors(m).items()}


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
