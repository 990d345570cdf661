"""The Great Expectations suite over a labelled document set (images + labels.jsonl): every label
names an existing, decodable image and has non-empty text in a known language; every image has a
label. Failures name the file (or the labels.jsonl line) and the rule."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from atelier.models.ocr.images import IMAGE_SUFFIXES
from atelier.models.ocr.langs import LANGUAGES
from atelier.models.validation.gx_runner import run_suite

SUITE = "document-set"
LABELS = "labels.jsonl"


@dataclass
class DocumentReport:
    success: bool
    failures: list[tuple[str, str, str]]  # (file or labels line, rule, detail)
    rows: int
    report_dir: Path | None = None
    data_docs: str | None = None


def label_facts(folder: Path) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """One row per label line and per unlabelled image; malformed lines are failures at once."""
    folder = Path(folder)
    labels = folder / LABELS
    rows: list[dict] = []
    broken: list[tuple[str, str, str]] = []
    if not labels.is_file():
        return rows, [(str(labels), "labels_file", f"missing: a document set needs {LABELS} (file, lang, text per line)")]
    labelled: set[str] = set()
    for n, line in enumerate(labels.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
                raise ValueError("needs a `file` string")
        except ValueError as exc:
            broken.append((f"{LABELS}:{n}", "json", f"is not a JSON object with file, lang, text ({exc})"))
            continue
        name = rec["file"]
        path = (folder / name).resolve()
        inside = path.is_relative_to(folder.resolve())
        labelled.add(name)
        decodable = False
        if inside and path.is_file():
            try:
                with Image.open(path) as im:
                    im.verify()
                decodable = True
            except Exception:  # noqa: BLE001 - any decoder error means "not decodable"
                decodable = False
        text = rec.get("text")
        rows.append(
            {
                "file": name,
                "inside": inside,
                "exists": inside and path.is_file(),
                "decodable": decodable,
                "has_text": isinstance(text, str) and bool(text.strip()),
                "lang": str(rec.get("lang")),
                "labelled": True,
            }
        )
    for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if img.name not in labelled:
            rows.append(
                {
                    "file": img.name,
                    "inside": True,
                    "exists": True,
                    "decodable": True,
                    "has_text": True,
                    "lang": next(iter(LANGUAGES)),
                    "labelled": False,
                }
            )
    return rows, broken


DETAILS = {
    "inside": "points outside the set's folder (path tricks are refused)",
    "exists": "is named in labels.jsonl but the file is missing",
    "decodable": "cannot be decoded as an image",
    "has_text": "has an empty or missing text label",
    "lang": f"has a language code that is not one of {', '.join(LANGUAGES)}",
    "labelled": "is an image without a line in labels.jsonl",
}


def validate_document_set(
    folder: Path, report_dir: Path | None = None, docs_root: Path | None = None, label: str | None = None, run_name: str | None = None
) -> DocumentReport:
    """Check a labelled document set; with `docs_root` the run joins the workspace's Data Docs as
    data set `label`, named `run_name` (the set at its content hash)."""
    import great_expectations.expectations as gxe

    rows, failures = label_facts(folder)
    named = (
        [("count", gxe.ExpectTableRowCountToBeBetween(min_value=1))]
        + [
            (col, gxe.ExpectColumnValuesToBeInSet(column=col, value_set=[True]))
            for col in ("inside", "exists", "decodable", "has_text", "labelled")
        ]
        + [("lang", gxe.ExpectColumnValuesToBeInSet(column="lang", value_set=list(LANGUAGES)))]
    )
    df = pd.DataFrame(rows, columns=["file", "inside", "exists", "decodable", "has_text", "lang", "labelled"])
    run = run_suite(SUITE, df, named, report_dir, rows, docs_root=docs_root, asset=label or Path(folder).name, run_name=run_name)
    by_file = {r["file"]: r for r in rows}
    for rule, file in run.failed:
        if rule == "count":
            failures.append((str(folder), "count", "the set has no labelled images"))
        elif rule == "decodable" and not by_file.get(file, {}).get("exists"):
            continue  # reported as missing
        elif rule == "exists" and not by_file.get(file, {}).get("inside"):
            continue  # reported as outside
        else:
            failures.append((file, rule, DETAILS[rule]))
    return DocumentReport(run.success and not failures, failures, len(rows), Path(report_dir) if report_dir else None, run.data_docs)
