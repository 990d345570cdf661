"""Tiny random-weight models for tests: the GLM builders live in models/vlm/tiny.py (the embedded
judge uses them too); CLIP and DINO ViT directories for the classic metrics are built here."""

from __future__ import annotations

from pathlib import Path

from atelier.models.vlm.tiny import build_tiny_glm4v, build_tiny_glm_ocr  # noqa: F401 (tests import them from here)


def build_tiny_clip_and_dino(out: Path) -> tuple[Path, Path]:
    """Random-weight CLIPModel (with the real CLIP tokenizer derived offline) and ViT directories."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer, ViTConfig, ViTImageProcessorPil, ViTModel

    from atelier.models.dreambooth.tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    clip_dir, dino_dir = Path(out) / "clip", Path(out) / "dino"
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(out) / "tok"))
    CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
            ),
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
            ),
            projection_dim=16,
        )
    ).save_pretrained(clip_dir)
    tok.save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    ViTModel(
        ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        add_pooling_layer=False,
    ).save_pretrained(dino_dir)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(dino_dir)
    return clip_dir, dino_dir
