"""GroupNorm (and the SiLU after it) as one Triton kernel forward and two backward, for the captured bf16 step.

Under autocast an eager UNet runs each of SD 1.5's 61 GroupNorms as: the bf16 activation cast to float32,
converted from channels_last to NCHW (torch's CUDA GroupNorm takes contiguous input only), the statistics, the
normalisation, SiLU in float32, then the next convolution casts the result back to bf16 and converts it back to
channels_last; the backward mirrors each of those. A profile of the single job's step on an H100 counted about
700 copy kernels (6.6 ms of a 49 ms step) and 3.6 ms of norm kernels, most of them this.

`GroupNormAct` does the same arithmetic in one pass over the channels_last bf16 activation: statistics in
float32 (each chunk's mean and squared deviations, combined with Chan's formula), normalisation, affine, SiLU
where the module is followed by one, and the result rounded to bf16, which is what the next convolution would
have cast it to. The backward recomputes the normalised values from the saved bf16 input and the statistics
(GroupNorm's standard backward), in float32, and writes the input's gradient in bf16 as autocast's cast would.
Numbers agree with autocast's to float rounding (the statistics' summation order differs), not bit for bit;
like torch.compile, this is a speed choice and in no training key.

`fuse_group_norms(unet)` swaps the classes of the UNet's GroupNorms whose only consumer casts to bf16 (those
of `ResnetBlock2D`, `Transformer2DModel` and the UNet's output norm) and of the ResnetBlock2D blocks (whose
forward then leaves the SiLU to the norm); parameters and their names do not change, so checkpoints, saving
and the resident trainer's reset see the same module tree. On anything the kernels do not cover (CPU, float32
or NCHW input, no Triton) the swapped modules compute exactly what the originals did.

The sampler (`sampling.speed_up`, by default) runs the same forward kernel on its fp16 pipeline's UNet
and VAE decoder, channels_last (the statistics stay float32; the result is rounded to fp16 once, after the SiLU,
where torch rounds after the norm and again after the SiLU): 1.12x the class images on an H100.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # Triton comes with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None  # type: ignore[assignment]

TILE = 2048  # elements of one group a program holds at a time (rows x padded channels)
MAX_SPLIT = 16  # programs one group's rows are split over
MIN_PER_PROGRAM = 4096  # a group smaller than this many elements per split is not split further

if triton is not None:
    _INTS = ["S", "C", "D", "CHUNK", "SPLIT"]  # runtime sizes: no recompile per layer shape

    @triton.jit
    def _gn_program(S, C, D, CHUNK):
        """This program's group and rows: n*G + g, n, g, its first row, the row it stops before, and the offset
        of (sample n, row 0, group g's first channel) in a channels_last activation."""
        ng = tl.program_id(0)
        G = C // D
        n = ng // G
        g = ng % G
        s0 = tl.program_id(1) * CHUNK
        return ng, n, g, s0, tl.minimum(s0 + CHUNK, S), n * S * C + g * D

    @triton.jit
    def _gn_tile(offset, row, s_end, C, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows [row, row + ROWS) of the group at `offset`: their element offsets and the mask of those that exist."""
        rows = (row + tl.arange(0, ROWS))[:, None]
        cols = tl.arange(0, BLOCK_D)[None, :]
        return offset + rows * C + cols, (rows < s_end) & (cols < D)

    @triton.jit
    def _gn_affine(weight, bias, g, D, mean, rstd, BLOCK_D: tl.constexpr):
        """Group g's channels: their index, weight, and the normalisation and affine folded into one scale and
        one shift per channel."""
        c = tl.arange(0, BLOCK_D)
        w = tl.load(weight + g * D + c, mask=c < D, other=0.0).to(tl.float32)
        b = tl.load(bias + g * D + c, mask=c < D, other=0.0).to(tl.float32)
        return c, w, (rstd * w)[None, :], (b - mean * rstd * w)[None, :]

    @triton.jit(do_not_specialize=_INTS)
    def _gn_chunk_stats(x, part, S, C, D, CHUNK, SPLIT, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (n*G + g, split): the count, mean and sum of squared deviations of its rows of group g."""
        ng, n, g, s0, s_end, offset = _gn_program(S, C, D, CHUNK)
        acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for r0 in range(0, CHUNK, ROWS):
            at, m = _gn_tile(offset, s0 + r0, s_end, C, D, ROWS, BLOCK_D)
            acc += tl.load(x + at, mask=m, other=0.0).to(tl.float32)
        count = ((s_end - s0) * D).to(tl.float32)
        mean = tl.sum(acc) / count
        acc2 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for r0 in range(0, CHUNK, ROWS):
            at, m = _gn_tile(offset, s0 + r0, s_end, C, D, ROWS, BLOCK_D)
            v = tl.load(x + at, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, v - mean, 0.0)
            acc2 += d * d
        out = part + (ng * SPLIT + tl.program_id(1)) * 3
        tl.store(out, count)
        tl.store(out + 1, mean)
        tl.store(out + 2, tl.sum(acc2))

    @triton.jit
    def _gn_group_stats(part, ng, SPLIT, eps, SPLIT_PAD: tl.constexpr):
        """Chan's combination of a group's chunk statistics: its mean and 1/sqrt(var + eps)."""
        i = tl.arange(0, SPLIT_PAD)
        m = i < SPLIT
        p = part + (ng * SPLIT + i) * 3
        count = tl.load(p, mask=m, other=0.0)
        means = tl.load(p + 1, mask=m, other=0.0)
        m2 = tl.load(p + 2, mask=m, other=0.0)
        total = tl.sum(count)
        mean = tl.sum(count * means) / total
        d = tl.where(m, means - mean, 0.0)
        var = (tl.sum(m2) + tl.sum(count * d * d)) / total
        return mean, 1.0 / tl.sqrt(var + eps)

    @triton.jit(do_not_specialize=_INTS)
    def _gn_apply(
        x, y, weight, bias, part, mean_out, rstd_out, S, C, D, CHUNK, SPLIT, eps,
        ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_PAD: tl.constexpr,
    ):  # fmt: skip
        """Program (n*G + g, split): its rows normalised, scaled, shifted (and SiLU), stored in y's dtype."""
        ng, n, g, s0, s_end, offset = _gn_program(S, C, D, CHUNK)
        mean, rstd = _gn_group_stats(part, ng, SPLIT, eps, SPLIT_PAD)
        if tl.program_id(1) == 0:
            tl.store(mean_out + ng, mean)
            tl.store(rstd_out + ng, rstd)
        c, w, scale, shift = _gn_affine(weight, bias, g, D, mean, rstd, BLOCK_D)
        for r0 in range(0, CHUNK, ROWS):
            at, m = _gn_tile(offset, s0 + r0, s_end, C, D, ROWS, BLOCK_D)
            z = tl.load(x + at, mask=m, other=0.0).to(tl.float32) * scale + shift
            if ACT:
                z = z / (1.0 + tl.exp(-z))
            tl.store(y + at, z.to(y.dtype.element_ty), mask=m)

    @triton.jit
    def _gn_grad_out(x, dy, at, m, mean, rstd, scale, shift, ACT: tl.constexpr):
        """At the tile `at` (mask m): the normalised input and the gradient at the norm's affine output (through
        SiLU if ACT)."""
        v = tl.load(x + at, mask=m, other=0.0).to(tl.float32)
        dz = tl.load(dy + at, mask=m, other=0.0).to(tl.float32)
        if ACT:
            z = v * scale + shift
            sig = 1.0 / (1.0 + tl.exp(-z))
            dz = dz * sig * (1.0 + z * (1.0 - sig))
        return (v - mean) * rstd, dz

    @triton.jit(do_not_specialize=_INTS)
    def _gn_backward_sums(
        x, dy, weight, bias, mean_in, rstd_in, part, S, C, D, CHUNK, SPLIT,
        ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Program (n*G + g, split): per channel of its rows, the sum of dz and of dz * xhat."""
        ng, n, g, s0, s_end, offset = _gn_program(S, C, D, CHUNK)
        mean = tl.load(mean_in + ng)
        rstd = tl.load(rstd_in + ng)
        c, w, scale, shift = _gn_affine(weight, bias, g, D, mean, rstd, BLOCK_D)
        sum_dz = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        sum_dzx = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for r0 in range(0, CHUNK, ROWS):
            at, m = _gn_tile(offset, s0 + r0, s_end, C, D, ROWS, BLOCK_D)
            xhat, dz = _gn_grad_out(x, dy, at, m, mean, rstd, scale, shift, ACT)
            sum_dz += tl.where(m, dz, 0.0)
            sum_dzx += tl.where(m, dz * xhat, 0.0)
        out = part + ((ng * SPLIT + tl.program_id(1)) * 2) * BLOCK_D + c
        tl.store(out, tl.sum(sum_dz, axis=0))
        tl.store(out + BLOCK_D, tl.sum(sum_dzx, axis=0))

    @triton.jit(do_not_specialize=_INTS)
    def _gn_backward_input(
        x, dy, dx, weight, bias, mean_in, rstd_in, part, channel_sums, S, C, D, CHUNK, SPLIT,
        ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_PAD: tl.constexpr,
    ):  # fmt: skip
        """Program (n*G + g, split): the input's gradient for its rows,
        dx = rstd * (w*dz - mean_group(w*dz) - xhat * mean_group(w*dz*xhat)); the split-0 program also writes
        sample n's per-channel sums (for the weight's and bias's gradients)."""
        ng, n, g, s0, s_end, offset = _gn_program(S, C, D, CHUNK)
        mean = tl.load(mean_in + ng)
        rstd = tl.load(rstd_in + ng)
        c, w, scale, shift = _gn_affine(weight, bias, g, D, mean, rstd, BLOCK_D)
        i = tl.arange(0, SPLIT_PAD)[:, None]
        at_part = part + ((ng * SPLIT + i) * 2) * BLOCK_D + c[None, :]
        db = tl.sum(tl.load(at_part, mask=i < SPLIT, other=0.0), axis=0)
        ds = tl.sum(tl.load(at_part + BLOCK_D, mask=i < SPLIT, other=0.0), axis=0)
        if tl.program_id(1) == 0:
            tl.store(channel_sums + (n * 2) * C + g * D + c, db, mask=c < D)
            tl.store(channel_sums + (n * 2 + 1) * C + g * D + c, ds, mask=c < D)
        inv_m = 1.0 / (S * D).to(tl.float32)
        c1 = tl.sum(w * db) * inv_m
        c2 = tl.sum(w * ds) * inv_m
        for r0 in range(0, CHUNK, ROWS):
            at, m = _gn_tile(offset, s0 + r0, s_end, C, D, ROWS, BLOCK_D)
            xhat, dz = _gn_grad_out(x, dy, at, m, mean, rstd, scale, shift, ACT)
            grad = rstd * (w[None, :] * dz - c1 - xhat * c2)
            tl.store(dx + at, grad.to(dx.dtype.element_ty), mask=m)


def _plan(n: int, c: int, s: int, groups: int) -> dict:
    """Tile and split sizes for one layer: a group's rows (pixels) split over up to MAX_SPLIT programs."""
    d = c // groups
    block_d = triton.next_power_of_2(d)
    rows = max(1, TILE // block_d)
    split = max(1, min(MAX_SPLIT, (s * d) // MIN_PER_PROGRAM, triton.cdiv(s, rows)))
    chunk = triton.cdiv(triton.cdiv(s, split), rows) * rows
    split = triton.cdiv(s, chunk)
    return {"D": d, "BLOCK_D": block_d, "ROWS": rows, "SPLIT": split, "CHUNK": chunk}


def switched_on() -> bool:
    """Whether this process may use the kernels: `ATELIER_FUSED_NORMS=0` keeps torch's own norms everywhere (the
    trainer's step and the sampler); a speed switch only."""
    return os.environ.get("ATELIER_FUSED_NORMS", "1") != "0"


def _covered(x: torch.Tensor, norm: torch.nn.GroupNorm) -> bool:
    """Whether the kernels apply: a bf16 or fp16 channels_last activation on CUDA, with affine parameters."""
    return (
        triton is not None
        and x.is_cuda
        and x.dim() == 4
        and x.dtype in (torch.bfloat16, torch.float16)
        and norm.weight is not None
        and norm.bias is not None
        and x.shape[1] % norm.num_groups == 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.numel() < 2**31
    )


class _GroupNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, act: bool):
        n, c, h, w = x.shape
        p = _plan(n, c, h * w, groups)
        y = torch.empty_like(x, memory_format=torch.channels_last)
        part = torch.empty(n * groups * p["SPLIT"] * 3, device=x.device, dtype=torch.float32)
        mean = torch.empty(n * groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        grid = (n * groups, p["SPLIT"])
        ints = (h * w, c, p["D"], p["CHUNK"], p["SPLIT"])
        _gn_chunk_stats[grid](x, part, *ints, ROWS=p["ROWS"], BLOCK_D=p["BLOCK_D"])
        _gn_apply[grid](
            x, y, weight, bias, part, mean, rstd, *ints, eps, ACT=act, ROWS=p["ROWS"], BLOCK_D=p["BLOCK_D"], SPLIT_PAD=MAX_SPLIT
        )
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.plan, ctx.groups, ctx.act = p, groups, act
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        p, groups, act = ctx.plan, ctx.groups, ctx.act
        n, c, h, w = x.shape
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        part = torch.empty(n * groups * p["SPLIT"] * 2 * p["BLOCK_D"], device=x.device, dtype=torch.float32)
        channel_sums = torch.empty(n, 2, c, device=x.device, dtype=torch.float32)
        grid = (n * groups, p["SPLIT"])
        ints = (h * w, c, p["D"], p["CHUNK"], p["SPLIT"])
        _gn_backward_sums[grid](x, dy, weight, bias, mean, rstd, part, *ints, ACT=act, ROWS=p["ROWS"], BLOCK_D=p["BLOCK_D"])
        _gn_backward_input[grid](
            x, dy, dx, weight, bias, mean, rstd, part, channel_sums, *ints,
            ACT=act, ROWS=p["ROWS"], BLOCK_D=p["BLOCK_D"], SPLIT_PAD=MAX_SPLIT,
        )  # fmt: skip
        sums = channel_sums.sum(0)  # over the batch: [d bias, d weight]
        d_weight = sums[1].to(weight.dtype) if ctx.needs_input_grad[1] else None
        d_bias = sums[0].to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx, d_weight, d_bias, None, None, None


def group_norm_act(x: torch.Tensor, norm: torch.nn.GroupNorm, act: bool) -> torch.Tensor:
    """`norm(x)`, then SiLU if `act`: in the fused kernels where they apply (the result in x's dtype, bf16 or
    fp16, as the next layer's autocast cast would make it), otherwise exactly the modules' own computation."""
    if _covered(x, norm):
        return _GroupNormAct.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, act)
    y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(y) if act else y


class FusedGroupNorm(torch.nn.GroupNorm):
    """A GroupNorm whose result feeds a layer that casts it to bf16 (or that computes in fp16); `act` (an instance attribute) adds the
    SiLU that followed it."""

    act = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_act(x, self, self.act)


class ActivationInNorm(torch.nn.SiLU):
    """A SiLU whose work the GroupNorm before it does: passes its input through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _resnet_block_class():
    from diffusers.models.resnet import ResnetBlock2D

    class FusedResnetBlock2D(ResnetBlock2D):
        """diffusers' ResnetBlock2D forward for the blocks `fuse_group_norms` accepts (no up- or down-sampling,
        the time embedding, if any, added before norm2, SiLU), with each norm doing its SiLU. The shortcut's input is not
        made contiguous (diffusers does that in training mode for DDP's stride check; a captured step is one
        process, and on a channels_last UNet the copy converts the activation to NCHW and back)."""

        def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
            h = self.conv1(self.norm1(input_tensor))
            if self.time_emb_proj is not None:
                if not self.skip_time_act:
                    temb = self.nonlinearity(temb)
                temb = self.time_emb_proj(temb)[:, :, None, None]
            if temb is not None and self.time_embedding_norm == "default":  # "group" (a VAE decoder's) adds none
                h = h + temb
            h = self.conv2(self.dropout(self.norm2(h)))
            shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
            out = shortcut + h
            return out if self.output_scale_factor == 1 else out / self.output_scale_factor  # x / 1 is x: one pass less

    return ResnetBlock2D, FusedResnetBlock2D


def _transformer_class():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    class ChannelsLastTransformer2DModel(Transformer2DModel):
        """diffusers' Transformer2DModel without the NCHW copy of its output on a channels_last model: diffusers
        makes the attention's (batch, pixels, channels) result NCHW-contiguous before `proj_out` (a copy of the
        whole activation, which the convolution then converts back to its channels_last weight's layout). That
        tensor viewed as NCHW already is a channels_last activation, so here `proj_out` takes the view. An NCHW
        input takes diffusers' path, unchanged."""

        def _get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width, inner_dim):
            if residual.is_contiguous() or not residual.is_contiguous(memory_format=torch.channels_last):
                return super()._get_output_for_continuous_inputs(hidden_states, residual, batch_size, height, width, inner_dim)
            if not self.use_linear_projection:
                hidden_states = self.proj_out(hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2))
            else:
                hidden_states = self.proj_out(hidden_states).reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
            return hidden_states + residual

    return Transformer2DModel, ChannelsLastTransformer2DModel


def _fusable_resnet(block) -> bool:
    # "default" adds the time embedding before norm2; other modes without one (a VAE decoder's "group") only norm
    mode = block.time_embedding_norm
    return (
        (mode == "default" or (mode != "scale_shift" and block.time_emb_proj is None))
        and block.upsample is None
        and block.downsample is None
        and type(block.nonlinearity) is torch.nn.SiLU
        and type(block.norm1) is torch.nn.GroupNorm
        and type(block.norm2) is torch.nn.GroupNorm
    )


def _fuse(norm: torch.nn.GroupNorm, act: bool) -> None:
    norm.__class__ = FusedGroupNorm
    norm.act = act


def fuse_group_norms(unet: torch.nn.Module) -> int:
    """Swap, in place, the GroupNorms of a diffusers UNet whose result is cast to bf16 by the next layer (and the
    SiLU after them) for `FusedGroupNorm`; returns how many. Run it on a UNet that is not compiled (inductor fuses
    these itself) and trains or samples under bf16 autocast, or whose weights are fp16 (the sampler's). A VAE's
    `decoder` takes it too (its ResnetBlock2D blocks and output norm; its attention's norm stays torch's)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    resnet, fused_resnet = _resnet_block_class()
    swapped = 0
    for module in unet.modules():
        if type(module) is resnet and _fusable_resnet(module):
            _fuse(module.norm1, True)
            _fuse(module.norm2, True)
            module.__class__ = fused_resnet
            swapped += 2
        elif isinstance(module, Transformer2DModel) and module.is_input_continuous and type(module.norm) is torch.nn.GroupNorm:
            _fuse(module.norm, False)  # then proj_in, a convolution or a linear layer
            swapped += 1
    norm_out, act_out = getattr(unet, "conv_norm_out", None), getattr(unet, "conv_act", None)
    if type(norm_out) is torch.nn.GroupNorm and type(act_out) is torch.nn.SiLU:
        _fuse(norm_out, True)
        act_out.__class__ = ActivationInNorm
        swapped += 1
    return swapped


def keep_transformers_channels_last(model: torch.nn.Module) -> int:
    """Swap, in place, the class of every continuous-input Transformer2DModel for `ChannelsLastTransformer2DModel`
    (no NCHW copy of its output on a channels_last model); returns how many."""
    transformer, channels_last = _transformer_class()
    swapped = 0
    for module in model.modules():
        if type(module) is transformer and module.is_input_continuous:
            module.__class__ = channels_last
            swapped += 1
    return swapped


def fuse_kernels(model: torch.nn.Module) -> int:
    """Every fused kernel a UNet or VAE decoder takes, in place: its GroupNorms (`fuse_group_norms`), its
    feed-forward gates (`fused_geglu.fuse_geglu`) and its transformers' output left channels_last
    (`keep_transformers_channels_last`); returns how many GroupNorms and gates were swapped."""
    from atelier.models.dreambooth.fused_geglu import fuse_geglu

    keep_transformers_channels_last(model)
    return fuse_group_norms(model) + fuse_geglu(model)
