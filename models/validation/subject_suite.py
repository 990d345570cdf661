"""The Great Expectations suite over a subject image set, with a report that names each bad file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from atelier.kernel.settings import ImageRules
from atelier.models.photos import candidate_files
from atelier.models.validation.gx_runner import run_suite
from atelier.models.validation.image_facts import inspect_images

SUITE = "subject-images"


@dataclass
class ValidationReport:
    success: bool
    failures: list[tuple[str, str, str]]  # (file, rule, detail)
    facts: list[dict]
    report_dir: Path | None = None
    data_docs: str | None = None
    rules: dict = field(default_factory=dict)


def _expectations(rules: ImageRules) -> list[tuple[str, object]]:
    import great_expectations.expectations as gxe

    return [
        ("count", gxe.ExpectTableRowCountToBeBetween(min_value=rules.min_count, max_value=rules.max_count)),
        ("decodable", gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True])),
        ("rgb_convertible", gxe.ExpectColumnValuesToBeInSet(column="rgb_convertible", value_set=[True])),
        ("format", gxe.ExpectColumnValuesToBeInSet(column="format", value_set=list(rules.formats))),
        ("min_side", gxe.ExpectColumnValuesToBeBetween(column="min_side", min_value=rules.min_side)),
        ("exact_duplicate", gxe.ExpectColumnValuesToBeNull(column="duplicate_of")),
        ("near_duplicate", gxe.ExpectColumnValuesToBeNull(column="near_duplicate_of")),
    ]


def _detail(rule: str, row: dict, rules: ImageRules) -> str:
    return {
        "decodable": f"cannot be decoded as an image ({row.get('error') or 'unknown error'})",
        "rgb_convertible": "cannot be converted to RGB",
        "format": f"format {row.get('format')} is not one of {', '.join(rules.formats)}",
        "min_side": f"shortest side {row.get('min_side')} px is under {rules.min_side} px",
        "exact_duplicate": f"is a byte-identical copy of {row.get('duplicate_of')}",
        "near_duplicate": f"looks the same as {row.get('near_duplicate_of')} (dHash distance {row.get('near_duplicate_bits')})",
    }.get(rule, rule)


def validate_subject_images(
    folder: Path,
    rules: ImageRules,
    report_dir: Path | None = None,
    files: list[Path] | None = None,
    label: str | None = None,
    docs_root: Path | None = None,
    run_name: str | None = None,
) -> ValidationReport:
    """Check every file in `folder` (or the given files) against the suite; `label` names the set in
    messages (the subject, not a temporary folder) and in the Data Docs of `docs_root` (the
    workspace's one site), where the run is called `run_name` (the subject at its data revision)."""
    files = files if files is not None else candidate_files(folder)
    facts = inspect_images(files, rules.near_duplicate_bits)
    columns = (
        list(facts[0].keys())
        if facts
        else ["file", "decodable", "rgb_convertible", "format", "min_side", "duplicate_of", "near_duplicate_of"]
    )
    df = pd.DataFrame(facts, columns=columns).astype({"duplicate_of": object, "near_duplicate_of": object})
    run = run_suite(
        SUITE, df, _expectations(rules), report_dir, facts, docs_root=docs_root, asset=label or Path(folder).name, run_name=run_name
    )
    by_file = {row["file"]: row for row in facts}
    failures: list[tuple[str, str, str]] = []
    for rule, file in run.failed:
        if rule == "count":
            failures.append(
                (label or Path(folder).name, "count", f"{len(facts)} image(s); a subject needs {rules.min_count} to {rules.max_count}")
            )
        elif rule == "rgb_convertible" and not by_file.get(file, {}).get("decodable"):
            continue  # already reported as not decodable
        else:
            failures.append((file, rule, _detail(rule, by_file.get(file, {}), rules)))
    return ValidationReport(run.success, failures, facts, Path(report_dir) if report_dir else None, run.data_docs, rules.model_dump())
