"""Build the routed OCR engine from its files and read batches of documents.

An engine spec (`routing.json` of a registered model) names its recognisers by artifact: for each,
its variants (fp32, int8, ...), its dictionary and the variant to serve with the CPU it was chosen on
(variants.py); the detector and the angle classifier; the routing table. `load_engine` builds it,
re-checking the served variant when this CPU differs from the one it was measured on.

`read_documents` never lets one bad file stop the batch: the file's row carries an `error` that
names the problem and the fix, and every other file is read. Documents are read in chunks, each one
call of the router, so lines of many files share batches while memory stays bounded.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable

from atelier.kernel.errors import AtelierError, NotFound
from atelier.models.ocr.backends import PPOCR, Tesseract
from atelier.models.ocr.confidence import IsotonicMap
from atelier.models.ocr.detector import LineDetector
from atelier.models.ocr.images import load_document
from atelier.models.ocr.langs import language
from atelier.models.ocr.router import Reading, Request, RoutedOCR, RoutingTable
from atelier.models.ocr.variants import choose, cpu_signature, measure

CHUNK = 32  # documents per router call
CHUNK_PIXELS = 48_000_000  # and at most about this many pixels (two calls are in flight): memory stays bounded


def serving_variant(spec: dict, files: dict[str, Path], threads: int | None = None, log: Callable[[str], None] = lambda _m: None) -> str:
    """The variant of one recogniser to serve here: the recorded one on the CPU it was measured on,
    else the winner of a quick measurement by the same rule."""
    variants = spec["variants"]
    if len(variants) == 1 or spec.get("cpu") == cpu_signature():
        return spec.get("serve") or next(iter(variants))
    readers = {v: PPOCR(files[a], files.get(spec.get("charset", "")), name=v, threads=threads).read_lines for v, a in variants.items()}
    speeds = measure(readers)
    chosen = choose(speeds, spec.get("min_speedup", 1.1))
    log(
        f"CPU differs from the one the OCR model was measured on ({spec.get('cpu')!r}); measured here: "
        + ", ".join(f"{k} {v:.0f} lines/s" for k, v in speeds.items())
        + f"; serving {chosen}"
    )
    return chosen


def load_engine(
    files: dict[str, Path],
    spec: dict,
    confidence: dict,
    review_below: float = 0.5,
    threads: int | None = None,
    glm_weights: Path | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> RoutedOCR:
    """`files`: artifact name -> path; `spec`: the engine spec (see the module's doc)."""
    table = RoutingTable.from_dict(spec)
    backends: dict = {}
    for name, rec in spec["recognisers"].items():
        variant = serving_variant(rec, files, threads, log)
        backends[name] = PPOCR(files[rec["variants"][variant]], files.get(rec.get("charset", "")), name=name, threads=threads)
    if "tesseract" in table.routes.values():
        backends["tesseract"] = Tesseract()
    if "glm" in table.routes.values():
        from atelier.models.ocr.glm import GlmOcr

        weights = glm_weights or spec.get("glm_weights")
        if not weights:
            langs = sorted(lang for lang, b in table.routes.items() if b == "glm")
            raise NotFound(
                "GLM-OCR weights",
                f"the routing table sends {', '.join(langs)} to GLM-OCR but names no weights",
                "set ATELIER_GLM_OCR_WEIGHTS to the local GLM-OCR directory",
            )
        backends["glm"] = GlmOcr(Path(weights))
    detector = LineDetector(files[spec["detector"]], files.get(spec.get("classifier", "")), threads=threads)
    maps = {name: IsotonicMap.from_dict(m) for name, m in confidence.items()}
    return RoutedOCR(backends, table, detector, maps, review_below)


def shipped_engine_files(routes: dict[str, str]) -> tuple[dict[str, Path], dict]:
    """(files, spec) of an engine made of the shipped models as they are (fp32, no calibration): what
    the calibration flow starts from, and what benchmarks and tests compare against."""
    from atelier.models.ocr.shipped import shipped

    files: dict[str, Path] = {}
    for key, name in (
        ("rec", "ppocrv6s-rec"),
        ("ppocrv6t", "ppocrv6t-rec"),
        ("ppocrv5", "ppocrv5-rec"),
        ("det", "ppocrv5-det"),
        ("cls", "cls"),
    ):
        model, charset = shipped(name)
        files[key] = model
        if charset:
            files[f"{key}_charset"] = charset
    spec = {
        "routes": dict(routes),
        "first_pass": "ppocr",
        "probes": ["ppocrv6t", "ppocrv5"],
        "detector": "det",
        "classifier": "cls",
        "recognisers": {
            "ppocr": {"variants": {"fp32": "rec"}, "charset": "rec_charset"},
            "ppocrv6t": {"variants": {"fp32": "ppocrv6t"}, "charset": "ppocrv6t_charset"},
            "ppocrv5": {"variants": {"fp32": "ppocrv5"}, "charset": "ppocrv5_charset"},
        },
    }
    return files, spec


def _row(path: str, reading: Reading | None, error: str = "") -> dict:
    if reading is None:
        return {"path": path, "text": "", "language": "", "backend": "", "confidence": 0.0, "flagged": True, "lines": "[]", "error": error}
    lines = [
        {"text": x.text, "confidence": round(x.confidence, 4), "box": x.box, "language": x.lang or "", "backend": x.backend}
        | ({"cells": x.extra["cells"]} if x.extra.get("cells") else {})
        for x in reading.lines
    ]
    return {
        "path": path,
        "text": reading.text,
        "language": reading.language or "",
        "backend": reading.backend,
        "confidence": round(reading.confidence, 4),
        "flagged": reading.flagged,
        "lines": json.dumps(lines, ensure_ascii=False),
        "error": "",
    }


def _start(engine: RoutedOCR, requests: list[Request]):
    return engine.start(requests) if requests else None


def _finish(engine: RoutedOCR, pending, requests: list[Request], paths: list[str]) -> list[dict]:
    """The chunk's readings; if a backend failed on it, each document alone, so the failure is the
    row of the document that caused it."""
    if not requests:
        return []
    try:
        return [_row(p, r) for p, r in zip(paths, engine.finish(pending))]
    except Exception:  # noqa: BLE001 (an AtelierError, or ONNX Runtime failing on one input: found below, one by one)
        pass
    return _one_by_one(engine, requests, paths)


def _one_by_one(engine: RoutedOCR, requests: list[Request], paths: list[str]) -> list[dict]:
    rows = []
    for request, path in zip(requests, paths):
        try:
            rows.append(_row(path, engine.read([request])[0]))
        except AtelierError as exc:
            rows.append(_row(path, None, str(exc)))
        except Exception as exc:  # noqa: BLE001 (a backend's own failure on this file: its row says so, the rest is read)
            problem = f"the OCR engine failed on it ({exc.__class__.__name__}: {' '.join(str(exc).split())[:200]})"
            rows.append(
                _row(path, None, f"{path}: {problem}. Fix: check the image (size, content) or leave it out; the other files were read")
            )
    return rows


def read_documents(
    engine: RoutedOCR,
    rows: list[dict],
    on_progress: Callable[[int, int], None] | None = None,
    chunk: int = CHUNK,
    pixels: int = CHUNK_PIXELS,
) -> list[dict]:
    """rows: {path, lang (or None), kind: "line" | "page"} -> one result row each, in order. While one
    chunk's Tesseract lines are read, the next chunk is loaded, detected and read by the first pass."""
    out: list[dict] = []
    previous = None
    for loaded in itertools.chain(_parts(rows, chunk, pixels), [None]):
        current = None
        if loaded is not None:
            part, results, requests, where = loaded
            try:
                pending, error = _start(engine, requests), None
            except Exception as exc:  # noqa: BLE001 (a backend failed while cutting or identifying: sorted out one by one below)
                pending, error = None, exc
            current = (part, results, requests, where, pending, error)
        if previous is not None:
            out.extend(_collect(engine, *previous))
            if on_progress:
                on_progress(len(out), len(rows))
        previous = current
    return out


def _parts(rows: list[dict], chunk: int, pixels: int):
    """Consecutive runs of `rows`, loaded: at most `chunk` documents and about `pixels` pixels each, so a
    folder of large scans holds two runs in memory, not `chunk` 40-megapixel pages."""
    part: list[dict] = []
    results: list[dict | None] = []
    requests: list[Request] = []
    where: list[int] = []
    held = 0
    for r in rows:
        part.append(r)
        results.append(None)
        try:
            if r.get("lang"):
                language(r["lang"])
            kind = "line" if r.get("kind") == "line" else "page"
            image = load_document(Path(r["path"]), kind=kind)
            requests.append(Request(image, kind, r.get("lang") or None))
            where.append(len(part) - 1)
            held += image.shape[0] * image.shape[1]
        except AtelierError as exc:
            results[-1] = _row(str(r["path"]), None, str(exc))
        if len(part) >= chunk or held >= pixels:
            yield part, results, requests, where
            part, results, requests, where, held = [], [], [], [], 0
    if part:
        yield part, results, requests, where


def _collect(engine: RoutedOCR, part, results, requests, where, pending, error) -> list[dict]:
    paths = [str(part[i]["path"]) for i in where]
    done = _one_by_one(engine, requests, paths) if error is not None else _finish(engine, pending, requests, paths)
    for i, row in zip(where, done):
        results[i] = row
    return results  # type: ignore[return-value]
