"""Image loading shared by training and generation: EXIF orientation, RGB, resize, crop, tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from atelier.models.photos import list_photos, to_rgb


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return to_rgb(img)


def to_training_tensor(img: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """Shortest side to `resolution`, then a centre (or top-left) square crop; values in [-1, 1], CHW."""
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = ((w - resolution) // 2, (h - resolution) // 2) if center_crop else (0, 0)
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def stack_folder(folder: Path, resolution: int, center_crop: bool = True) -> torch.Tensor:
    files = list_photos(folder)
    if not files:
        from atelier.kernel.errors import DataValidationError

        raise DataValidationError(str(folder), [(str(folder), "count", "holds no photo (JPEG, PNG or WebP by content)")])
    return torch.stack([to_training_tensor(load_rgb(f), resolution, center_crop) for f in files])
