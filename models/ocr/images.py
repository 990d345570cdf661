"""Loading document images for OCR: EXIF orientation, a pixel cap, Pillow's decompression-bomb guard,
and optional contrast enhancement and deskew. Errors name the file and the fix."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from atelier.errors import AtelierError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")  # what is read as a document
MAX_PIXELS = 40_000_000  # larger pages are scaled down to this before OCR
Image.MAX_IMAGE_PIXELS = 200_000_000  # Pillow refuses (DecompressionBombError) above 2x this


class BadDocument(AtelierError):
    pass


def load_document(path: Path, max_pixels: int = MAX_PIXELS, enhance: bool = False, deskew: bool = False) -> np.ndarray:
    """RGB uint8 array of `path`, upright, at most `max_pixels` pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            img = ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        raise BadDocument(str(path), "does not exist", "check the path") from None
    except Image.DecompressionBombError as exc:
        raise BadDocument(str(path), f"is too large to open safely ({exc})", "split or downscale the page first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadDocument(str(path), f"is not a readable image ({exc.__class__.__name__})",
                          "re-export it as PNG or JPEG, or remove it from the set") from None
    if img.width < 4 or img.height < 4:
        raise BadDocument(str(path), f"is {img.width}x{img.height} pixels, too small to hold text", "remove it from the set")
    if img.width * img.height > max_pixels:
        scale = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.LANCZOS)
    if enhance:
        img = ImageOps.autocontrast(img, cutoff=1)
    if deskew:
        img = img.rotate(skew_angle(img), resample=Image.BICUBIC, expand=True, fillcolor=(255, 255, 255))
    return np.asarray(img)


def skew_angle(img: Image.Image, max_degrees: float = 5.0, step: float = 0.25) -> float:
    """The small rotation that makes text rows most horizontal (projection-profile variance)."""
    gray = np.asarray(ImageOps.grayscale(img).resize((min(img.width, 800), max(1, int(img.height * min(img.width, 800) / img.width)))))
    ink = Image.fromarray((gray < 128).astype(np.uint8) * 255)
    best, best_score = 0.0, -1.0
    for angle in np.arange(-max_degrees, max_degrees + step, step):
        rows = np.asarray(ink.rotate(float(angle), expand=False)).sum(axis=1, dtype=np.float64)
        score = float(np.var(rows))
        if score > best_score:
            best, best_score = float(angle), score
    return best
