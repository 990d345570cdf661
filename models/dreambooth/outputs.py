"""What training writes besides checkpoints: validation samples during the run and the fine-tuned
pipeline at its end (a LoRA run's adapters too, fused into a plain pipeline)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline

from atelier.kernel.storage import atomic_dir
from atelier.models.dreambooth.config import TrainConfig
from atelier.models.dreambooth.sampling import GenerationRequest, generate, use_sampler


def pipeline_of(acc: Accelerator, base: Path, unet, text_encoder, vae=None, tokenizer=None) -> StableDiffusionPipeline:
    extra = {"vae": vae, "tokenizer": tokenizer} if vae is not None else {}
    return StableDiffusionPipeline.from_pretrained(
        str(base),
        unet=acc.unwrap_model(unet, keep_torch_compile=False),
        text_encoder=acc.unwrap_model(text_encoder, keep_torch_compile=False),
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
        **extra,
    )


def validation_samples(
    cfg: TrainConfig, work_dir: Path, class_noun: str, acc: Accelerator, unet, text_encoder, vae, tokenizer, base: Path, step: int, autocast
) -> Path:
    """Samples of the validation prompts at `step`, under `autocast()` (trained weights in fp32, frozen
    ones in the mixed-precision dtype)."""
    out = Path(work_dir) / "validation" / f"step-{step:07d}"
    with torch.random.fork_rng(devices=[]):
        pipe = pipeline_of(acc, base, unet, text_encoder, vae, tokenizer)
        use_sampler(pipe, cfg.sampling.sampler)
        pipe.set_progress_bar_config(disable=True)
        pipe.vae.enable_slicing()  # one image decoded at a time: sampling mid-run must not raise training's peak memory
        requests = [
            GenerationRequest(cfg.fill(p, class_noun), cfg.seed + i, cfg.sampling.steps, cfg.sampling.guidance_scale)
            for i, p in enumerate(cfg.validation_prompts)
        ]
        with atomic_dir(out, replace=True) as tmp:
            with autocast():
                images = generate(pipe, requests, cfg.sampling.batch_size)
            for i, img in enumerate(images):
                img.save(tmp / f"{i:02d}.png")
    for m in (unet, text_encoder):
        if any(p.requires_grad for p in m.parameters()):  # back to training mode after sampling
            m.train()
    return out


def save_pipeline(acc: Accelerator, base: Path, unet, text_encoder, output_dir: Path, lora_text_encoder: bool | None = None) -> Path:
    """Write the fine-tuned pipeline. A LoRA run (`lora_text_encoder` not None) writes its adapters
    under `lora/` and the whole pipeline with them fused into the fp32 base weights, so serving and
    lineage treat both kinds of run alike."""
    with atomic_dir(Path(output_dir), replace=True) as tmp:
        if lora_text_encoder is None:
            pipeline_of(acc, base, unet, text_encoder).save_pretrained(tmp, safe_serialization=True)
            forget_paths(tmp, base)
            return Path(output_dir)
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        def adapters(model):
            return convert_state_dict_to_diffusers(
                get_peft_model_state_dict(acc.unwrap_model(model, keep_torch_compile=False), save_embedding_layers=False)
            )

        StableDiffusionPipeline.save_lora_weights(
            tmp / "lora",
            unet_lora_layers=adapters(unet),
            text_encoder_lora_layers=adapters(text_encoder) if lora_text_encoder else None,
            safe_serialization=True,
        )
        pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False, local_files_only=True)
        pipe.load_lora_weights(str(tmp / "lora"))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        pipe.save_pretrained(tmp, safe_serialization=True)
        forget_paths(tmp, base)
    return Path(output_dir)


def forget_paths(pipeline_dir: Path, base: Path) -> None:
    """diffusers and transformers write the base model's absolute path (`_name_or_path`) into the saved
    configs; the same weights trained in another workspace would then hash differently. Lineage names
    the base model by id and hash instead."""
    import json

    for path in Path(pipeline_dir).rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and str(data.get("_name_or_path", "")).startswith(str(base)):
            data["_name_or_path"] = "base-model"
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
