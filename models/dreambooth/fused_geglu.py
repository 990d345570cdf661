"""GEGLU, the gate of SD's feed-forward layers, as one Triton kernel forward and one backward.

diffusers' `GEGLU` projects to twice the width, splits the result into halves `x` and `g` and returns
`x * gelu(g)`: the GELU reads a strided half (no vectorised loads), writes a tensor, and the multiply reads both
and writes another; the backward adds a GELU backward, a multiply's and the concatenation of the halves'
gradients. On an H100 the fp16 class-image sampler spent 182 ms of a 2.2 s batch in those two kernels (320 of
each). Here one pass reads the projection once and writes the result, and one backward pass reads the projection
and the result's gradient and writes the projection's gradient; GELU is the exact (erf) one, as diffusers'. The
arithmetic is float32 and the result is rounded once (torch rounds the GELU and then the product), so numbers
agree to fp16 or bf16 rounding, not bit for bit.

`fuse_geglu(model)` swaps the class of every `GEGLU` for `FusedGEGLU`, whose forward takes the kernels where they
apply (CUDA, fp16 or bf16, a contiguous projection) and otherwise computes exactly what diffusers' does;
parameters and their names do not change. `fused_norm.fuse_kernels` applies it with the GroupNorms; no default
path does yet: it is checked on the CPU (Triton's interpreter: the float32 result rounded once, within half an
fp16 step) and waits for a GPU measurement (`benchmarks/sampler_speed.py --only fused-kernels`,
`benchmarks/step_speed.py --only one-pass+fused-kernels`) before the sampler or the trainer take it.
"""

from __future__ import annotations

import torch

try:  # Triton comes with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None  # type: ignore[assignment]

BLOCK = 1024  # output elements a program computes

if triton is not None:

    @triton.jit
    def _geglu_at(N, F, BLOCK: tl.constexpr):
        """This program's output elements (flat over rows x F), their mask, and where each one's x sits in the
        projection (row * 2F + column; its g is F further)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return i, i < N, i + (i // F) * F

    @triton.jit(do_not_specialize=["N", "F"])
    def _geglu_forward(h, y, N, F, BLOCK: tl.constexpr):
        i, m, at = _geglu_at(N, F, BLOCK)
        x = tl.load(h + at, mask=m, other=0.0).to(tl.float32)
        g = tl.load(h + at + F, mask=m, other=0.0).to(tl.float32)
        gelu = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        tl.store(y + i, (x * gelu).to(y.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["N", "F"])
    def _geglu_backward(h, dy, dh, N, F, BLOCK: tl.constexpr):
        i, m, at = _geglu_at(N, F, BLOCK)
        x = tl.load(h + at, mask=m, other=0.0).to(tl.float32)
        g = tl.load(h + at + F, mask=m, other=0.0).to(tl.float32)
        d = tl.load(dy + i, mask=m, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * g * g)
        tl.store(dh + at, (d * g * cdf).to(dh.dtype.element_ty), mask=m)
        tl.store(dh + at + F, (d * x * (cdf + g * pdf)).to(dh.dtype.element_ty), mask=m)


def _covered(h: torch.Tensor) -> bool:
    """Whether the kernels apply to a projection: fp16 or bf16 on CUDA, contiguous, an even last dimension."""
    return (
        triton is not None
        and h.is_cuda
        and h.dtype in (torch.bfloat16, torch.float16)
        and h.is_contiguous()
        and h.shape[-1] % 2 == 0
        and h.numel() < 2**31
    )


def _launch(kernel, h: torch.Tensor, *tensors: torch.Tensor) -> None:
    n = h.numel() // 2
    kernel[(triton.cdiv(n, BLOCK),)](h, *tensors, n, h.shape[-1] // 2, BLOCK=BLOCK)


class _Geglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        y = h.new_empty(*h.shape[:-1], h.shape[-1] // 2)
        _launch(_geglu_forward, h, y)
        ctx.save_for_backward(h)
        return y

    @staticmethod
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        dh = torch.empty_like(h)
        _launch(_geglu_backward, h, dy.contiguous(), dh)
        return dh


def _fused_class():
    from diffusers.models.activations import GEGLU

    class FusedGEGLU(GEGLU):
        """diffusers' GEGLU with the gate in the kernels where they apply, otherwise its own computation (the
        deprecated `scale` argument ignored, as diffusers does; its NPU branch is not CUDA's)."""

        def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            h = self.proj(hidden_states)
            if _covered(h):
                return _Geglu.apply(h)
            x, gate = h.chunk(2, dim=-1)
            return x * self.gelu(gate)

    return GEGLU, FusedGEGLU


def fuse_geglu(model: torch.nn.Module) -> int:
    """Swap, in place, every diffusers `GEGLU` of `model` for `FusedGEGLU`; returns how many."""
    plain, fused = _fused_class()
    swapped = 0
    for module in model.modules():
        if type(module) is plain:
            module.__class__ = fused
            swapped += 1
    return swapped
