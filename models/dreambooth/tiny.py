"""The embedded default base model: Stable Diffusion's architecture at toy size, random weights.

Built locally with a fixed seed (same bytes on every machine), with a real CLIP tokenizer, so the
whole platform runs on a laptop CPU with no download. It draws noise-like images; it exists to make
every code path real, not to make pictures.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from atelier.kernel.storage import atomic_dir
from atelier.models.dreambooth.tokenizer import write_clip_tokenizer

TINY_MODEL_ID = "atelier/tiny-sd-v1"


def build_tiny_pipeline(tokenizer_dir: Path, seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=64,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=32,
        )
    )
    # SD 1.x's scheduler configuration (PNDM, scaled-linear betas): training reads it as DDPM.
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny model as a diffusers directory (safetensors) unless it is already there."""
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").is_file():
        return out_dir
    with atomic_dir(out_dir) as tmp:
        tok_dir = write_clip_tokenizer(tmp / "_tokenizer_src")
        pipe = build_tiny_pipeline(tok_dir, seed)
        pipe.save_pretrained(tmp, safe_serialization=True)
        for f in tok_dir.iterdir():
            f.unlink()
        tok_dir.rmdir()
    return out_dir
