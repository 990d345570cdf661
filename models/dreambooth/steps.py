"""One DreamBooth optimizer step, two ways, behind one call: `step(latents, noise, timesteps)` returns
the step's loss on the device (or None while gradients accumulate), and the optimizer and LR
schedule have moved.

- `EagerStep`: accelerate's loop (mixed precision, gradient accumulation, DDP, torch.compile).
- `GraphedStep`: on one CUDA device, the whole step (forward, loss, backward, clipping, the fused
  AdamW update) runs eagerly for a few steps, is then captured once as a CUDA graph and replayed.

Both draw nothing themselves: `Batches.draw` takes the images, noise and timesteps from the loop's
generator outside the step, so a captured run draws exactly what an eager one draws, and `Objective`
is the loss both compute.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from atelier.models.dreambooth.config import TrainConfig
from atelier.models.dreambooth.train_setup import Encoded

EAGER_STEPS_BEFORE_CAPTURE = 3  # lazy state (optimizer moments, cuBLAS workspaces) exists before a graph is captured


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


class Batches:
    """Each step's images (instance, then class priors), noise and timesteps, from the loop's generator.
    Every process draws the whole global batch and keeps its slice."""

    def __init__(self, instance: Encoded, prior: Encoded | None, batch: int, timesteps: int, world: int = 1, rank: int = 0) -> None:
        self.instance, self.prior, self.batch, self.timesteps, self.world, self.rank = instance, prior, batch, timesteps, world, rank
        self.kinds = 2 if prior is not None else 1

    def draw(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bs, world, rank = self.batch, self.world, self.rank
        latents = self.instance.sample(bs, generator, world, rank)
        if self.prior is not None:
            latents = torch.cat([latents, self.prior.sample(bs, generator, world, rank)])
        noise = torch.randn((self.kinds, world * bs, *latents.shape[1:]), generator=generator, device=latents.device)
        noise = noise[:, rank * bs : (rank + 1) * bs].reshape(latents.shape)
        timesteps = torch.randint(0, self.timesteps, (self.kinds, world * bs), generator=generator, device=latents.device)
        return latents, noise, timesteps[:, rank * bs : (rank + 1) * bs].reshape(-1)


def plain_call(module: torch.nn.Module, *args):
    """A module's call, as `ComputeCopies.call` makes it with the copies in place."""
    return module(*args)


class Objective:
    """The DreamBooth loss: the UNet's noise (or velocity) prediction against the target, instance MSE
    plus prior_loss_weight times the class-prior MSE. With a frozen text encoder the prompt embeddings
    are computed once."""

    def __init__(
        self,
        unet,
        text_encoder,
        noise_scheduler,
        batch_ids: torch.Tensor,
        train_text_encoder: bool,
        prior_loss_weight: float | None,
        autocast: Callable,
        call: Callable | None = None,
    ) -> None:
        self.unet, self.text_encoder, self.noise_scheduler, self.batch_ids = unet, text_encoder, noise_scheduler, batch_ids
        self.prior_loss_weight, self.autocast = prior_loss_weight, autocast
        self.call = call or plain_call  # ComputeCopies.call: the module with its compute-dtype weights
        self.frozen_embeddings = None
        if not train_text_encoder:
            with torch.no_grad():
                self.frozen_embeddings = text_encoder(batch_ids)[0]

    def __call__(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        scheduler = self.noise_scheduler
        with self.autocast():
            noisy = scheduler.add_noise(latents, noise, timesteps)
            embeddings = self.frozen_embeddings if self.frozen_embeddings is not None else self.call(self.text_encoder, self.batch_ids)[0]
            pred = self.call(self.unet, noisy, timesteps, embeddings).sample
        target = scheduler.get_velocity(latents, noise, timesteps) if scheduler.config.prediction_type == "v_prediction" else noise
        if self.prior_loss_weight is not None:
            pred, pred_prior = pred.chunk(2)
            target, target_prior = target.chunk(2)
            return F.mse_loss(pred.float(), target.float()) + self.prior_loss_weight * F.mse_loss(pred_prior.float(), target_prior.float())
        return F.mse_loss(pred.float(), target.float())


class EagerStep:
    """accelerate's step: backward, clipping, optimizer and LR schedule once per `accumulation` calls."""

    def __init__(
        self,
        acc: Accelerator,
        models: list,
        objective: Objective,
        params,
        optimizer,
        lr_scheduler,
        max_grad_norm: float,
        compiled_graphs: bool,
    ) -> None:
        self.acc, self.models, self.objective, self.params = acc, models, objective, params
        self.optimizer, self.lr_scheduler, self.max_grad_norm, self.compiled_graphs = (
            optimizer,
            lr_scheduler,
            max_grad_norm,
            compiled_graphs,
        )
        self.micro: list[torch.Tensor] = []
        for m in models:
            m.train()

    def __call__(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor | None:
        acc = self.acc
        if self.compiled_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with acc.accumulate(*self.models):
            loss = self.objective(latents, noise, timesteps)
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro.append(loss.detach().float())
        if not acc.sync_gradients:
            return None
        mean, self.micro = torch.stack(self.micro).mean(), []
        return mean


class ComputeCopies:
    """Compute-dtype (bf16) copies of the weights that autocast would cast for every use: those of the
    trained Linear and Conv2d layers. The step computes with the copies, so a forward casts nothing; their
    gradients are copied into the float32 weights' gradients and the copies refreshed from the updated
    weights, each in one multi-tensor kernel, where autocast spent one cast kernel per weight forward
    and one per gradient backward (about 1,900 kernels, a third of an SD 1.5 step's GPU time).

    The values are autocast's exactly (a bf16 copy of each float32 weight, a bf16 gradient cast to
    float32), so the loss curve is the same. Norms and embeddings keep their float32 weights, as autocast
    would. The modules keep their float32 parameters outside `call`: checkpoints, saving and sampling
    see nothing of the copies.

    `call` puts the copies in the layers' parameter slots for the length of one forward and puts the
    float32 weights back (what torch.func.functional_call does, but outside the module's call, so a
    torch.compile'd module is traced once with the copies in place and never recompiled: its guards see
    the same dtypes and shapes on every call)."""

    def __init__(self, modules: list[torch.nn.Module], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.by_module: dict[int, list[tuple[torch.nn.Module, str, torch.nn.Parameter, torch.nn.Parameter]]] = {}
        self.masters: list[torch.nn.Parameter] = []
        self.copies: list[torch.nn.Parameter] = []
        for module in modules:
            slots = []
            inner = getattr(module, "_orig_mod", module)  # a compiled module's own layers
            for sub in inner.modules():
                if not isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
                    continue
                for pname, p in sub.named_parameters(recurse=False):
                    if p.requires_grad and p.dtype == torch.float32:
                        copy = torch.nn.Parameter(torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format))
                        slots.append((sub, pname, p, copy))
                        self.masters.append(p)
                        self.copies.append(copy)
            self.by_module[id(module)] = self.by_module[id(inner)] = slots
        self.refresh()

    def __len__(self) -> int:
        return len(self.copies)

    def call(self, module: torch.nn.Module, *args):
        slots = self.by_module.get(id(module))
        if not slots:
            return module(*args)
        for sub, name, _, copy in slots:
            sub._parameters[name] = copy
        try:
            return module(*args)
        finally:
            for sub, name, master, _ in slots:
                sub._parameters[name] = master

    @torch.no_grad()
    def refresh(self) -> None:
        """The copies from the float32 weights (after an optimizer step, a restore or a reset)."""
        if self.copies:
            torch._foreach_copy_(self.copies, self.masters)

    def gradients_to_masters(self) -> None:
        """The copies' gradients into the float32 weights' gradients (written, not added)."""
        if not self.copies:
            return
        for m in self.masters:
            if m.grad is None:
                m.grad = torch.empty_like(m, memory_format=torch.preserve_format)
        with torch.no_grad():
            torch._foreach_copy_([m.grad for m in self.masters], [c.grad for c in self.copies])
        for c in self.copies:
            c.grad = None


def clip_into_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Gradient clipping by the global norm, as torch.nn.utils.clip_grad_norm_ computes it, with the
    scaling left to the fused optimizer (its `grad_scale` divides each gradient as it is read), which
    saves a read and a write of every gradient."""
    optimizer.grad_scale = clip_divisor(torch._foreach_norm([p.grad for p in params if p.grad is not None], 2.0), max_norm)


def clip_divisor(norms: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """What each gradient is divided by to clip the global norm of tensors with these norms to `max_norm`
    (clip_grad_norm_'s coefficient, inverted: fused AdamW's `grad_scale`)."""
    total = torch.linalg.vector_norm(torch.stack(list(norms)), 2.0)
    return 1.0 / torch.clamp(max_norm / (total + 1e-6), max=1.0)


def fused_clipping(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer applies `grad_scale` itself (fused AdamW does)."""
    return bool(optimizer.defaults.get("fused"))


class GraphedStep:
    """One optimizer step (forward, loss, backward, clip, AdamW) that is run eagerly for the first
    EAGER_STEPS_BEFORE_CAPTURE calls, then captured once as a CUDA graph and replayed. Inputs are copied
    into static tensors first; the LR schedule steps on the host after each call (the optimizer reads
    its LR from a device tensor). With `copies` the step computes with compute-dtype weight copies, and
    (`one_pass`, where it applies) ends in `OnePassAdamW`'s single pass instead of four."""

    def __init__(
        self,
        models: list,
        objective: Objective,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        max_grad_norm: float,
        copies: ComputeCopies | None = None,
        one_pass: bool = True,
    ) -> None:
        from atelier.models.dreambooth.one_pass_adamw import OnePassAdamW  # imports Triton: only where a step is captured

        self.objective, self.params, self.optimizer, self.lr_scheduler, self.max_grad_norm = (
            objective,
            params,
            optimizer,
            lr_scheduler,
            max_grad_norm,
        )
        self.copies = copies
        self.update = OnePassAdamW.for_step(optimizer, copies) if one_pass else None
        self.static: list[torch.Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None
        self.stream = torch.cuda.Stream()
        self.calls = 0
        self.capture_seconds = 0.0
        self.memory: dict[str, float] = {}
        for m in models:
            m.train()
        torch.cuda.empty_cache()  # blocks cached on the default stream (the VAE's) cannot serve the side stream the steps run on

    def _body(self) -> torch.Tensor:
        loss = self.objective(*self.static)
        loss.backward()
        if self.update is not None:
            self.update(self.max_grad_norm)
            return loss.detach()
        if self.copies is not None:
            self.copies.gradients_to_masters()
        if fused_clipping(self.optimizer):
            clip_into_optimizer(self.optimizer, self.params, self.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        if self.copies is not None:
            self.copies.refresh()
        return loss.detach()

    def __call__(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.static is None:
            self.static = [latents.clone(), noise.clone(), timesteps.clone()]
        else:
            for buf, value in zip(self.static, (latents, noise, timesteps)):
                buf.copy_(value)
        if self.graph is None and self.calls >= EAGER_STEPS_BEFORE_CAPTURE:
            self._capture()
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            loss = self.loss.float().clone()
        else:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):  # eager steps on the capture stream: its handles exist when capturing
                loss = self._body()
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(self.stream)
            loss = loss.float()
        self.lr_scheduler.step()
        return loss

    def _capture(self) -> None:
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


def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
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
