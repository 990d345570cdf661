"""Synthetic multilingual document sets: text lines (and a few pages) rendered with real fonts, then
degraded (blur, rotation, noise, JPEG, low contrast) as scans and photos are.

A set is a folder of PNGs and `labels.jsonl` (one JSON object per image: file, lang, text, kind).
`render_splits` writes a calibration and an evaluation set that share no line of text.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from atelier.errors import NotFound
from atelier.storage import atomic_dir
from models.ocr.corpus import make_line
from models.ocr.langs import LANGUAGES

LABELS = "labels.jsonl"
CJK_INDEX = {"ja": 0, "ko": 1, "zh": 2}  # face index inside Debian's Noto CJK .ttc collections
FONT_FILES = {
    "latin": ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"],
    "cjk": ["/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc"],
}


@dataclass(frozen=True)
class RenderSpec:
    langs: tuple[str, ...] = tuple(LANGUAGES)
    lines_per_lang: int = 12
    pages_per_lang: int = 0
    seed: int = 0
    degrade: bool = True


def fonts_for(lang: str, size: int) -> list[ImageFont.FreeTypeFont]:
    family = "cjk" if lang in CJK_INDEX else "latin"
    found = [f for f in FONT_FILES[family] if Path(f).is_file()]
    if not found:
        package = "fonts-noto-cjk" if family == "cjk" else "fonts-dejavu-core"
        raise NotFound(f"fonts for {lang!r}", f"none of {FONT_FILES[family]} is installed",
                       f"install the Debian package {package} (`make ocr-system-deps`)")
    return [ImageFont.truetype(f, size, index=CJK_INDEX.get(lang, 0)) for f in found]


def draw_text(lines: list[str], font: ImageFont.FreeTypeFont, pad: int = 12, gap: int = 10) -> Image.Image:
    boxes = [font.getbbox(t) for t in lines]
    height = max(b[3] - b[1] for b in boxes)
    width = max(b[2] - b[0] for b in boxes) + 2 * pad
    img = Image.new("L", (width, len(lines) * height + (len(lines) - 1) * gap + 2 * pad), 255)
    draw = ImageDraw.Draw(img)
    for i, (text, box) in enumerate(zip(lines, boxes)):
        draw.text((pad - box[0], pad + i * (height + gap) - box[1]), text, fill=0, font=font)
    return img


def degrade(img: Image.Image, rng: random.Random) -> Image.Image:
    """One or two of: blur, small rotation, noise, JPEG artefacts, low contrast."""
    for kind in rng.sample(["blur", "rotate", "noise", "jpeg", "contrast"], rng.randint(1, 2)):
        if kind == "blur":
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
        elif kind == "rotate":
            img = img.rotate(rng.uniform(-2.0, 2.0), resample=Image.BICUBIC, expand=True, fillcolor=255)
        elif kind == "noise":
            arr = np.asarray(img, dtype=np.float32) + np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (img.height, img.width))
            img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        elif kind == "jpeg":
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=rng.randint(30, 60))
            img = Image.open(io.BytesIO(buf.getvalue())).convert("L")
        else:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.35, 0.6))
    return img


def render_set(out: Path, spec: RenderSpec, exclude: set[str] | None = None, replace: bool = False) -> list[dict]:
    """Render `spec` into `out` (atomically). Lines whose text is in `exclude` are drawn again."""
    rng = random.Random(spec.seed)
    exclude = exclude or set()
    records: list[dict] = []
    with atomic_dir(Path(out), replace=replace) as tmp:
        for lang in spec.langs:
            seen: set[str] = set()

            def fresh() -> str:
                for _ in range(1000):
                    text = make_line(lang, rng)
                    if text not in exclude and text not in seen:
                        seen.add(text)
                        return text
                raise ValueError(f"cannot draw enough distinct {lang} lines; lower lines_per_lang")

            for kind, count in (("line", spec.lines_per_lang), ("page", spec.pages_per_lang)):
                for i in range(count):
                    texts = [fresh()] if kind == "line" else [fresh() for _ in range(rng.randint(3, 5))]
                    font = rng.choice(fonts_for(lang, rng.randint(26, 38)))
                    img = draw_text(texts, font)
                    if spec.degrade:
                        img = degrade(img, rng)
                    name = f"{lang}-{kind}-{i:04d}.png"
                    img.convert("RGB").save(tmp / name)
                    records.append({"file": name, "lang": lang, "text": "\n".join(texts), "kind": kind})
        (tmp / LABELS).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


def render_splits(root: Path, calibration: RenderSpec, evaluation: RenderSpec, replace: bool = False) -> dict[str, Path]:
    """Evaluation first, then calibration lines that never repeat an evaluation line's text."""
    root = Path(root)
    held_out = render_set(root / "evaluation", evaluation, replace=replace)
    exclude = {line for r in held_out for line in r["text"].split("\n")}
    render_set(root / "calibration", calibration, exclude=exclude, replace=replace)
    return {"calibration": root / "calibration", "evaluation": root / "evaluation"}


def read_labels(folder: Path) -> list[dict]:
    path = Path(folder) / LABELS
    if not path.is_file():
        raise NotFound(str(path), "no labels file", f"a document set needs {LABELS} (file, lang, text per line)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
