"""Build the routed OCR engine from model files and read a batch of documents.

`read_documents` never lets one bad file stop the batch: the file's row carries an `error` that
names the problem and the fix, and every other file is read.
"""

from __future__ import annotations

import json
from pathlib import Path

from atelier.errors import AtelierError, NotFound
from models.ocr.backends import PPOCR, Tesseract
from models.ocr.confidence import IsotonicMap
from models.ocr.images import load_document
from models.ocr.langs import language
from models.ocr.router import Reading, RoutedOCR, RoutingTable


def load_engine(det: Path, rec: Path, cls: Path, routing: dict, confidence: dict, review_below: float = 0.5,
                threads: int | None = None, glm_weights: Path | None = None) -> RoutedOCR:
    """`glm_weights`: the local GLM-OCR directory, needed when the routing table routes a language to
    it (the weights stay where they are; the routing table records the path they were measured at)."""
    table = RoutingTable.from_dict(routing)
    backends = {"ppocr": PPOCR(det, rec, cls, threads=threads)}
    if "tesseract" in table.routes.values():
        backends["tesseract"] = Tesseract()
    if "glm" in table.routes.values():
        from models.ocr.glm import GlmOcr

        weights = glm_weights or routing.get("glm_weights")
        if not weights:
            langs = sorted(lang for lang, b in table.routes.items() if b == "glm")
            raise NotFound("GLM-OCR weights", f"the routing table sends {', '.join(langs)} to GLM-OCR but names no weights",
                           "set ATELIER_GLM_OCR_WEIGHTS to the local GLM-OCR directory")
        backends["glm"] = GlmOcr(Path(weights))
    maps = {name: IsotonicMap.from_dict(m) for name, m in confidence.items()}
    return RoutedOCR(backends, table, maps, review_below)


def _row(path: str, reading: Reading | None, error: str = "") -> dict:
    if reading is None:
        return {"path": path, "text": "", "language": "", "backend": "", "confidence": 0.0, "flagged": True, "lines": "[]", "error": error}
    lines = [{"text": x.text, "confidence": round(x.confidence, 4), "box": x.box} for x in reading.lines]
    return {"path": path, "text": reading.text, "language": reading.language or "", "backend": reading.backend,
            "confidence": round(reading.confidence, 4), "flagged": reading.flagged, "lines": json.dumps(lines, ensure_ascii=False),
            "error": ""}


def read_documents(engine: RoutedOCR, rows: list[dict], on_progress=None) -> list[dict]:
    """rows: {path, lang (or None), kind: "line" | "page"}. Lines are batched; pages are read one by one."""
    out: list[dict | None] = [None] * len(rows)
    lines: list[tuple[int, object, str | None]] = []
    for i, r in enumerate(rows):
        try:
            if r.get("lang"):
                language(r["lang"])
            image = load_document(Path(r["path"]))
        except AtelierError as exc:
            out[i] = _row(r["path"], None, str(exc))
            continue
        if r.get("kind") == "line":
            lines.append((i, image, r.get("lang")))
        else:
            out[i] = _row(r["path"], engine.read_page(image, r.get("lang")))
            if on_progress:
                on_progress(sum(o is not None for o in out), len(rows))
    if lines:
        for (i, _, _), reading in zip(lines, engine.read_lines([img for _, img, _ in lines], [lang for _, _, lang in lines])):
            out[i] = _row(rows[i]["path"], reading)
        if on_progress:
            on_progress(len(rows), len(rows))
    return [o for o in out if o is not None]
