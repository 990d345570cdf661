"""What training writes besides checkpoints: the fine-tuned pipeline at its end (a LoRA run's adapters
too, fused into a plain pipeline). Validation samples during the run: `validation.py`."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from diffusers import StableDiffusionPipeline

from atelier.kernel.storage import atomic_dir


def pipeline_of(acc: Accelerator, base: Path, unet, text_encoder) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(
        str(base),
        unet=acc.unwrap_model(unet, keep_torch_compile=False),
        text_encoder=acc.unwrap_model(text_encoder, keep_torch_compile=False),
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
    )


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
