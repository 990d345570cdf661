"""Base models: check that a directory is a diffusers Stable Diffusion 1.x/2.x pipeline, and hash it."""

from __future__ import annotations

import json
from pathlib import Path

from atelier.errors import ModelFormatError
from atelier.hashing import tree_hash

SUPPORTED = {"StableDiffusionPipeline"}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_sd_directory(path: Path) -> Path:
    path = Path(path)
    fix = "pass a local diffusers-format Stable Diffusion 1.x/2.x directory (one with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
    if not path.is_dir():
        raise ModelFormatError(str(path), "is not a directory", fix)
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelFormatError(str(path), "has no model_index.json, so it is not a diffusers pipeline", fix)
    try:
        meta = json.loads(index.read_text())
    except json.JSONDecodeError:
        raise ModelFormatError(str(index), "is not valid JSON", fix) from None
    kind = meta.get("_class_name")
    if kind not in SUPPORTED:
        raise ModelFormatError(str(path), f"is a {kind or 'unknown'} pipeline, not a Stable Diffusion 1.x/2.x one", fix)
    for part in COMPONENTS:
        sub = path / part
        if not sub.is_dir() or not any(sub.iterdir()):
            raise ModelFormatError(str(path), f"lacks its {part}/ component", fix)
    return path


def model_hash(path: Path) -> str:
    """Content hash of the model directory (every file, not timestamps)."""
    return tree_hash(Path(path))
