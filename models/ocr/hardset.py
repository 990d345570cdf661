"""A hard document set: documents as they arrive, not clean renders.

Lines and pages in all eight languages, in the layouts real documents have (`LAYOUTS`: lines, figures
(totals, phones, dates), paragraphs, two columns under a title, ruled invoice tables, timetables,
receipts, bilingual notices and whole dense A4 sheets at ~150 dpi), set in 60-odd
faces (regular, bold, italic, condensed, monospaced), then scanned or photographed badly: ~150 dpi
text (8-10 px x-height), noise, blur, JPEG at quality 30-60, uneven light and shadows, 1-4 degree
rotation and perspective, bleed-through from the back of the sheet, coloured paper.

Each record of `labels.jsonl` also names its `layout`. A table's text is its rows top to bottom, each
row's cells left to right joined by a space; a receipt's and a timetable's likewise: the order a
person reads them in. The set is generated deterministically from a seed (same fonts, same
Pillow: same pixels) from the evaluation third of the sentences, so the clean sets' calibration text
never appears in it.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from atelier.kernel.storage import atomic_dir
from atelier.models.ocr.langs import LANGUAGES, NO_SPACES
from atelier.models.ocr.render import LABELS, _join, _units, cut_line, family, missing_fonts, sentences_for, wrap

LAYOUTS = ("line", "figures", "paragraph", "columns", "table", "timetable", "receipt", "bilingual", "dense")

_T = "/usr/share/fonts/truetype"
_O = "/usr/share/fonts/opentype"
_LATIN_FACES = (
    [
        f"{_T}/dejavu/DejaVu{f}.ttf"
        for f in (
            "Sans",
            "Sans-Bold",
            "Sans-Oblique",
            "SansCondensed",
            "SansCondensed-Bold",
            "SansMono",
            "SansMono-Bold",
            "Serif",
            "Serif-Bold",
            "Serif-Italic",
            "SerifCondensed",
            "SerifCondensed-Italic",
        )
    ]
    + [
        f"{_T}/liberation2/Liberation{f}.ttf"
        for f in ("Sans-Regular", "Sans-Bold", "Sans-Italic", "Serif-Regular", "Serif-Bold", "Serif-Italic", "Mono-Regular", "Mono-Bold")
    ]
    + [f"{_T}/freefont/Free{f}.ttf" for f in ("Sans", "SansBold", "SansOblique", "Serif", "SerifBold", "SerifItalic", "Mono", "MonoBold")]
    + [f"{_T}/paratype/{f}.ttf" for f in ("PTS55F", "PTS75F", "PTS56F", "PTF55F", "PTF75F", "PTF56F")]
)
_NOTO = [f"{_O}/noto/Noto{f}CJK-{w}.ttc" for f in ("Sans", "Serif") for w in ("Regular", "Bold")]
FACES: dict[str, list[tuple[str, int]]] = {
    "latin": [(f, 0) for f in _LATIN_FACES],
    "zh": [(f, 2) for f in _NOTO] + [(f"{_T}/wqy/wqy-zenhei.ttc", 0), (f"{_T}/wqy/wqy-zenhei.ttc", 1)],
    "ja": [(f, 0) for f in _NOTO] + [(f"{_O}/ipafont-gothic/ipag.ttf", 0), (f"{_O}/ipafont-mincho/ipam.ttf", 0)],
    "ko": [(f, 1) for f in _NOTO]
    + [
        (f"{_T}/nanum/{f}.ttf", 0)
        for f in (
            "NanumGothic",
            "NanumGothicBold",
            "NanumMyeongjo",
            "NanumMyeongjoBold",
            "NanumBarunGothic",
            "NanumSquareR",
            "NanumGothicCoding",
        )
    ]
    + [(f"{_T}/unfonts-core/{f}.ttf", 0) for f in ("UnBatang", "UnDotum")],
}

# words a document of each language prints around figures: total, phone, date, and a table's header
WORDS = {
    "en": ("Total", "Tel.", "Date", ("Item", "Qty", "Price", "Amount"), "Station", "Subtotal", "VAT"),
    "fr": ("Total", "Tél.", "Date", ("Article", "Qté", "Prix", "Montant"), "Gare", "Sous-total", "TVA"),
    "es": ("Total", "Tel.", "Fecha", ("Artículo", "Cant.", "Precio", "Importe"), "Estación", "Subtotal", "IVA"),
    "de": ("Summe", "Tel.", "Datum", ("Artikel", "Menge", "Preis", "Betrag"), "Bahnhof", "Zwischensumme", "MwSt."),
    "ru": ("Итого", "Тел.", "Дата", ("Товар", "Кол-во", "Цена", "Сумма"), "Станция", "Подытог", "НДС"),
    "zh": ("合计", "电话", "日期", ("商品", "数量", "单价", "金额"), "车站", "小计", "税额"),
    "ja": ("合計", "電話", "日付", ("品名", "数量", "単価", "金額"), "駅名", "小計", "消費税"),
    "ko": ("합계", "전화", "날짜", ("품목", "수량", "단가", "금액"), "역명", "소계", "부가세"),
}
PAIRED = {"en": "de", **{lang: "en" for lang in LANGUAGES if lang != "en"}}  # a bilingual page's second language


def money(lang: str, value: float) -> str:
    whole, cents = f"{value:,.2f}".split(".")
    if lang == "en":
        return f"${whole}.{cents}"
    if lang in ("fr", "ru"):
        return f"{whole.replace(',', ' ')},{cents} " + ("€" if lang == "fr" else "руб.")
    if lang in ("es", "de"):
        return f"{whole.replace(',', '.')},{cents} €"
    if lang == "zh":
        return f"¥{whole}.{cents}"
    if lang == "ja":
        return f"¥{int(value):,}"
    return f"{int(value) * 10:,}원"


def date(lang: str, rng: random.Random) -> str:
    y, m, d = rng.randint(2019, 2027), rng.randint(1, 12), rng.randint(1, 28)
    return {
        "en": f"{m:02d}/{d:02d}/{y}",
        "fr": f"{d:02d}/{m:02d}/{y}",
        "es": f"{d:02d}/{m:02d}/{y}",
        "de": f"{d:02d}.{m:02d}.{y}",
        "ru": f"{d:02d}.{m:02d}.{y}",
        "zh": f"{y}年{m}月{d}日",
        "ja": f"{y}年{m}月{d}日",
        "ko": f"{y}년 {m}월 {d}일",
    }[lang]


def phone(lang: str, rng: random.Random) -> str:
    n = lambda k: "".join(str(rng.randint(0, 9)) for _ in range(k))  # noqa: E731
    return {
        "en": f"+1 ({n(3)}) {n(3)}-{n(4)}",
        "fr": f"+33 {rng.randint(1, 9)} {n(2)} {n(2)} {n(2)} {n(2)}",
        "es": f"+34 {n(3)} {n(3)} {n(3)}",
        "de": f"+49 {n(2)} {n(7)}",
        "ru": f"+7 {n(3)} {n(3)}-{n(2)}-{n(2)}",
        "zh": f"010-{n(4)}-{n(4)}",
        "ja": f"03-{n(4)}-{n(4)}",
        "ko": f"02-{n(3)}-{n(4)}",
    }[lang]


def faces(lang: str, size: int) -> list[ImageFont.FreeTypeFont]:
    missing = missing_fonts()
    if missing:
        from atelier.models.ocr.render import fonts_for

        fonts_for(lang, size)  # raises the NotFound that names the packages
    return [ImageFont.truetype(f, size, index=i) for f, i in FACES[family(lang)] if Path(f).is_file()]


def short(lang: str, pool: list[str], rng: random.Random, low: int = 1, high: int = 3) -> str:
    """A cell's text: 1-3 words (2-6 characters where words are not spaced), no trailing punctuation."""
    units = _units(rng.choice(pool), lang)
    lo, hi = (low + 1, high * 2) if lang in NO_SPACES else (low, high)
    size = min(len(units), rng.randint(lo, hi))
    start = rng.randint(0, len(units) - size)
    return _join(units[start : start + size], lang).strip(".,;:!?。，、；：！？")


class Sheet:
    """A page being typeset: text in RGB on paper of some colour; `lines` collects the reading order."""

    def __init__(self, width: int, height: int, rng: random.Random) -> None:
        tint = rng.choice([(255, 255, 255), (250, 246, 235), (236, 244, 250), (250, 240, 225), (235, 250, 235), (255, 250, 205)])
        shade = rng.randint(0, 20)
        self.paper = tuple(max(0, c - shade) for c in tint)
        self.ink = rng.choice([(0, 0, 0), (30, 30, 30), (20, 30, 90), (60, 40, 30)])
        self.img = Image.new("RGB", (width, height), self.paper)
        self.draw = ImageDraw.Draw(self.img)

    def text(self, xy: tuple[float, float], text: str, font: ImageFont.FreeTypeFont, anchor: str = "la") -> None:
        self.draw.text(xy, text, fill=self.ink, font=font, anchor=anchor)

    def rule(self, xy: tuple[float, float, float, float], width: int = 1) -> None:
        self.draw.line(xy, fill=self.ink, width=width)


def _size(rng: random.Random, small: bool) -> int:
    # x-height is about half the font size: 16-20 px type is the ~150 dpi scan's 8-10 px x-height
    return rng.randint(16, 20) if small else rng.randint(22, 34)


def draw_line(lang: str, pool: list[str], rng: random.Random, figures: bool) -> tuple[Image.Image, list[str]]:
    font = rng.choice(faces(lang, _size(rng, rng.random() < 0.6)))
    if figures:
        total, tel, day = WORDS[lang][:3]
        text = rng.choice([f"{total}: {money(lang, rng.uniform(3, 9999))}", f"{tel} {phone(lang, rng)}", f"{day}: {date(lang, rng)}"])
    else:
        text = cut_line(lang, pool, rng)
        if rng.random() < 0.25 and lang not in NO_SPACES and lang != "ko":
            text = text.upper()  # a heading, a sign
    pad = rng.randint(4, 14)
    box = font.getbbox(text)
    sheet = Sheet(int(box[2] - box[0]) + 2 * pad, int(box[3] - box[1]) + 2 * pad, rng)
    sheet.text((pad - box[0], pad - box[1]), text, font)
    return sheet.img, [text]


def draw_paragraph(lang: str, pool: list[str], rng: random.Random) -> tuple[Image.Image, list[str]]:
    size = _size(rng, True)
    font = rng.choice(faces(lang, size))
    width = rng.randint(520, 820)
    lines: list[str] = []
    sentences = pool * 4  # a small pool is drawn from again
    rng.shuffle(sentences)
    count = rng.randint(8, 14)
    while len(lines) < count and sentences:
        lines.extend(wrap(sentences.pop(), lang, font, width))
    lines = lines[:count]
    margin, leading = rng.randint(24, 50), int(size * rng.uniform(1.25, 1.5))
    sheet = Sheet(width + 2 * margin, 2 * margin + leading * len(lines), rng)
    for i, text in enumerate(lines):
        sheet.text((margin, margin + i * leading), text, font)
    return sheet.img, lines


def draw_columns(lang: str, pool: list[str], rng: random.Random) -> tuple[Image.Image, list[str]]:
    size = _size(rng, rng.random() < 0.5)
    font = rng.choice(faces(lang, size))
    col, gutter, margin, leading = rng.randint(300, 400), rng.randint(30, 60), rng.randint(24, 50), int(size * rng.uniform(1.3, 1.6))
    sentences = pool * 4  # a small pool is drawn from again
    rng.shuffle(sentences)
    columns = []
    for _ in range(2):
        lines: list[str] = []
        count = rng.randint(5, 9)
        while len(lines) < count and sentences:
            lines.extend(wrap(sentences.pop(), lang, font, col))
        columns.append(lines[:count])
    title_font = font.font_variant(size=int(size * 1.5))
    title = wrap(sentences.pop(), lang, title_font, 2 * col + gutter)[0]
    top = margin + int(size * 2.6)
    sheet = Sheet(2 * margin + 2 * col + gutter, top + leading * max(map(len, columns)) + margin, rng)
    sheet.text((margin, margin), title, title_font)
    for c, lines in enumerate(columns):
        for i, text in enumerate(lines):
            sheet.text((margin + c * (col + gutter), top + i * leading), text, font)
    return sheet.img, [title] + columns[0] + columns[1]


def _grid(lang: str, rows: list[list[str]], rng: random.Random, ruled: bool, numeric_from: int) -> Image.Image:
    """Rows of cells, columns as wide as their widest cell; figures right-aligned; ruled or not."""
    size = _size(rng, rng.random() < 0.5)
    font = rng.choice(faces(lang, size))
    bold = font
    pad, margin = int(size * rng.uniform(0.6, 1.2)), rng.randint(20, 40)
    widths = [max(font.getlength(r[c]) for r in rows) + 2 * pad for c in range(len(rows[0]))]
    row_h = int(size * rng.uniform(1.7, 2.2))
    sheet = Sheet(int(sum(widths)) + 2 * margin, row_h * len(rows) + 2 * margin, rng)
    for r, row in enumerate(rows):
        x = margin
        y = margin + r * row_h + row_h / 2
        for c, cell in enumerate(row):
            if c >= numeric_from and r > 0:
                sheet.text((x + widths[c] - pad, y), cell, font, anchor="rm")
            else:
                sheet.text((x + pad, y), cell, bold if r == 0 else font, anchor="lm")
            x += widths[c]
    if ruled:
        x0, x1 = margin, margin + int(sum(widths))
        for r in range(len(rows) + 1):
            sheet.rule((x0, margin + r * row_h, x1, margin + r * row_h))
        x = margin
        for w in [0, *widths]:
            x += w
            sheet.rule((x, margin, x, margin + row_h * len(rows)))
    return sheet.img


def draw_table(lang: str, pool: list[str], rng: random.Random) -> tuple[Image.Image, list[str]]:
    rows = [list(WORDS[lang][3])]
    for _ in range(rng.randint(3, 6)):
        qty, price = rng.randint(1, 12), rng.uniform(1, 400)
        rows.append([short(lang, pool, rng), str(qty), money(lang, price), money(lang, qty * price)])
    img = _grid(lang, rows, rng, ruled=True, numeric_from=1)
    return img, [" ".join(r) for r in rows]


def draw_timetable(lang: str, pool: list[str], rng: random.Random) -> tuple[Image.Image, list[str]]:
    runs = rng.randint(3, 5)
    start = [rng.randint(5 * 60, 20 * 60) for _ in range(runs)]
    rows = [[WORDS[lang][4]] + [f"{rng.choice('ABCDEFGHKLMRS')}{rng.randint(10, 999)}" for _ in range(runs)]]
    for stop in range(rng.randint(4, 7)):
        rows.append([short(lang, pool, rng, 1, 2)] + [f"{(s + 7 * stop) // 60 % 24:02d}:{(s + 7 * stop) % 60:02d}" for s in start])
    img = _grid(lang, rows, rng, ruled=rng.random() < 0.3, numeric_from=1)
    return img, [" ".join(r) for r in rows]


def draw_receipt(lang: str, pool: list[str], rng: random.Random) -> tuple[Image.Image, list[str]]:
    size = _size(rng, True)
    font = rng.choice(faces(lang, size))
    width, margin, leading = rng.randint(300, 420), rng.randint(16, 30), int(size * rng.uniform(1.3, 1.6))
    total, tel, day, _, _, subtotal, tax = WORDS[lang]
    head = [short(lang, pool, rng, 2, 3), f"{tel} {phone(lang, rng)}", f"{day}: {date(lang, rng)}"]
    items = [(short(lang, pool, rng), rng.uniform(0.5, 90)) for _ in range(rng.randint(3, 6))]
    net = sum(v for _, v in items)
    rows = [(name, money(lang, v)) for name, v in items]
    rows += [(subtotal, money(lang, net)), (tax, money(lang, net * 0.2)), (total, money(lang, net * 1.2))]
    sheet = Sheet(width + 2 * margin, 2 * margin + leading * (len(head) + len(rows) + 1), rng)
    for i, text in enumerate(head):
        sheet.text((margin + width / 2, margin + i * leading), text, font, anchor="ma")
    y0 = margin + (len(head) + 1) * leading
    for i, (name, value) in enumerate(rows):
        sheet.text((margin, y0 + i * leading), name, font)
        sheet.text((margin + width, y0 + i * leading), value, font, anchor="ra")
    return sheet.img, head + [f"{name} {value}" for name, value in rows]


def draw_bilingual(lang: str, pool: list[str], rng: random.Random) -> tuple[Image.Image, list[str]]:
    """Alternating lines in the page's language and its pair (English; German on an English page): a
    notice printed in two languages."""
    other = PAIRED[lang]
    size = _size(rng, rng.random() < 0.5)
    font_a, font_b = rng.choice(faces(lang, size)), rng.choice(faces(other, size))
    other_pool = sentences_for(other, "evaluation")
    lines = []
    for _ in range(rng.randint(3, 5)):
        lines.append((cut_line(lang, pool, rng), font_a))
        lines.append((cut_line(other, other_pool, rng), font_b))
    margin, leading = rng.randint(24, 40), int(size * rng.uniform(1.4, 1.7))
    width = int(max(f.getlength(t) for t, f in lines))
    sheet = Sheet(width + 2 * margin, 2 * margin + leading * len(lines), rng)
    for i, (text, font) in enumerate(lines):
        sheet.text((margin, margin + i * leading), text, font)
    return sheet.img, [t for t, _ in lines]


def draw_dense(lang: str, pool: list[str], rng: random.Random) -> tuple[Image.Image, list[str]]:
    """A whole A4 sheet scanned at ~150 dpi (1240 px wide): a title, then one or two columns of small
    type down the page, 60-odd lines: what a scanner feeds a folder."""
    size = rng.randint(16, 19)
    font = rng.choice(faces(lang, size))
    columns = rng.choice([1, 2])
    margin, gutter, leading = 90, 40, int(size * rng.uniform(1.3, 1.45))
    col = (1240 - 2 * margin - (columns - 1) * gutter) // columns
    title_font = font.font_variant(size=int(size * 1.6))
    sentences = pool * 40
    rng.shuffle(sentences)
    title = wrap(sentences.pop(), lang, title_font, 1240 - 2 * margin)[0]
    top = margin + int(size * 3)
    per_column = (1754 - top - margin) // leading
    text: list[list[str]] = []
    for _ in range(columns):
        lines: list[str] = []
        while len(lines) < per_column:
            lines.extend(wrap(sentences.pop(), lang, font, col))
        text.append(lines[:per_column])
    sheet = Sheet(1240, 1754, rng)
    sheet.text((margin, margin), title, title_font)
    for c, lines in enumerate(text):
        for i, line in enumerate(lines):
            sheet.text((margin + c * (col + gutter), top + i * leading), line, font)
    return sheet.img, [title] + [line for lines in text for line in lines]


DRAW = {
    "paragraph": draw_paragraph,
    "columns": draw_columns,
    "table": draw_table,
    "timetable": draw_timetable,
    "receipt": draw_receipt,
    "bilingual": draw_bilingual,
    "dense": draw_dense,
}


def photograph(img: Image.Image, rng: random.Random, page: bool) -> Image.Image:
    """A bad scan or phone photo of `img`: two to four defects, a page turned 1-4 degrees or put in
    perspective, always compressed."""
    arr = np.asarray(img, dtype=np.float32)
    h, w = arr.shape[:2]
    paper = np.median(arr.reshape(-1, 3), axis=0)
    if rng.random() < 0.3:  # bleed-through: the back of the sheet, mirrored and faint
        back = np.asarray(img.transpose(Image.FLIP_LEFT_RIGHT).filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
        arr = arr - rng.uniform(0.08, 0.18) * (paper - back)
    kinds = rng.sample(["blur", "noise", "light", "shadow", "lowres", "ink"], rng.randint(2, 4))
    if "light" in kinds or "shadow" in kinds:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        gain = np.ones((h, w), np.float32)
        if "light" in kinds:
            gain *= np.linspace(rng.uniform(0.7, 0.85), 1.0, w, dtype=np.float32)[None, :][:, :: rng.choice([1, -1])]
        if "shadow" in kinds:  # a soft shadow of a hand or a phone across part of the page
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.3, 0.7) * max(w, h)
            gain *= 1 - rng.uniform(0.25, 0.45) * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
        arr = arr * gain[:, :, None]
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if "ink" in kinds:
        out = out.filter(ImageFilter.MinFilter(3)) if rng.random() < 0.5 else Image.blend(out, out.filter(ImageFilter.MaxFilter(3)), 0.5)
    if "blur" in kinds:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.0)))
    if "lowres" in kinds:
        scale = rng.uniform(0.6, 0.8)
        out = out.resize((max(8, int(w * scale)), max(8, int(h * scale))), Image.BILINEAR).resize((w, h), Image.BICUBIC)
    fill = tuple(int(c * 0.8) for c in paper)
    angle = rng.uniform(1.0, 4.0) * rng.choice([1, -1]) if page or rng.random() < 0.4 else rng.uniform(-1.0, 1.0)
    if page and rng.random() < 0.4:  # a phone held at a slant: perspective
        m = 0.04 * min(w, h)
        src = [(0, 0), (w, 0), (w, h), (0, h)]
        dst = [(x + rng.uniform(-m, m), y + rng.uniform(-m, m)) for x, y in src]
        out = out.transform((w, h), Image.PERSPECTIVE, _perspective(dst, src), Image.BICUBIC, fillcolor=fill)
    out = out.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=fill)
    if "noise" in kinds:
        noisy = np.asarray(out, dtype=np.float32) + np.random.default_rng(rng.randrange(2**32)).normal(
            0, rng.uniform(5, 12), (out.height, out.width, 1)
        )
        out = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=rng.randint(30, 60))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _perspective(dst, src) -> list[float]:
    """PIL's 8 coefficients mapping output points `src`... to input points `dst`."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst):
        a += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        b += [u, v]
    return np.linalg.solve(np.array(a, np.float64), np.array(b, np.float64)).tolist()


def render_hard_set(out: Path, seed: int = 30, lines_per_lang: int = 6, pages_per_layout: int = 1, replace: bool = False) -> list[dict]:
    """Per language: `lines_per_lang` single lines (a third of them figures: totals, phones, dates) and
    `pages_per_layout` documents of each page layout, every one photographed (`photograph`)."""
    rng = random.Random(seed)
    records: list[dict] = []
    with atomic_dir(Path(out), replace=replace) as tmp:
        for lang in LANGUAGES:
            pool = sentences_for(lang, "evaluation")
            for i in range(lines_per_lang):
                layout = "figures" if i % 3 == 2 else "line"
                img, lines = draw_line(lang, pool, rng, layout == "figures")
                records.append(_save(tmp, f"{lang}-{layout}-{i:03d}.jpg", photograph(img, rng, False), lang, lines, "line", layout))
            for layout, draw in DRAW.items():
                for i in range(pages_per_layout):
                    img, lines = draw(lang, pool, rng)
                    records.append(_save(tmp, f"{lang}-{layout}-{i:03d}.jpg", photograph(img, rng, True), lang, lines, "page", layout))
        (tmp / LABELS).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return records


def _save(folder: Path, name: str, img: Image.Image, lang: str, lines: list[str], kind: str, layout: str) -> dict:
    img.save(folder / name, quality=95)
    return {"file": name, "lang": lang, "text": "\n".join(lines), "kind": kind, "layout": layout}
