"""The Great Expectations suite over a subject image set, with a report that names each bad file.

A file-backed GX context under the report directory keeps the suite, the validation result JSON and
the Data Docs HTML together, so a failed run leaves something a person can open.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from atelier.settings import ImageRules
from atelier.storage import write_json_atomic
from models.validation.image_facts import inspect_images

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


def validate_subject_images(folder: Path, rules: ImageRules, report_dir: Path | None = None,
                            files: list[Path] | None = None) -> ValidationReport:
    """Check every file in `folder` (or the given files) against the suite."""
    import great_expectations as gx

    files = files if files is not None else sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    facts = inspect_images(files, rules.near_duplicate_bits)
    columns = list(facts[0].keys()) if facts else ["file", "decodable", "rgb_convertible", "format", "min_side", "duplicate_of", "near_duplicate_of"]
    df = pd.DataFrame(facts, columns=columns).astype({"duplicate_of": object, "near_duplicate_of": object})

    if report_dir is not None:
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        context = gx.get_context(mode="file", project_root_dir=str(report_dir))
    else:
        context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_or_update_pandas("subject-images")
    asset = source.get_asset("images") if "images" in [a.name for a in source.assets] else source.add_dataframe_asset("images")
    batch_def = next(iter(asset.batch_definitions), None) or asset.add_batch_definition_whole_dataframe("all")
    named = _expectations(rules)
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=SUITE, expectations=[e for _, e in named]))
    definition = context.validation_definitions.add_or_update(gx.ValidationDefinition(name=SUITE, data=batch_def, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data-docs")] if report_dir is not None else []
    checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
        name=SUITE, validation_definitions=[definition], actions=actions,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["file"]}))
    result = checkpoint.run(batch_parameters={"dataframe": df})

    by_file = {row["file"]: row for row in facts}
    rule_of = {(e.expectation_type, getattr(e, "column", None)): name for name, e in named}
    failures: list[tuple[str, str, str]] = []
    validation = next(iter(result.run_results.values()))
    for r in validation.results:
        if r.success:
            continue
        cfg = r.expectation_config
        rule = rule_of.get((cfg.type, cfg.kwargs.get("column")), cfg.type)
        if rule == "count":
            failures.append((Path(folder).name, "count", f"{len(facts)} image(s); a subject needs {rules.min_count} to {rules.max_count}"))
            continue
        for hit in r.result.get("unexpected_index_list") or []:
            if rule == "rgb_convertible" and not by_file.get(hit["file"], {}).get("decodable"):
                continue  # already reported as not decodable
            failures.append((hit["file"], rule, _detail(rule, by_file.get(hit["file"], {}), rules)))
    docs = None
    if report_dir is not None:
        write_json_atomic(report_dir / "validation.json", validation.to_json_dict())
        write_json_atomic(report_dir / "facts.json", facts)
        sites = context.get_docs_sites_urls()
        docs = sites[0]["site_url"] if sites else None
    return ValidationReport(bool(result.success), failures, facts, report_dir, docs, rules.model_dump())

