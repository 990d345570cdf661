"""The routed OCR engine: per language, the backend with the lowest measured CER.

The routing table is computed by the calibration flow from the evaluation split and registered with
the model. When a document's language is not given, the router looks at the script: PP-OCR reads
the line first (it is the fastest); a confident Han reading settles it as Chinese, anything else is
read again by Tesseract with the English, Russian, Korean, Japanese and Chinese packs, whose output script
decides (PP-OCR reads Cyrillic as Latin look-alikes, so its Latin readings are not trusted). Latin-script text is assigned a language by its
diacritics (ñ/¿/¡: es, ß/ä/ö/ü: de, other French accents: fr, none: en).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from models.ocr.backends import Line, joiner
from models.ocr.confidence import IsotonicMap
from models.ocr.langs import LANGUAGES, script_of

SCRIPT_LANG = {"han": "zh", "cyrillic": "ru", "hangul": "ko", "kana": "ja"}
CONFIDENT = 0.9
TIE_POINTS = 0.1  # CER points within which two backends count as equal and the faster one wins


class Backend(Protocol):
    name: str

    def read_lines(self, images: list[np.ndarray], lang: str | None = None) -> list[Line]: ...

    def read_page(self, image: np.ndarray, lang: str | None = None) -> list[Line]: ...


@dataclass
class RoutingTable:
    routes: dict[str, str]
    cer: dict[str, dict[str, float]] = field(default_factory=dict)  # backend -> lang -> CER
    speed: dict[str, float] = field(default_factory=dict)  # backend -> lines/s

    def to_dict(self) -> dict:
        return {"routes": self.routes, "cer": self.cer, "speed": self.speed}

    @classmethod
    def from_dict(cls, data: dict) -> "RoutingTable":
        return cls(dict(data["routes"]), data.get("cer", {}), data.get("speed", {}))


def choose_routes(cer: dict[str, dict[str, float]], speed: dict[str, float]) -> RoutingTable:
    routes = {}
    for lang in LANGUAGES:
        measured = [(c[lang], name) for name, c in cer.items() if lang in c]
        if not measured:
            continue
        best = min(c for c, _ in measured)
        tied = [name for c, name in measured if c - best <= TIE_POINTS / 100]
        routes[lang] = max(tied, key=lambda n: speed.get(n, 0.0))
    return RoutingTable(routes, cer, speed)


def latin_language(text: str) -> str:
    lower = text.lower()
    if any(ch in lower for ch in "ñ¿¡"):
        return "es"
    if any(ch in lower for ch in "ßäöü"):
        return "de"
    if any(ch in lower for ch in "àâçéèêëîïôûùœ"):
        return "fr"
    if any(ch in lower for ch in "áíóú"):
        return "es"
    return "en"


def guess_language(text: str) -> str | None:
    script = script_of(text)
    if script == "latin":
        return latin_language(text)
    return SCRIPT_LANG.get(script) if script else None


@dataclass
class Reading:
    text: str
    language: str | None
    backend: str
    confidence: float  # calibrated: the estimated chance that the reading is exact
    raw_confidence: float
    flagged: bool
    lines: list[Line]


class RoutedOCR:
    def __init__(self, backends: dict[str, Backend], table: RoutingTable, confidence: dict[str, IsotonicMap] | None = None,
                 review_below: float = 0.5, first_pass: str = "ppocr") -> None:
        self.backends = backends
        self.table = table
        self.confidence = confidence or {}
        self.review_below = review_below
        self.first_pass = first_pass

    def _calibrated(self, backend: str, raw: float) -> float:
        return self.confidence.get(backend, IsotonicMap.identity())(raw)

    def _reading(self, lines: list[Line], lang: str | None, backend: str) -> Reading:
        text = "\n".join(x.text.strip() for x in lines) if any(x.box for x in lines) else joiner(lang).join(x.text.strip() for x in lines)
        raw = float(np.mean([x.confidence for x in lines])) if lines else 0.0
        conf = self._calibrated(backend, raw)
        return Reading(text, lang, backend, conf, raw, conf < self.review_below, lines)

    def _detect(self, image: np.ndarray, first: Line | None, page: bool) -> str | None:
        # PP-OCR's Chinese recogniser reads Cyrillic as Latin look-alikes with high confidence, so only a
        # confident Han reading is taken at its word; everything else is settled by Tesseract's scripts
        if first is not None and first.confidence >= CONFIDENT and script_of(first.text) == "han":
            return "zh"
        tess = self.backends.get("tesseract")
        if tess is None:
            return guess_language(first.text) if first else None
        packs = ("en", "ru", "ko", "ja", "zh")
        lines = tess.read_page(image, None, packs=packs) if page else tess.read_lines([image], None, packs=packs)
        return guess_language(" ".join(x.text for x in lines)) or (guess_language(first.text) if first else None)

    def read_lines(self, images: list[np.ndarray], langs: list[str | None]) -> list[Reading]:
        """Pre-cropped lines, batched per backend."""
        langs = list(langs)
        first: list[Line | None] = [None] * len(images)
        unknown = [i for i, lang in enumerate(langs) if lang is None]
        if unknown and self.first_pass in self.backends:
            for i, line in zip(unknown, self.backends[self.first_pass].read_lines([images[i] for i in unknown])):
                first[i] = line
        for i in unknown:
            langs[i] = self._detect(images[i], first[i], page=False)
        out: list[Reading | None] = [None] * len(images)
        groups: dict[tuple[str, str | None], list[int]] = {}
        for i, lang in enumerate(langs):
            backend = self.table.routes.get(lang, self.first_pass) if lang else self.first_pass
            groups.setdefault((backend, lang), []).append(i)
        for (backend, lang), idxs in groups.items():
            reuse = [i for i in idxs if first[i] is not None and backend == self.first_pass]
            todo = [i for i in idxs if i not in reuse]
            for i in reuse:
                out[i] = self._reading([first[i]], lang, backend)
            if todo:
                for i, line in zip(todo, self.backends[backend].read_lines([images[i] for i in todo], lang)):
                    out[i] = self._reading([line], lang, backend)
        return [r for r in out if r is not None]

    def read_page(self, image: np.ndarray, lang: str | None) -> Reading:
        if lang is None:
            first = self.backends[self.first_pass].read_page(image) if self.first_pass in self.backends else []
            merged = Line(" ".join(x.text for x in first), float(np.mean([x.confidence for x in first])) if first else 0.0)
            lang = self._detect(image, merged if first else None, page=True)
        backend = self.table.routes.get(lang, self.first_pass) if lang else self.first_pass
        return self._reading(self.backends[backend].read_page(image, lang), lang, backend)
