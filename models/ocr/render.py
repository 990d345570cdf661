"""Synthetic multilingual document sets: text lines and pages cut from running text (sentences.py),
rendered with several real fonts per script, then degraded as scans and phone photos are (blur,
rotation, noise, JPEG, low contrast, low resolution, uneven light, speckles, thin or bold ink).

A set is a folder of PNGs and `labels.jsonl` (one JSON object per image: file, lang, text, kind;
a page's text has one line per text line, in reading order: the title, then each column top to
bottom, columns left to right). `render_splits` writes a calibration and an evaluation set cut from
different sentences, so the two never share a line.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from atelier.kernel.errors import NotFound
from atelier.kernel.storage import atomic_dir
from atelier.models.ocr.langs import LANGUAGES, NO_SPACES
from atelier.models.ocr.sentences import SENTENCES

LABELS = "labels.jsonl"
_NOTO = ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc")
_LATIN = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSerif-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSerif.ttf",
    "/usr/share/fonts/truetype/paratype/PTS55F.ttf",
    "/usr/share/fonts/truetype/paratype/PTF55F.ttf",
]
# (file, face index inside a .ttc collection); the first of each family is the one a set cannot do without
FONT_FILES: dict[str, list[tuple[str, int]]] = {
    "latin": [(f, 0) for f in _LATIN],
    "zh": [(_NOTO[0], 2), (_NOTO[1], 2), ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", 0)],
    "ja": [
        (_NOTO[0], 0),
        (_NOTO[1], 0),
        ("/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf", 0),
        ("/usr/share/fonts/opentype/ipafont-mincho/ipam.ttf", 0),
    ],
    "ko": [
        (_NOTO[0], 1),
        (_NOTO[1], 1),
        ("/usr/share/fonts/truetype/nanum/NanumGothic.ttf", 0),
        ("/usr/share/fonts/truetype/nanum/NanumMyeongjo.ttf", 0),
        ("/usr/share/fonts/truetype/unfonts-core/UnBatang.ttf", 0),
    ],
}
FONT_PACKAGES = {
    "dejavu": "fonts-dejavu-core",
    "noto": "fonts-noto-cjk",
    "liberation2": "fonts-liberation2",
    "freefont": "fonts-freefont-ttf",
    "paratype": "fonts-paratype",
    "wqy": "fonts-wqy-zenhei",
    "ipafont-gothic": "fonts-ipafont-gothic",
    "ipafont-mincho": "fonts-ipafont-mincho",
    "nanum": "fonts-nanum",
    "unfonts-core": "fonts-unfonts-core",
}
DEGRADATIONS = ("blur", "rotate", "noise", "jpeg", "contrast", "lowres", "light", "speckle", "ink")


@dataclass(frozen=True)
class RenderSpec:
    langs: tuple[str, ...] = tuple(LANGUAGES)
    lines_per_lang: int = 12
    pages_per_lang: int = 0
    seed: int = 0
    degrade: bool = True
    part: str = "all"  # which sentences: "calibration" (2 of 3), "evaluation" (the other third) or "all"


def family(lang: str) -> str:
    return lang if lang in ("zh", "ja", "ko") else "latin"


def missing_fonts() -> list[str]:
    """The Debian packages whose fonts the sets are rendered with and that are not installed."""
    gone = {f for fonts in FONT_FILES.values() for f, _ in fonts if not Path(f).is_file()}
    return sorted({pkg for f in gone for key, pkg in FONT_PACKAGES.items() if f"/{key}/" in f})


def fonts_for(lang: str, size: int) -> list[ImageFont.FreeTypeFont]:
    files = FONT_FILES[family(lang)]
    missing = missing_fonts()
    if missing:
        raise NotFound(
            f"fonts for {lang!r}",
            f"the packages {', '.join(missing)} are not installed",
            f"install them: `make ocr-system-deps` (apt-get install {' '.join(missing)})",
        )
    return [ImageFont.truetype(f, size, index=index) for f, index in files]


def sentences_for(lang: str, part: str) -> list[str]:
    every = SENTENCES[lang]
    if part == "all":
        return every
    keep = 2 if part == "evaluation" else None
    return [s for i, s in enumerate(every) if (i % 3 == 2) == (keep is not None)]


def _units(text: str, lang: str) -> list[str]:
    return list(text) if lang in NO_SPACES else text.split()


def _join(units: list[str], lang: str) -> str:
    return ("" if lang in NO_SPACES else " ").join(units).strip()


def cut_line(lang: str, sentences: list[str], rng: random.Random) -> str:
    """A span of a sentence, as a line of a document is: 3-10 words, or 5-22 characters where words
    are not spaced."""
    units = _units(rng.choice(sentences), lang)
    low, high = (5, 22) if lang in NO_SPACES else (3, 10)
    size = min(len(units), rng.randint(low, high))
    start = rng.randint(0, len(units) - size)
    return _join(units[start : start + size], lang)


NO_LINE_START = set("、。，．：；？！）」』】〕％")  # CJK punctuation never starts a line (kinsoku)


def wrap(text: str, lang: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """Greedy line breaking at `width` pixels (between words, or between characters where words are
    not spaced, never before closing punctuation)."""
    lines, current = [], []
    for unit in _units(text, lang):
        trial = _join(current + [unit], lang)
        if current and font.getlength(trial) > width and unit not in NO_LINE_START:
            lines.append(_join(current, lang))
            current = [unit]
        else:
            current.append(unit)
    if current:
        lines.append(_join(current, lang))
    return lines


def draw_text(lines: list[str], font: ImageFont.FreeTypeFont, pad: int = 12, gap: int = 10, ink: int = 0, paper: int = 255) -> Image.Image:
    boxes = [font.getbbox(t) for t in lines]
    height = max(b[3] - b[1] for b in boxes)
    width = max(b[2] - b[0] for b in boxes) + 2 * pad
    img = Image.new("L", (width, len(lines) * height + (len(lines) - 1) * gap + 2 * pad), paper)
    draw = ImageDraw.Draw(img)
    for i, (text, box) in enumerate(zip(lines, boxes)):
        draw.text((pad - box[0], pad + i * (height + gap) - box[1]), text, fill=ink, font=font)
    return img


def draw_page(lang: str, sentences: list[str], rng: random.Random) -> tuple[Image.Image, list[str]]:
    """A page of one or two columns under an optional title; returns the image and its lines in reading order."""
    size = rng.randint(20, 30)
    font = rng.choice(fonts_for(lang, size))
    columns = 2 if rng.random() < 0.35 else 1
    col_width = rng.randint(300, 420) if columns == 2 else rng.randint(520, 900)
    gutter, margin, leading = rng.randint(40, 80), rng.randint(30, 60), int(size * rng.uniform(1.35, 1.7))
    per_column = [rng.randint(3, 6) if columns == 2 else rng.randint(4, 8) for _ in range(columns)]
    pool = sentences[:]
    rng.shuffle(pool)
    text_lines: list[list[str]] = []
    for count in per_column:
        lines: list[str] = []
        while len(lines) < count and pool:
            lines.extend(wrap(pool.pop(), lang, font, col_width))
        text_lines.append(lines[:count])
    title = None
    if rng.random() < 0.5 and pool:
        title_font = font.font_variant(size=int(size * 1.35))
        title = wrap(pool.pop(), lang, title_font, columns * col_width + (columns - 1) * gutter)[0]
    width = 2 * margin + columns * col_width + (columns - 1) * gutter
    top = margin + (int(size * 2.4) if title else 0)
    height = top + max(len(c) for c in text_lines) * leading + margin
    paper = rng.randint(235, 255)
    img = Image.new("L", (width, height), paper)
    draw = ImageDraw.Draw(img)
    ink = rng.randint(0, 60)
    if title:
        draw.text((margin, margin), title, fill=ink, font=title_font)
    for c, lines in enumerate(text_lines):
        x = margin + c * (col_width + gutter)
        for i, text in enumerate(lines):
            draw.text((x, top + i * leading), text, fill=ink, font=font)
    order = ([title] if title else []) + [line for column in text_lines for line in column]
    return img, order


def degrade(img: Image.Image, rng: random.Random) -> Image.Image:
    """One to three of the scan and photo defects in DEGRADATIONS."""
    for kind in rng.sample(DEGRADATIONS, rng.randint(1, 3)):
        if kind == "blur":
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.1)))
        elif kind == "rotate":
            img = img.rotate(rng.uniform(-2.0, 2.0), resample=Image.BICUBIC, expand=True, fillcolor=int(np.median(np.asarray(img))))
        elif kind == "noise":
            arr = np.asarray(img, dtype=np.float32) + np.random.default_rng(rng.randrange(2**32)).normal(
                0, rng.uniform(6, 14), (img.height, img.width)
            )
            img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        elif kind == "jpeg":
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=rng.randint(30, 60))
            img = Image.open(io.BytesIO(buf.getvalue())).convert("L")
        elif kind == "contrast":
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.35, 0.6))
        elif kind == "lowres":  # scanned at a low resolution, then enlarged
            scale = rng.uniform(0.55, 0.8)
            small = img.resize((max(8, int(img.width * scale)), max(8, int(img.height * scale))), Image.BILINEAR)
            img = small.resize(img.size, Image.BICUBIC)
        elif kind == "light":  # a photo's uneven light: a gradient across the page
            ramp = np.linspace(rng.uniform(0.75, 0.9), 1.0, img.width, dtype=np.float32)
            if rng.random() < 0.5:
                ramp = ramp[::-1]
            img = Image.fromarray((np.asarray(img, dtype=np.float32) * ramp[None, :]).clip(0, 255).astype(np.uint8))
        elif kind == "speckle":
            arr = np.asarray(img).copy()
            noise = np.random.default_rng(rng.randrange(2**32)).random(arr.shape)
            arr[noise < 0.004] = 0
            arr[noise > 0.996] = 255
            img = Image.fromarray(arr)
        elif rng.random() < 0.5:  # ink: heavy (bleeding) strokes
            img = img.filter(ImageFilter.MinFilter(3))
        else:  # or worn ones: half-way to strokes a pixel thinner on each side
            img = Image.blend(img, img.filter(ImageFilter.MaxFilter(3)), 0.5)
    return img


def render_set(out: Path, spec: RenderSpec, exclude: set[str] | None = None, replace: bool = False) -> list[dict]:
    """Render `spec` into `out` (atomically). Lines whose text is in `exclude` are drawn again."""
    rng = random.Random(spec.seed)
    exclude = exclude or set()
    records: list[dict] = []
    with atomic_dir(Path(out), replace=replace) as tmp:
        for lang in spec.langs:
            pool = sentences_for(lang, spec.part)
            seen: set[str] = set()

            def fresh(lang: str = lang, pool=pool, seen: set[str] = seen) -> str:
                for _ in range(1000):
                    text = cut_line(lang, pool, rng)
                    if text not in exclude and text not in seen:
                        seen.add(text)
                        return text
                raise ValueError(f"cannot draw enough distinct {lang} lines; lower lines_per_lang")

            for i in range(spec.lines_per_lang):
                text = fresh()
                img = draw_text(
                    [text],
                    rng.choice(fonts_for(lang, rng.randint(22, 40))),
                    pad=rng.randint(4, 16),
                    ink=rng.randint(0, 50),
                    paper=rng.randint(225, 255),
                )
                records.append(_save(tmp, f"{lang}-line-{i:04d}.png", img, spec, rng, lang, [text], "line"))
            for i in range(spec.pages_per_lang):
                img, lines = draw_page(lang, pool, rng)
                records.append(_save(tmp, f"{lang}-page-{i:04d}.png", img, spec, rng, lang, lines, "page"))
        (tmp / LABELS).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


def _save(folder: Path, name: str, img: Image.Image, spec: RenderSpec, rng: random.Random, lang: str, lines: list[str], kind: str) -> dict:
    if spec.degrade:
        img = degrade(img, rng)
    img.convert("RGB").save(folder / name)
    return {"file": name, "lang": lang, "text": "\n".join(lines), "kind": kind}


def render_splits(root: Path, calibration: RenderSpec, evaluation: RenderSpec, replace: bool = False) -> dict[str, Path]:
    """Evaluation first (its third of the sentences), then calibration from the others, never
    repeating an evaluation line."""
    from dataclasses import replace as with_

    root = Path(root)
    held_out = render_set(root / "evaluation", with_(evaluation, part="evaluation"), replace=replace)
    exclude = {line for r in held_out for line in r["text"].split("\n")}
    render_set(root / "calibration", with_(calibration, part="calibration"), exclude=exclude, replace=replace)
    return {"calibration": root / "calibration", "evaluation": root / "evaluation"}


def read_labels(folder: Path) -> list[dict]:
    path = Path(folder) / LABELS
    if not path.is_file():
        raise NotFound(str(path), "no labels file", f"a document set needs {LABELS} (file, lang, text per line)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
