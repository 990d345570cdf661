"""One row of facts per file of an image set: decodable, format, size after EXIF, hashes, duplicates."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from atelier.kernel.hashing import sha256_file
from atelier.models.photos import to_rgb


@dataclass
class ImageFacts:
    file: str
    format: str | None
    decodable: bool
    rgb_convertible: bool
    width: int | None
    height: int | None
    min_side: int | None
    sha256: str
    dhash: str | None
    duplicate_of: str | None = None
    near_duplicate_of: str | None = None
    near_duplicate_bits: int | None = None
    error: str | None = None


def dhash(img: Image.Image) -> int:
    """64-bit difference hash: robust to re-encoding and resizing, sensitive to content."""
    small = np.asarray(img.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def inspect_file(path: Path) -> ImageFacts:
    path = Path(path)
    facts = ImageFacts(path.name, None, False, False, None, None, None, sha256_file(path), None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                facts.format = img.format
                img.load()  # decode every pixel: truncated files fail here, not in training
                facts.decodable = True
                rgb = to_rgb(img)
                facts.rgb_convertible = True
                facts.width, facts.height = rgb.size
                facts.min_side = min(rgb.size)
                facts.dhash = f"{dhash(rgb):016x}"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        facts.error = f"{exc.__class__.__name__}: {exc}"[:200]
    return facts


def inspect_images(files: list[Path], near_duplicate_bits: int) -> list[dict]:
    """Facts for each file (sorted by name), with exact and near duplicates pointing at the earlier file."""
    rows = [inspect_file(f) for f in sorted(files, key=lambda p: p.name)]
    for i, row in enumerate(rows):
        for prev in rows[:i]:
            if row.sha256 == prev.sha256:
                row.duplicate_of = prev.file
                break
            if row.dhash and prev.dhash:
                bits = hamming(int(row.dhash, 16), int(prev.dhash, 16))
                if bits <= near_duplicate_bits:
                    row.near_duplicate_of, row.near_duplicate_bits = prev.file, bits
                    break
    return [asdict(r) for r in rows]
