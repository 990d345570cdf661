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
    for entry in sorted(path.rglob("*")):  # a pipe or a device would be read (hashed, parsed) forever
        if not entry.is_dir() and not entry.is_file():
            raise ModelFormatError(str(entry), "is not a regular file (a pipe, a device, a socket or a broken link)", fix)
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelFormatError(str(path), "has no model_index.json, so it is not a diffusers pipeline", fix)
    meta = _json_object(index)
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
            raise ModelFormatError(str(weights), problem, RECOPY)
    for part, name in CONFIGS.items():
        _json_object(path / part / name)
    _check_tokenizer(path / "tokenizer")
    for part in WEIGHTS:
        _check_weights(path, part)
    return path


RECOPY = "copy the model again (the file is damaged or was cut short); compare its size and checksum with the source"
CONFIGS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json", "scheduler": "scheduler_config.json"}
# each component's weights file stem, and a tensor that tells it apart from the others: name, and its shape from the config
WEIGHTS = {
    "unet": ("diffusion_pytorch_model", ("conv_in.weight",), lambda c: [c["block_out_channels"][0], c["in_channels"]]),
    "vae": ("diffusion_pytorch_model", ("encoder.conv_in.weight",), lambda c: [c["block_out_channels"][0], c["in_channels"]]),
    "text_encoder": (
        "model",
        ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"),
        lambda c: [c["vocab_size"], c["hidden_size"]],
    ),
}


def _json_object(path: Path) -> dict:
    if not path.is_file():
        raise ModelFormatError(str(path), "is missing", RECOPY)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(str(path), f"is not valid JSON ({exc.__class__.__name__})", RECOPY) from None
    if not isinstance(value, dict):
        raise ModelFormatError(str(path), "is not a JSON object", RECOPY)
    return value


def _check_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer's files parse: tokenizer.json (fast) or vocab.json + merges.txt (slow)."""
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise ModelFormatError(str(folder), "has neither tokenizer.json nor vocab.json", RECOPY)
    for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            _json_object(folder / name)
    if (folder / "vocab.json").is_file():
        try:
            merges = (folder / "merges.txt").read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            raise ModelFormatError(str(folder / "merges.txt"), "is missing or not UTF-8 text (vocab.json needs it)", RECOPY) from None
        if not merges.strip():
            raise ModelFormatError(str(folder / "merges.txt"), "is empty", RECOPY)


def _check_weights(path: Path, part: str) -> None:
    """The component has weights, and (safetensors, read by header only) they are its own: the tensor that
    tells it apart has the shape its config names, so weights swapped between components are caught."""
    stem, keys, shape_of = WEIGHTS[part]
    folder = path / part
    files = sorted(folder.glob(f"{stem}*.safetensors")) or sorted(folder.glob(f"{stem}*.bin"))
    if not files:
        raise ModelFormatError(str(folder), f"has no weights ({stem}.safetensors)", RECOPY)
    if files[0].suffix != ".safetensors":
        return  # a pickle-format checkpoint: its keys cannot be read without loading it
    shapes = {name: info.get("shape") for f in files for name, info in _header(f).items() if isinstance(info, dict)}
    found = next((name for name in keys if name in shapes), None)
    if found is None:
        raise ModelFormatError(str(files[0]), f"holds no {keys[0]}: these are not {part} weights (swapped with another component?)", RECOPY)
    config = _json_object(folder / CONFIGS[part])
    try:
        want = shape_of(config)
    except (KeyError, IndexError, TypeError):
        raise ModelFormatError(str(folder / CONFIGS[part]), f"lacks the sizes of a {part} config", RECOPY) from None
    if list(shapes[found] or [])[: len(want)] != want:
        raise ModelFormatError(
            str(files[0]),
            f"has {found} of shape {shapes[found]}, where {part}/{CONFIGS[part]} says {want}: weights and config differ",
            RECOPY,
        )


def check_lora_targets(path: Path, unet_targets: list[str], text_encoder_targets: list[str]) -> None:
    """Every LoRA target module names modules the base model has (read from its weights' headers), so a
    typo is exit 2 before a run, not peft's error 30 s into one."""
    for part, targets in (("unet", unet_targets), ("text_encoder", text_encoder_targets)):
        files = sorted((Path(path) / part).glob(f"{WEIGHTS[part][0]}*.safetensors"))
        if not files or not targets:
            continue
        modules = {name.rsplit(".", 1)[0] for f in files for name in _header(f) if name != "__metadata__"}
        missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
        if missing:
            example = sorted({m.rsplit(".", 1)[-1] for m in modules if ("attn" in m or "proj" in m) and not m[-1].isdigit()})[:8]
            raise ModelFormatError(
                f"lora.{part}_target_modules {missing}",
                f"names no module of the base model's {part}",
                f"use module names it has (e.g. {', '.join(example) or 'to_q, to_k, to_v'})",
            )


def _header(path: Path) -> dict:
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(length))


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
