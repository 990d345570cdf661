"""The captured bf16 step's clipping, AdamW update and weight-copy refresh in one pass over memory (CUDA, Triton).

With `steps.ComputeCopies`, a captured step ends in four passes over the trained weights:
1. the bf16 gradients copied into float32 gradients (reads 2 bytes a parameter, writes 4);
2. their global norm for clipping (reads 4);
3. fused AdamW (reads weight, gradient and both moments, writes them back: 32);
4. the bf16 copies refreshed from the new weights (reads 4, writes 2).

That is about 48 bytes a parameter, 47 GB a step for SD 1.5's UNet and text encoder. `OnePassAdamW` reads the
bf16 gradients where autograd left them: their norm (2 bytes), then one kernel that reads gradient, weight and
moments (14) and writes weight, moments and the new bf16 copy (14). About 30 bytes; and the float32 gradients of
the copied weights are never allocated (4 GB at SD 1.5).

The update is torch's fused AdamW (`torch.optim.AdamW(fused=True, capturable=True)`), in its order of operations,
in float32 with IEEE division and square root: decoupled weight decay, the moments, the bias corrections from the
device step counter, the learning rate from its device tensor, and clipping as fused AdamW's `grad_scale` (tested on
the GPU against torch's kernel: same weights and moments up to float rounding). The optimizer's own state tensors
are updated in place, so checkpoints, resuming and the resident trainer's reset see nothing different. The
parameters that keep float32 (norms and embeddings, as autocast keeps them) go through torch's fused kernel itself.
`OnePassAdamW.for_step` picks it where it applies (bf16 copies on CUDA, Triton importable, a fused capturable
AdamW with one parameter group, neither amsgrad nor maximize); everything else keeps the four passes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from atelier.models.dreambooth.steps import clip_divisor

if TYPE_CHECKING:
    from atelier.models.dreambooth.steps import ComputeCopies

try:  # Triton comes with CUDA builds of torch; without it the four passes stay
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None  # type: ignore[assignment]

# elements of one tensor per program, and warps: measured on an H100 against 512-4096 and 2-16 warps (and against
# telling Triton the addresses are 16-byte aligned, which was slower)
BLOCK = 1024
NUM_WARPS = 4
_FIELDS = 6  # a table row: weight, gradient, exp_avg, exp_avg_sq, copy (addresses), element count


if triton is not None:

    @triton.jit
    def _one_pass_adamw(table, blocks, scalars, BLOCK: tl.constexpr):
        """One block of one tensor. `scalars` (float32): lr, lr / bias correction 1, sqrt(bias correction 2),
        grad_scale, beta1, beta2, eps, weight decay. The arithmetic is torch's fused kernel's, in its order,
        in float32 with IEEE division and square root."""
        pid = tl.program_id(0)
        tensor = tl.load(blocks + 2 * pid)
        start = tl.load(blocks + 2 * pid + 1)
        row = table + 6 * tensor
        weight_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
        grad_ptr = tl.load(row + 1).to(tl.pointer_type(tl.bfloat16))
        exp_avg_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        exp_avg_sq_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        copy_ptr = tl.load(row + 4).to(tl.pointer_type(tl.bfloat16))
        n = tl.load(row + 5)
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n

        lr = tl.load(scalars)
        step_size = tl.load(scalars + 1)
        bias2_sqrt = tl.load(scalars + 2)
        scale = tl.load(scalars + 3)
        beta1 = tl.load(scalars + 4)
        beta2 = tl.load(scalars + 5)
        eps = tl.load(scalars + 6)
        weight_decay = tl.load(scalars + 7)

        g = tl.div_rn(tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32), scale)
        p = tl.load(weight_ptr + offs, mask=mask, other=0.0)
        m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
        p = p - lr * weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
        p = p - tl.div_rn(step_size * m, denom)
        tl.store(weight_ptr + offs, p, mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
        bits = p.to(tl.uint32, bitcast=True)  # to bf16 rounding to nearest even, as torch's cast does
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(copy_ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)


def _dense(t: torch.Tensor) -> bool:
    """Whether the tensor's elements fill its memory without gaps, in either layout the trainer uses."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


class OnePassAdamW:
    """`update(max_norm)` after the backward of a step that computed with `copies`: clips by the global norm
    of every gradient, steps AdamW and refreshes the copies, leaving the copies' gradients freed. It stands
    for `copies.gradients_to_masters()`, the clipping, `optimizer.step()` and `copies.refresh()`."""

    @classmethod
    def for_step(cls, optimizer: torch.optim.Optimizer, copies: ComputeCopies | None) -> OnePassAdamW | None:
        """One for this optimizer and these copies, or None where the four passes must stay."""
        if triton is None or copies is None or not len(copies) or copies.dtype != torch.bfloat16:
            return None
        if type(optimizer) is not torch.optim.AdamW or len(optimizer.param_groups) != 1:
            return None
        group = optimizer.param_groups[0]
        if not (group.get("fused") and group.get("capturable")) or group["amsgrad"] or group["maximize"]:
            return None
        if not torch.is_tensor(group["lr"]) or not all(p.is_cuda for p in copies.masters):
            return None
        return cls(optimizer, copies)

    def __init__(self, optimizer: torch.optim.Optimizer, copies: ComputeCopies) -> None:
        self.optimizer, self.copies = optimizer, copies
        group = optimizer.param_groups[0]
        params = group["params"]
        trained = {id(p) for p in params}
        if any(id(m) not in trained for m in copies.masters):
            raise ValueError("the bf16 copies include weights this optimizer does not train")
        copied = {id(m) for m in copies.masters}
        self.others = [p for p in params if id(p) not in copied]
        device = copies.masters[0].device
        starts = [torch.arange(0, m.numel(), BLOCK, dtype=torch.int64) for m in copies.masters]
        index = torch.cat([torch.full_like(s, i) for i, s in enumerate(starts)])
        self.blocks = torch.stack([index, torch.cat(starts)], dim=1).contiguous().to(device)
        self.n_blocks = int(index.numel())
        # the table of addresses is written from pinned memory: during a capture the copy is recorded from
        # this buffer, so a replay reads the addresses the capture saw (the gradients' in the graph's pool)
        self.host_table = torch.empty((len(copies.masters), _FIELDS), dtype=torch.int64, pin_memory=True)
        self.table = torch.empty_like(self.host_table, device=device)
        # read when the optimizer is made (a captured update keeps them too), in float32 as torch's kernel has them
        self.constants = torch.tensor([*group["betas"], group["eps"], group["weight_decay"]], dtype=torch.float32, device=device)

    def _write_table(self, grads: list[torch.Tensor]) -> None:
        state = self.optimizer.state
        rows = []
        for master, copy, grad in zip(self.copies.masters, self.copies.copies, grads):
            s = state[master]
            parts = (master, grad, s["exp_avg"], s["exp_avg_sq"], copy)
            if any(t.stride() != master.stride() for t in parts) or not _dense(master):
                raise RuntimeError(
                    f"one-pass AdamW needs a weight, its gradient, moments and copy laid out alike; a {tuple(master.shape)} "
                    "weight's are not (set cuda_graphs: false to train without the captured step)"
                )
            rows.append([t.data_ptr() for t in parts] + [master.numel()])
        self.host_table.copy_(torch.tensor(rows, dtype=torch.int64))
        capturing = torch.cuda.is_current_stream_capturing()
        self.table.copy_(self.host_table, non_blocking=capturing)  # eager: wait, so the next call may rewrite the buffer

    def __call__(self, max_norm: float) -> None:
        group = self.optimizer.param_groups[0]
        state = self.optimizer.state
        grads = [c.grad for c in self.copies.copies]
        if any(g is None for g in grads):
            raise RuntimeError("a weight the step computes with got no gradient (is it used in the forward?)")
        others = [p for p in self.others if p.grad is not None]
        norms = list(torch._foreach_norm(grads, 2.0, dtype=torch.float32))
        if others:
            norms += list(torch._foreach_norm([p.grad for p in others], 2.0))
        scale = clip_divisor(norms, max_norm)
        copied_steps = [state[m]["step"] for m in self.copies.masters]
        other_steps = [state[p]["step"] for p in others]
        torch._foreach_add_(copied_steps + other_steps, 1)
        self._write_table(grads)
        # the per-step scalars, on the device (a replay recomputes them from the step counter and LR tensors)
        step, lr, (beta1, beta2) = copied_steps[0], group["lr"].float(), self.constants[:2]
        scalars = torch.cat([torch.stack([lr, lr / (1 - beta1**step), torch.sqrt(1 - beta2**step), scale.float()]), self.constants])
        _one_pass_adamw[(self.n_blocks,)](self.table, self.blocks, scalars, BLOCK=BLOCK, num_warps=NUM_WARPS)
        if others:
            torch._fused_adamw_(
                others,
                [p.grad for p in others],
                [state[p]["exp_avg"] for p in others],
                [state[p]["exp_avg_sq"] for p in others],
                [],
                other_steps,
                lr=group["lr"],
                beta1=float(group["betas"][0]),
                beta2=float(group["betas"][1]),
                weight_decay=float(group["weight_decay"]),
                eps=float(group["eps"]),
                amsgrad=False,
                maximize=False,
                grad_scale=scale,
                found_inf=None,
            )
        for c in self.copies.copies:
            c.grad = None
