"""The routed OCR engine: every document becomes text lines; each line goes, by its language, to the
backend with the lowest measured CER for that language (the routing table, made by the calibration
flow on the evaluation split and registered with the model).

    pages -> detector -> lines in reading order --+
    pre-cut lines --------------------------------+-> first pass (one batched recogniser for all lines)
        -> language (given, or langid.py from the first reading; a page votes for its lines)
        -> the language's backend (the first reading is kept when that is the first pass itself)
        -> the language's spelling conventions (normalize.py) -> calibrated confidence

Lines of all the documents in one call are batched together, so a folder is read with each model
loaded once and each batch full. A line whose script the first pass settles is never read twice by
neural models; Korean and Russian lines are read by their backend (Tesseract) once.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from atelier.models.ocr.backends import Line, joiner
from atelier.models.ocr.confidence import IsotonicMap
from atelier.models.ocr.langid import NO_SCRIPT, PROBE_CUTS, compatible, from_probe, is_blank, language_of_text, letters, page_language
from atelier.models.ocr.langs import LANGUAGES, script_of, script_of_char
from atelier.models.ocr.layout import reading_order
from atelier.models.ocr.normalize import normalize

LINE_ASPECT, LINE_HEIGHT = 4.0, 160  # an image at least this wide for its height, and no higher, is one line
LATIN = ("en", "fr", "es", "de")
FULL = 1.6  # characters per unit of width over height in a line of figures read whole (a Korean one loses its Hangul)
INK = 24  # grey levels between a page's lightest and darkest pixels (0.1%/99.9%) below which it holds no ink
TIE_POINTS = 1.0  # CER points within which backends count as equal for a language (see choose_routes)
# Cyrillic read as Latin look-alikes: the first pass reads italic, bold or capital Russian fluently as
# Latin ("Поливайте рассаду" -> "Ilonueame paccady") but unsure of it (median 0.84 on the hard set,
# where 95% of real Latin lines read at 0.96 or more). Lines under this confidence are read once more
# by Tesseract with Russian and English together; one that comes back mostly Cyrillic is Russian.
LOOKALIKE_CONFIDENCE = 0.93
KOREAN_SURE = 0.5  # Tesseract's confidence in a probed line's Hangul under which the first pass's full reading stands
SCRIPT_SHARE, SCRIPT_SURE = 0.7, 0.5  # how much of Tesseract's reading must be in the script it was asked about, and how sure
RUBLES = re.compile(r"\d\s*py[6б]?\.")  # "руб." after a sum, read in look-alikes: a Russian line however sure the reading
SECOND_LANGUAGE = 0.25  # a probed line keeps its own language where that holds this share of its page (a bilingual page)
SCRIPT_PACKS = {"ru": "cyrillic", "ko": "hangul"}  # the languages the first pass cannot read, by their script


class Backend(Protocol):
    name: str

    def read_lines(self, images: list[np.ndarray], lang: str | None = None) -> list[Line]: ...


@dataclass
class RoutingTable:
    routes: dict[str, str]  # language -> backend
    cer: dict[str, dict[str, float]] = field(default_factory=dict)  # backend -> lang -> CER
    speed: dict[str, float] = field(default_factory=dict)  # backend -> lines/s
    first_pass: str = "ppocr"
    probes: tuple[str, ...] = ("ppocrv6t", "ppocrv5")  # asked in turn about lines the first pass leaves blank

    def to_dict(self) -> dict:
        return {"routes": self.routes, "cer": self.cer, "speed": self.speed, "first_pass": self.first_pass, "probes": list(self.probes)}

    @classmethod
    def from_dict(cls, data: dict) -> "RoutingTable":
        return cls(
            dict(data["routes"]),
            data.get("cer", {}),
            data.get("speed", {}),
            data.get("first_pass", "ppocr"),
            tuple(data.get("probes", ("ppocrv6t", "ppocrv5"))),
        )


def choose_routes(
    cer: dict[str, dict[str, float]],
    speed: dict[str, float],
    first_pass: str = "ppocr",
    probes: tuple[str, ...] = ("ppocrv6t", "ppocrv5"),
    tie_points: float = TIE_POINTS,
) -> RoutingTable:
    """Per language, among the backends whose CER is within `tie_points` of the best one's, the first
    pass (its reading of a line is already there, so another backend would read the line a second
    time), else the fastest."""
    routes = {}
    for lang in LANGUAGES:
        measured = [(c[lang], name) for name, c in cer.items() if lang in c]
        if not measured:
            continue
        best = min(c for c, _ in measured)
        tied = [name for c, name in measured if c - best <= tie_points / 100]
        routes[lang] = first_pass if first_pass in tied else max(tied, key=lambda n: speed.get(n, 0.0))
    return RoutingTable(routes, cer, speed, first_pass, tuple(probes))


@dataclass
class Request:
    image: np.ndarray
    kind: str = "page"  # "line": a pre-cut text line; "page": anything else
    lang: str | None = None  # given by the user, or None: the router decides


@dataclass
class Reading:
    text: str
    language: str | None
    backend: str  # the backend of most of its text; lines carry their own
    confidence: float  # calibrated: the estimated chance that the reading is exact
    raw_confidence: float
    flagged: bool
    lines: list[Line]


@dataclass
class Pending:
    """A batch between `RoutedOCR.start` and `finish`."""

    documents: int
    pieces: list
    futures: list


@dataclass
class _Piece:
    doc: int
    line: int  # index of the text line in its document (reading order)
    image: np.ndarray
    box: list[list[float]] | None
    lang: str | None = None
    first: Line | None = None
    final: Line | None = None
    probed: bool = False
    figures: bool = False  # the probes read no letters either: the first pass's reading stands
    checked: bool = False  # read by Tesseract for Cyrillic look-alikes (_lookalikes)
    cell: tuple[int, int] | None = None  # (row, column) of a table's cell (layout.py)


class RoutedOCR:
    def __init__(
        self,
        backends: dict[str, Backend],
        table: RoutingTable,
        detector=None,
        confidence: dict[str, IsotonicMap] | None = None,
        review_below: float = 0.5,
    ) -> None:
        self.backends = backends
        self.table = table
        self.detector = detector
        self.confidence = confidence or {}
        self.review_below = review_below
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="atelier-ocr")  # one batch's slow backends at a time

    # -- the pipeline -----------------------------------------------------------------------------
    def read(self, requests: list[Request]) -> list[Reading]:
        return self.finish(self.start(requests))

    def start(self, requests: list[Request]) -> "Pending":
        """Cut, identify, and set the backends other than the first pass reading in the background:
        a caller with more documents starts the next batch's neural work meanwhile (both cores stay
        busy while Tesseract's processes run). `finish` gathers the readings."""
        pieces = self._cut(requests)
        self._identify(requests, pieces)
        groups: dict[tuple[str, str | None], list[_Piece]] = {}
        for p in pieces:
            if p.final is not None:  # a blank page: read already (as nothing)
                continue
            backend = self._route(p.lang)
            if p.first is not None and backend == self.table.first_pass:
                p.final = p.first  # the first pass was this language's backend: read once
            else:
                groups.setdefault((backend, p.lang), []).append(p)
        futures = [
            (group, self._pool.submit(self.backends[backend].read_lines, [p.image for p in group], lang))
            for (backend, lang), group in groups.items()
        ]
        return Pending(len(requests), pieces, futures)

    def finish(self, pending: "Pending") -> list[Reading]:
        for group, future in pending.futures:
            for p, line in zip(group, future.result()):
                p.final = line
                if p.first is None or not p.first.text.strip():
                    continue
                # a backend that reads nothing where the first pass read something, or a probed "Korean"
                # line that the first pass read in full (a Japanese total, 合計 read unsure) and in which
                # Tesseract finds no Hangul, or only unsure of it: the first reading stands
                doubt = script_of(line.text) != "hangul" or line.confidence < KOREAN_SURE
                full = sum(not ch.isspace() for ch in p.first.text) >= 3
                if not line.text.strip() or (p.lang == "ko" and p.probed and full and doubt):
                    p.final, p.lang = p.first, language_of_text(p.first.text)
        return [self._assemble(d, [p for p in pending.pieces if p.doc == d]) for d in range(pending.documents)]

    def read_lines(self, images: list[np.ndarray], langs: list[str | None]) -> list[Reading]:
        return self.read([Request(img, "line", lang) for img, lang in zip(images, langs)])

    def read_page(self, image: np.ndarray, lang: str | None = None) -> Reading:
        return self.read([Request(image, "page", lang)])[0]

    def _cut(self, requests: list[Request]) -> list[_Piece]:
        """Pages into their lines; an image shaped like one line of text, or a page on which the
        detector finds nothing, is read as a line, unless the page holds no ink at all (a blank scan,
        an empty video frame): that reads as nothing, not as whatever a recogniser makes of paper
        (Tesseract read a blank page as "0")."""
        pieces: list[_Piece] = []
        for d, req in enumerate(requests):
            h, w = req.image.shape[:2]
            if req.kind != "line" and self.detector is not None and not (w >= LINE_ASPECT * h and h <= LINE_HEIGHT):
                lines = reading_order(self.detector.detect(req.image, self._reads_better_turned))
                if lines:
                    for i, line in enumerate(lines):
                        pieces.extend(_Piece(d, i, box.image, box.page_corners, req.lang, cell=box.cell) for box in line)
                    continue
                if _inkless(req.image):
                    nothing = Line("", 1.0, None, self.table.first_pass, req.lang, {"blank_page": True})
                    pieces.append(_Piece(d, 0, req.image, None, req.lang, final=nothing))
                    continue
                req.kind = "line"
            pieces.append(_Piece(d, 0, req.image, None, req.lang))
        return pieces

    def _reads_better_turned(self, boxes, sample: int = 4) -> bool:
        """Whether the page's longest lines read better upside down: by the first pass where it sees
        letters either way, else by Tesseract's confidence with the packs of the scripts it lacks."""
        lines = sorted(boxes, key=lambda b: -b.image.shape[1])[:sample]
        upright = [b.image for b in lines]
        turned = [np.ascontiguousarray(img[::-1, ::-1]) for img in upright]

        def score(readings: list[Line]) -> float:
            return float(sum(letters(r.text) * r.confidence for r in readings))

        first = self.backends.get(self.table.first_pass)
        if first is not None:
            a, b = score(first.read_lines(upright)), score(first.read_lines(turned))
            if max(a, b) >= sum(img.shape[1] / max(img.shape[0], 1) for img in upright) * 0.5:
                return b > 1.2 * a
        tess = self.backends.get("tesseract")
        if tess is None:
            return False
        packs = tuple(lang for lang in ("ko", "ru") if self.table.routes.get(lang) == "tesseract") or ("en",)
        a = np.mean([r.confidence for r in tess.read_lines(upright, None, packs=packs)])
        b = np.mean([r.confidence for r in tess.read_lines(turned, None, packs=packs)])
        return bool(b > a + 0.15)

    def _identify(self, requests: list[Request], pieces: list[_Piece]) -> None:
        """Language of every piece without one: first pass, then the probe for blank readings, then
        each page's majority for its lines of a compatible script. A page whose longest lines are all
        blank to the first pass (Korean, Russian) is settled from those lines alone: its other lines
        go straight to the page language's backend."""
        unknown = [p for p in pieces if p.lang is None and p.final is None]
        first = self.backends.get(self.table.first_pass)
        if not unknown or first is None:
            return
        settled = self._settle_blank_pages(requests, unknown)
        todo = [p for p in unknown if p.lang is None and p.first is None]
        for p, line in zip(todo, first.read_lines([p.image for p in todo])):
            p.first = line
        self._probe([p for p in unknown if p.lang is None and p.first is not None and _blank(p)])
        for p in unknown:
            if p.lang is None and p.first is not None and not p.figures:
                p.lang = language_of_text(p.first.text)
        self._lookalikes(requests, unknown)
        votes: dict[int, str | None] = {}
        second: list[_Piece] = []
        for d, req in enumerate(requests):
            mine = [p for p in unknown if p.doc == d]
            if req.kind != "page" or not mine or d in settled:
                continue
            weights = [(p.lang, (letters(p.first.text) if p.first else 0) or int(_aspect(p))) for p in mine]
            votes[d] = vote = page_language(weights)
            # a language's share of the page by the room its lines take (Hangul is one letter a square, Latin two)
            room = [(p.lang, _aspect(p)) for p in mine if p.lang]
            total = sum(a for _, a in room) or 1.0
            share = {lang: sum(a for g, a in room if g == lang) / total for lang, _ in room}
            for p in mine:
                han_page = p.lang == "ko" and vote in ("zh", "ja")  # Han read unsure: degraded Chinese, not Korean
                if p.probed and p.lang in SCRIPT_PACKS and p.lang != vote and share.get(p.lang, 0) >= SECOND_LANGUAGE and not han_page:
                    second.append(p)  # perhaps a bilingual page's second language: Tesseract is asked below
        confirmed = self._confirm(second)
        for d, vote in votes.items():
            for p in unknown:
                if p.doc == d and id(p) not in confirmed and vote and compatible(p.lang, vote, p.probed):
                    p.lang = vote

    def _confirm(self, pieces: list[_Piece]) -> set[int]:
        """Of probed lines that would keep a language other than their page's (a bilingual page's
        Korean or Russian), those Tesseract reads, with that language's pack and English, mostly in
        its script and with confidence. A blurred Spanish page's lines probe as "Russian" too: Tesseract
        reads them half Latin, and they take their page's language."""
        tess = self.backends.get("tesseract")
        kept: set[int] = set()
        if tess is None:
            return kept
        for lang, script in SCRIPT_PACKS.items():
            todo = [p for p in pieces if p.lang == lang]
            if not todo:
                continue
            for p, line in zip(todo, tess.read_lines([p.image for p in todo], None, packs=(lang, "en"))):
                if _in_script(line, script, 2):
                    kept.add(id(p))
        return kept

    def _lookalikes(self, requests: list[Request], pieces: list[_Piece]) -> None:
        """Russian lines the first pass read as Latin look-alikes: those it was unsure of are read by
        Tesseract (Russian + English); a page where they turn out Russian has its other Latin lines
        checked too (a confident "Hmozo" is "Итого" on a Russian receipt)."""
        tess = self.backends.get("tesseract")
        if tess is None or self._route("ru") != "tesseract":
            return

        def latin(p: _Piece) -> bool:
            return p.lang in LATIN and p.first is not None and letters(p.first.text) >= 3

        def check(todo: list[_Piece]) -> None:
            for p, line in zip(todo, tess.read_lines([p.image for p in todo], None, packs=("ru", "en"))):
                p.checked = True
                # a garbled reading of a faint line is short (figures take room without letters)
                if _in_script(line, "cyrillic", max(3.0, min(_aspect(p), letters(p.first.text)))):
                    p.lang, p.probed = "ru", False

        check([p for p in pieces if latin(p) and (p.first.confidence < LOOKALIKE_CONFIDENCE or RUBLES.search(p.first.text))])
        russian_pages = {
            d
            for d in {p.doc for p in pieces if p.checked}
            if requests[d].kind == "page"
            and sum(p.lang == "ru" for p in pieces if p.doc == d and p.checked) >= 0.5 * sum(p.checked for p in pieces if p.doc == d)
        }
        check([p for p in pieces if p.doc in russian_pages and latin(p) and not p.checked])

    def _probe(self, blank: list[_Piece]) -> None:
        """Korean or Russian, for lines the first pass left blank: each probe settles what it can and
        hands the rest to the next; the last one's undecided lines are Korean."""
        todo = blank
        for name in self.table.probes:
            probe = self.backends.get(name)
            if not todo or probe is None:
                continue
            for p, line in zip(todo, probe.read_lines([p.image for p in todo])):
                found = from_probe(line.text, _aspect(p), PROBE_CUTS.get(name, (0.8, 0.8)))
                read = sum(not ch.isspace() for ch in p.first.text)
                if found == NO_SCRIPT and (letters(p.first.text) or read < FULL * _aspect(p)):
                    found = None  # figures, but the first pass saw shapes beside them, or read too little for the line
                if found == NO_SCRIPT:  # figures: the first pass's reading stands, in no language
                    p.lang, p.probed = None, False
                    p.figures = True
                elif found is not None:
                    p.lang, p.probed = found, True
            todo = [p for p in todo if p.lang is None and not p.figures]
        for p in todo:
            p.lang, p.probed = "ko", True

    def _settle_blank_pages(self, requests: list[Request], unknown: list[_Piece], sample: int = 3) -> set[int]:
        """Pages whose `sample` longest lines the first pass leaves blank: those lines are probed, the
        page takes their majority, and every line of it that language."""
        first = self.backends[self.table.first_pass]
        pages = [d for d, req in enumerate(requests) if req.kind == "page"]
        samples = {d: sorted((p for p in unknown if p.doc == d), key=lambda p: -p.image.shape[1])[:sample] for d in pages}
        probed_first = [p for d in pages for p in samples[d]]
        for p, line in zip(probed_first, first.read_lines([p.image for p in probed_first])):
            p.first = line
        settled = set()
        for d in pages:
            lines = samples[d]
            if len(lines) < 2 or not all(_blank(p) for p in lines):
                continue
            self._probe(lines)
            vote = page_language([(p.lang, int(_aspect(p))) for p in lines])
            for p in unknown:
                if p.doc == d:
                    p.lang, p.probed = vote, True
            settled.add(d)
        return settled

    def _route(self, lang: str | None) -> str:
        name = self.table.routes.get(lang, self.table.first_pass) if lang else self.table.first_pass
        return name if name in self.backends else self.table.first_pass

    # -- the result ---------------------------------------------------------------------------------
    def _calibrated(self, backend: str, raw: float) -> float:
        return self.confidence.get(backend, IsotonicMap.identity())(raw)

    def _assemble(self, doc: int, pieces: list[_Piece]) -> Reading:
        by_line: dict[int, list[_Piece]] = {}
        for p in pieces:
            by_line.setdefault(p.line, []).append(p)
        lines: list[Line] = []
        for _, group in sorted(by_line.items()):
            lang = group[0].lang
            text = normalize(joiner(lang).join(p.final.text.strip() for p in group if p.final.text.strip()), lang)
            raw = float(np.mean([p.final.confidence for p in group]))
            backend = group[0].final.backend
            corners = [c for p in group if p.box for c in p.box]
            box = (group[0].box if len(group) == 1 else _enclosing(corners)) if corners else None
            extra: dict = {"raw_confidence": raw}
            if any(p.cell for p in group):  # a table's row: its cells, each with its column
                extra["cells"] = [
                    {"row": p.cell[0], "column": p.cell[1], "text": normalize(p.final.text.strip(), lang)} for p in group if p.cell
                ]
            lines.append(Line(text, self._calibrated(backend, raw), box, backend, lang, extra))
        langs = [ln.lang for ln in lines if ln.text]
        language = max(set(langs), key=langs.count) if langs else (pieces[0].lang if pieces else None)
        backends = [ln.backend for ln in lines if ln.text] or [ln.backend for ln in lines]
        backend = max(set(backends), key=backends.count) if backends else ""
        weights = [max(len(ln.text), 1) for ln in lines]
        conf = float(np.average([ln.confidence for ln in lines], weights=weights)) if lines else 0.0
        raw = float(np.average([ln.extra["raw_confidence"] for ln in lines], weights=weights)) if lines else 0.0
        text = "\n".join(ln.text for ln in lines if ln.text)
        return Reading(text, language, backend, conf, raw, conf < self.review_below, lines)


def _in_script(line: Line, script: str, at_least: float) -> bool:
    """Tesseract's reading of a line is in `script`: at least `at_least` of its letters, most of them
    (a blurred Spanish line comes back half Latin, half Cyrillic), read with some confidence."""
    count = sum(script_of_char(ch) == script for ch in line.text)
    return count >= at_least and count >= SCRIPT_SHARE * letters(line.text) and line.confidence >= SCRIPT_SURE


def _inkless(image: np.ndarray) -> bool:
    grey = image[::4, ::4].mean(axis=2) if image.ndim == 3 else image[::4, ::4]
    low, high = np.percentile(grey, [0.1, 99.9])
    return bool(high - low < INK)


def _blank(piece: _Piece) -> bool:
    return is_blank(piece.first.text, _aspect(piece), piece.first.extra.get("chars"))


def _aspect(piece: _Piece) -> float:
    return piece.image.shape[1] / max(piece.image.shape[0], 1)


def _enclosing(corners: list[list[float]]) -> list[list[float]]:
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    return [[round(x0, 1), round(y0, 1)], [round(x1, 1), round(y0, 1)], [round(x1, 1), round(y1, 1)], [round(x0, 1), round(y1, 1)]]
