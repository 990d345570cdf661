"""`fused_norm.fuse_kernels` (`fuse_group_norms`, `fused_geglu.fuse_geglu`): which modules they swap, and that
the swapped UNet computes what diffusers' does.

The Triton kernels themselves need CUDA (tests/test_gpu.py checks them against torch's GroupNorm, SiLU and GELU);
here, on the CPU, the swapped modules take their fallback, so an NCHW UNet's output and every gradient must equal
the original's bit for bit: that checks the rewritten ResnetBlock2D forward, the moved SiLUs and the GEGLU forward.
A channels_last UNet's transformers keep their output channels_last (a layout change, so equal up to rounding).
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from atelier.models.dreambooth.fused_norm import ActivationInNorm, FusedGroupNorm, fuse_group_norms, fuse_kernels


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )


def _loss_and_grads(unet, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([10, 500])
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = unet(x, t, encoder_hidden_states=cond).sample
    loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}


def test_fuse_swaps_every_groupnorm_whose_result_is_cast_and_keeps_the_parameters():
    unet = _unet()
    names = [n for n, _ in unet.named_parameters()]
    norms = sum(type(m) is torch.nn.GroupNorm for m in unet.modules())
    swapped = fuse_group_norms(unet)
    # 12 ResnetBlock2D (2 norms each) + 6 Transformer2DModel norms + the output norm: every GroupNorm of SD's UNet
    assert swapped == norms == 31
    assert not any(type(m) is torch.nn.GroupNorm for m in unet.modules())
    assert [n for n, _ in unet.named_parameters()] == names
    activated = [m for m in unet.modules() if isinstance(m, FusedGroupNorm) and m.act]
    assert len(activated) == 25  # the resnets' norms and the output norm: their SiLU moved into the norm
    assert isinstance(unet.conv_act, ActivationInNorm)
    assert all(not m.act for m in unet.modules() if isinstance(m, FusedGroupNorm) and m not in activated)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_unet_computes_what_diffusers_computes(dtype):
    unet = _unet().train()
    fused = copy.deepcopy(unet)
    assert fuse_kernels(fused) == 31 + 6  # and one GEGLU per transformer block
    assert sum(type(m).__name__ == "FusedGEGLU" for m in fused.modules()) == 6
    loss, grads = _loss_and_grads(unet, dtype)
    fused_loss, fused_grads = _loss_and_grads(fused, dtype)
    assert torch.equal(loss, fused_loss)
    assert grads.keys() == fused_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, fused_grads[name]), name


def test_a_channels_last_unet_keeps_its_transformers_output_channels_last():
    """diffusers makes each Transformer2DModel's attention output NCHW-contiguous before proj_out (a copy of the
    activation, which the convolution converts back); the swapped one hands proj_out the channels_last view, with
    the same result up to the convolution's rounding, forward and backward."""
    unet = _unet().train().to(memory_format=torch.channels_last)
    fused = copy.deepcopy(unet)
    fuse_kernels(fused)
    seen = []
    for model in (unet, fused):
        model.down_blocks[1].attentions[0].proj_out.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    loss, grads = _loss_and_grads(unet, torch.float32)
    fused_loss, fused_grads = _loss_and_grads(fused, torch.float32)
    plain_in, fused_in = seen
    assert plain_in.is_contiguous() and not plain_in.is_contiguous(memory_format=torch.channels_last)  # diffusers' copy
    assert fused_in.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused_in, plain_in)
    assert fused_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_blocks_it_does_not_know_stay_as_they_are():
    unet = _unet()
    block = unet.down_blocks[0].resnets[0]
    block.time_embedding_norm = "scale_shift"  # a configuration the rewritten forward does not cover
    before = type(block)
    fuse_group_norms(unet)
    assert type(block) is before
    assert type(block.norm1) is torch.nn.GroupNorm and type(block.norm2) is torch.nn.GroupNorm


def test_the_trainer_fuses_only_an_uncompiled_captured_bf16_channels_last_cuda_step(monkeypatch):
    from atelier.models.dreambooth.config import TrainConfig
    from atelier.models.dreambooth.train_setup import fuses_norms

    cfg, cuda = TrainConfig(), torch.device("cuda")
    assert fuses_norms(cfg, cuda, True, torch.bfloat16)
    assert not fuses_norms(cfg, cuda, False, torch.bfloat16)  # accelerate's eager loop (DDP, accumulation)
    assert not fuses_norms(cfg, torch.device("cpu"), True, torch.bfloat16)
    assert not fuses_norms(cfg, cuda, True, torch.float16)
    assert not fuses_norms(cfg.model_copy(update={"channels_last": False}), cuda, True, torch.bfloat16)
    monkeypatch.setenv("ATELIER_FUSED_NORMS", "0")
    assert not fuses_norms(cfg, cuda, True, torch.bfloat16)


def test_a_vae_decoder_takes_the_swap_and_decodes_what_diffusers_decodes():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    ).eval()
    fused = copy.deepcopy(vae)
    # 2 up blocks x 2 resnets ("group" mode, no time embedding) + the mid block's 2 resnets ("default"), 2 norms
    # each, and the output norm; the mid block's attention norm stays torch's (a reshape to a sequence follows it)
    assert fuse_group_norms(fused.decoder) == 13
    assert type(fused.decoder.mid_block.attentions[0].group_norm) is torch.nn.GroupNorm
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, fused.decode(z).sample)


def test_the_sampler_fuses_only_an_eager_half_precision_cuda_pipeline_that_asks(monkeypatch):
    from types import SimpleNamespace

    from atelier.models.dreambooth.sampling import fuses_norms

    def pipe(device: str, dtype: torch.dtype):
        return SimpleNamespace(device=torch.device(device), unet=SimpleNamespace(dtype=dtype))

    assert fuses_norms(pipe("cuda", torch.float16), "none", True)
    assert fuses_norms(pipe("cuda", torch.bfloat16), "none", True)
    assert not fuses_norms(pipe("cuda", torch.float16), "none", False)  # load_pipeline(..., fused_norms=False)
    assert not fuses_norms(pipe("cuda", torch.float32), "none", True)
    assert not fuses_norms(pipe("cpu", torch.float16), "none", True)
    assert not fuses_norms(pipe("cuda", torch.float16), "reduce-overhead", True)  # inductor fuses its own
    monkeypatch.setenv("ATELIER_FUSED_NORMS", "0")
    assert not fuses_norms(pipe("cuda", torch.float16), "none", True)
