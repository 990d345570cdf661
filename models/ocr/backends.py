"""OCR backends behind one interface: `read_lines(images, lang)` -> one `Line` per line image.

- `PPOCR`: one PP-OCR recogniser (any generation; recognizer.py) over pre-cut lines.
- `Tesseract`: Tesseract 5's command line with Debian's language packs. Lines are read in batches,
  one process per batch (a list file of images, one "page" each): loading a language model costs
  more than reading a line (a batch reads about 2x the lines/s of a process per line). Each line is
  levelled, scaled to a 32-pixel text band and given a 4-pixel margin first: Tesseract's Korean
  misreads some fonts at other sizes ("내일 밤에는" as "베일 메히능" at 66 px, right at 32-48). Text
  comes from Tesseract's own text output (its word boxes split Korean into syllables; its text keeps
  the words), confidence from its TSV; specks it reads as quote marks or backticks at a line's ends
  are dropped, and a line it leaves empty is read once more as a binarised image. `read_page` reads a whole page
  with Tesseract's own layout analysis (the baseline benchmarks compare against it).

Pages go through the detector first (detector.py, layout.py, router.py), so every backend reads
lines, and a page's lines can go to different backends.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from atelier.kernel.errors import AtelierError, NotFound
from atelier.models.ocr.langs import NO_SPACES, language
from atelier.models.ocr.recognizer import CTCRecognizer, level_line

TESSERACT_TEXT_HEIGHT = 32
_SPECKS = "`'‘’\"“”„,.:;|_~^-"  # what noise at a line's ends reads as


def tesseract_line(image: np.ndarray, height: int = TESSERACT_TEXT_HEIGHT, margin: int = 4) -> np.ndarray:
    """A line as Tesseract reads it best: level, its text band `height` pixels high, a small margin."""
    line = level_line(image)
    scale = height / max(line.shape[0], 1)
    line = cv2.resize(line, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return cv2.copyMakeBorder(line, margin, margin, margin, margin, cv2.BORDER_REPLICATE)


def binarised(image: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    _, bw = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return cv2.cvtColor(bw, cv2.COLOR_GRAY2RGB)


def strip_specks(text: str) -> str:
    """Quote marks, backticks and the like that open or close a line without a partner inside it, and
    a lone mark before the first word or after a figure at the end ("- Если", "12%-")."""
    text = text.replace("`", "")
    text = re.sub(r"^[.,:;\-_|~'‘]+\s+(?=\w)", "", text)
    text = re.sub(r"(?<=[\d%])\s*[-_|~]+$", "", text)
    while text and text[0] in "'‘“\"„" and not any(q in text[1:] for q in "'’”\""):
        text = text[1:].lstrip()
    while text and text[-1] in "'’”\"" and not any(q in text[:-1] for q in "'‘“\"„"):
        text = text[:-1].rstrip()
    return text


def joiner(lang: str | None) -> str:
    """How words of `lang` join into a line: no spaces in Chinese and Japanese."""
    return "" if lang in NO_SPACES else " "


@dataclass
class Line:
    text: str
    confidence: float
    box: list[list[float]] | None = None
    backend: str = ""
    lang: str | None = None
    extra: dict = field(default_factory=dict)


class OCRError(AtelierError):
    pass


class PPOCR:
    """A PP-OCR recogniser as a backend: `name` is what the routing table calls it."""

    def __init__(
        self, rec: Path, charset: Path | None = None, name: str = "ppocr", threads: int | None = None, batch_size: int = 8
    ) -> None:
        self.name = name
        self.recognizer = CTCRecognizer(rec, charset, threads=threads, batch_size=batch_size, name=name)

    def preprocess_line(self, image: np.ndarray, wh_ratio: float) -> np.ndarray:
        return self.recognizer.preprocess(image, wh_ratio)

    def read_lines(self, images: list[np.ndarray], lang: str | None = None) -> list[Line]:
        return [Line(r.text, r.confidence, None, self.name, lang, {"chars": r.chars}) for r in self.recognizer.read(images)]


class Tesseract:
    """Tesseract 5 through its command line: batches of lines, `workers` processes at a time."""

    name = "tesseract"

    def __init__(self, binary: str = "tesseract", workers: int | None = None, batch_size: int = 16, timeout: float = 120.0) -> None:
        path = shutil.which(binary)
        if path is None:
            raise NotFound(
                binary, "Tesseract is not installed", "install Debian's tesseract-ocr and its language packs (`make ocr-system-deps`)"
            )
        self.binary = path
        self.workers = workers or (os.cpu_count() or 1)
        self.batch_size = batch_size
        self.timeout = timeout
        listed = subprocess.run([path, "--list-langs"], capture_output=True, text=True, check=False).stdout.split()
        self.installed = set(listed[1:] if listed and listed[0].startswith("List") else listed)

    def packs(self, lang: str | None, codes: tuple[str, ...] | None = None) -> str:
        codes = list(codes) if codes else [lang] if lang else ["en"]
        packs = [language(c).tesseract for c in codes]
        missing = [p for p in packs if p not in self.installed]
        if missing:
            raise NotFound(
                f"tesseract language pack {missing[0]}", "is not installed", f"apt-get install tesseract-ocr-{missing[0].replace('_', '-')}"
            )
        return "+".join(packs)

    def _run(self, images: list[np.ndarray], packs: str, psm: int) -> list[tuple[str, list[dict]]]:
        """(text, words) per image, from one Tesseract process."""
        with tempfile.TemporaryDirectory(prefix="atelier-tess-") as tmp:
            names = []
            for i, img in enumerate(images):
                names.append(str(Path(tmp) / f"{i:05d}.png"))
                Image.fromarray(img).save(names[-1])
            (Path(tmp) / "list.txt").write_text("\n".join(names) + "\n")
            try:
                done = subprocess.run(
                    [self.binary, str(Path(tmp) / "list.txt"), str(Path(tmp) / "out"), "-l", packs, "--psm", str(psm), "txt", "tsv"],
                    capture_output=True,
                    check=False,
                    timeout=self.timeout,
                    env={**os.environ, "OMP_THREAD_LIMIT": "1"},
                )
            except subprocess.TimeoutExpired:
                raise OCRError(
                    "tesseract", f"did not finish {len(images)} image(s) in {self.timeout:.0f} s", "split the page or lower its resolution"
                ) from None
            if done.returncode != 0:
                raise OCRError(
                    "tesseract", f"failed ({done.stderr.decode(errors='replace')[-300:].strip()})", "check the image and the language pack"
                )
            texts = (Path(tmp) / "out.txt").read_text(encoding="utf-8", errors="replace").split("\f")
            rows = list(
                csv.DictReader(
                    io.StringIO((Path(tmp) / "out.tsv").read_text(encoding="utf-8", errors="replace")),
                    delimiter="\t",
                    quoting=csv.QUOTE_NONE,
                )
            )
        words: list[list[dict]] = [[] for _ in images]
        for r in rows:
            if r.get("level") == "5" and (r.get("text") or "").strip():
                page = int(r["page_num"]) - 1
                if 0 <= page < len(images):
                    words[page].append(r)
        return [((texts[i] if i < len(texts) else "").strip(), words[i]) for i in range(len(images))]

    @staticmethod
    def _confidence(words: list[dict]) -> float:
        return float(np.mean([max(float(w["conf"]), 0.0) for w in words])) / 100.0 if words else 0.0

    def read_lines(self, images: list[np.ndarray], lang: str | None = None, packs: tuple[str, ...] | None = None) -> list[Line]:
        """`packs` (language codes) overrides `lang`'s pack."""
        if not images:
            return []
        chosen = self.packs(lang, packs)
        prepared = [tesseract_line(img) for img in images]
        results = self._batches(prepared, chosen)
        empty = [i for i, (text, _) in enumerate(results) if not text.strip()]
        if empty:  # once more, binarised: a speckled or faint line Tesseract's own thresholding lost
            for i, again in zip(empty, self._batches([binarised(prepared[i]) for i in empty], chosen)):
                results[i] = again
        return [Line(strip_specks(" ".join(text.split())), self._confidence(words), None, self.name, lang) for text, words in results]

    def _batches(self, images: list[np.ndarray], packs: str) -> list[tuple[str, list[dict]]]:
        size = max(1, min(self.batch_size, -(-len(images) // self.workers)))
        chunks = [images[i : i + size] for i in range(0, len(images), size)]
        with ThreadPoolExecutor(self.workers) as pool:
            return [r for chunk in pool.map(lambda c: self._run(c, packs, 7), chunks) for r in chunk]

    def read_page(self, image: np.ndarray, lang: str | None = None, packs: tuple[str, ...] | None = None) -> list[Line]:
        """A whole page with Tesseract's layout analysis (psm 3): its lines, in its order, with boxes."""
        text, words = self._run([image], self.packs(lang, packs), 3)[0]
        groups: dict[tuple, list[dict]] = {}
        for w in words:
            groups.setdefault((w["block_num"], w["par_num"], w["line_num"]), []).append(w)
        texts = [" ".join(t.split()) for t in text.splitlines() if t.strip()]
        lines = []
        for i, ws in enumerate(groups.values()):
            x0, y0 = min(int(w["left"]) for w in ws), min(int(w["top"]) for w in ws)
            x1 = max(int(w["left"]) + int(w["width"]) for w in ws)
            y1 = max(int(w["top"]) + int(w["height"]) for w in ws)
            line_text = texts[i] if len(texts) == len(groups) else joiner(lang).join(w["text"] for w in ws)
            lines.append(Line(line_text, self._confidence(ws), [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], self.name, lang))
        return lines
