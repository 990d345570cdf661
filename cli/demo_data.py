"""Demo data: photos of a made-up subject (a toy robot), drawn procedurally so no download is needed.

Each photo varies pose, scale, background and lighting, like real DreamBooth inputs, and none is a
near duplicate of another.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

DEMO_CUSTOMER = "acme"
DEMO_SUBJECT = "robot"
DEMO_CLASS = "toy"


def _background(rng: random.Random, size: int) -> Image.Image:
    top = tuple(rng.randrange(40, 230) for _ in range(3))
    bottom = tuple(rng.randrange(20, 200) for _ in range(3))
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        t = y / (size - 1)
        draw.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(rng.randrange(3, 9)):  # clutter
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(size // 20, size // 6)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def draw_robot(seed: int, size: int = 320) -> Image.Image:
    rng = random.Random(seed)
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    s = size * rng.uniform(0.35, 0.6)
    cx, cy = size * rng.uniform(0.3, 0.7), size * rng.uniform(0.4, 0.65)
    body, head, eye = (200, 40, 40), (230, 200, 30), (30, 30, 220)  # the subject's identity: fixed colours
    draw.rounded_rectangle([cx - s / 3, cy - s / 6, cx + s / 3, cy + s / 2], radius=int(s / 12), fill=body)
    draw.rectangle([cx - s / 4, cy - s / 2, cx + s / 4, cy - s / 6], fill=head)
    for dx in (-s / 8, s / 8):
        draw.ellipse([cx + dx - s / 20, cy - s / 3 - s / 20, cx + dx + s / 20, cy - s / 3 + s / 20], fill=eye)
    draw.line([cx, cy - s / 2, cx, cy - s / 1.6], fill=(90, 90, 90), width=max(2, int(s / 40)))
    img = img.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, fillcolor=(128, 128, 128))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))


def write_demo_photos(out_dir: Path, count: int = 5, size: int = 320) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out_dir / f"robot-{i + 1:02d}.jpg"
        draw_robot(1000 + i, size).save(path, quality=92)
        paths.append(path)
    return paths
