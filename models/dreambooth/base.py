"""Base models: check that a directory is a diffusers Stable Diffusion 1.x/2.x pipeline, and hash it."""

from __future__ import annotations

import json
from pathlib import Path

from atelier.kernel.errors import ModelFormatError
from atelier.kernel.hashing import tree_hash

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
    for weights in sorted(path.rglob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ModelFormatError(
                str(weights),
                problem,
                "copy the model again (the file is damaged or was cut short); compare its size and checksum with the source",
            )
    return path


def safetensors_problem(path: Path) -> str | None:
    """Whether a .safetensors file is whole: its header parses and its tensors end where the file does.
    Reads the header only, so a multi-GB model is checked in milliseconds."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if length <= 0 or 8 + length > size:
                return f"is cut short or not a safetensors file ({size} bytes, header of {length})"
            header = json.loads(fh.read(length))
    except (OSError, ValueError) as exc:
        return f"has an unreadable header ({exc.__class__.__name__})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"is {size} bytes, but its header describes {expected}: the file is truncated or padded"
    return None


def model_hash(path: Path) -> str:
    """Content hash of the model directory (every file, not timestamps)."""
    return tree_hash(Path(path))
