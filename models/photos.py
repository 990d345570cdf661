"""What a photo is, once for `subject add`, the validation suite and training: a regular file whose name
does not start with '.', whose content (not its name or extension) decodes as JPEG, PNG or WebP. And
how one becomes the RGB image a model sees: EXIF orientation applied, 16-bit and 32-bit grey scaled to
8 bits (PIL's own conversion clips them, so a 16-bit PNG would train as white), palette and alpha images
converted, CMYK to RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PHOTO_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})


def is_hidden(path: Path) -> bool:
    return Path(path).name.startswith(".")


def image_format(path: Path) -> str | None:
    """The format the file's content decodes as (its header only), or None."""
    try:
        with Image.open(path) as img:
            return img.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def candidate_files(folder: Path) -> list[Path]:
    """Every file that could be a photo (validation then says whether each is one)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not is_hidden(p))


def list_photos(folder: Path) -> list[Path]:
    """The photos of a folder, by content: what training reads, and what validation passed."""
    return [p for p in candidate_files(folder) if image_format(p) in PHOTO_FORMATS]


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF-oriented 8-bit RGB, with high-bit-depth grey scaled rather than clipped."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode in ("I", "F") and arr.max(initial=0) > 65535:
            top = float(arr.max())
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")
