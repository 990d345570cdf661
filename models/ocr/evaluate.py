"""Evaluate a backend (or the routed engine) on a labelled document set: CER per language, lines/s."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atelier.models.ocr.images import load_document
from atelier.models.ocr.metrics import cer_counts, summarise
from atelier.models.ocr.render import read_labels


@dataclass
class Evaluation:
    summary: dict  # language -> {cer, lines, exact}, plus "overall"
    lines_per_s: float
    rows: list[dict]  # file, lang, text, predicted, confidence, exact


def load_set(folder: Path, kinds: tuple[str, ...] = ("line",), langs: tuple[str, ...] | None = None) -> tuple[list[dict], list[np.ndarray]]:
    records = [r for r in read_labels(folder) if r.get("kind", "line") in kinds and (langs is None or r["lang"] in langs)]
    return records, [load_document(Path(folder) / r["file"], kind="page" if r.get("kind") == "page" else "line") for r in records]


def evaluate_lines(read, records: list[dict], images: list[np.ndarray], by_language: bool = True) -> Evaluation:
    """`read(images, lang)` -> objects with .text and .confidence. With `by_language` each language's
    lines go in one call with their language given (as a user who knows it would); else lang=None."""
    groups: dict[str | None, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r["lang"] if by_language else None, []).append(i)
    predicted: list = [None] * len(records)
    t0 = time.perf_counter()
    for lang, idxs in groups.items():
        for i, out in zip(idxs, read([images[i] for i in idxs], lang)):
            predicted[i] = out
    seconds = time.perf_counter() - t0
    rows = []
    for r, p in zip(records, predicted):
        edits, _ = cer_counts(p.text, r["text"], r["lang"])
        rows.append(
            {
                "file": r["file"],
                "lang": r["lang"],
                "text": r["text"],
                "predicted": p.text,
                "confidence": float(p.confidence),
                "exact": edits == 0,
            }
        )
    return Evaluation(summarise(rows), len(records) / max(seconds, 1e-9), rows)
