"""Run a Great Expectations suite over a per-file facts table and say which file broke which rule.

A file-backed GX context under the report directory keeps the suite, the validation result JSON and
the Data Docs HTML together, so a failed run leaves something a person can open.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from atelier.storage import write_json_atomic


@dataclass
class SuiteRun:
    success: bool
    failed: list[tuple[str, str | None]]  # (rule, file); file None for table-level rules
    data_docs: str | None


def run_suite(name: str, df: pd.DataFrame, named: list[tuple[str, object]], report_dir: Path | None,
              facts: list[dict] | None = None) -> SuiteRun:
    """Validate `df` (one row per file, a `file` column) against the named expectations."""
    import great_expectations as gx

    if report_dir is not None:
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        context = gx.get_context(mode="file", project_root_dir=str(report_dir))
    else:
        context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_or_update_pandas(name)
    asset = source.get_asset("files") if "files" in [a.name for a in source.assets] else source.add_dataframe_asset("files")
    batch_def = next(iter(asset.batch_definitions), None) or asset.add_batch_definition_whole_dataframe("all")
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=[e for _, e in named]))
    definition = context.validation_definitions.add_or_update(gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data-docs")] if report_dir is not None else []
    checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
        name=name, validation_definitions=[definition], actions=actions,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["file"]}))
    result = checkpoint.run(batch_parameters={"dataframe": df})

    rule_of = {(e.expectation_type, getattr(e, "column", None)): rule for rule, e in named}
    failed: list[tuple[str, str | None]] = []
    validation = next(iter(result.run_results.values()))
    for r in validation.results:
        if r.success:
            continue
        cfg = r.expectation_config
        rule = rule_of.get((cfg.type, cfg.kwargs.get("column")), cfg.type)
        hits = r.result.get("unexpected_index_list") or []
        failed.extend((rule, hit["file"]) for hit in hits) if hits else failed.append((rule, None))
    docs = None
    if report_dir is not None:
        write_json_atomic(report_dir / "validation.json", validation.to_json_dict())
        if facts is not None:
            write_json_atomic(report_dir / "facts.json", facts)
        sites = context.get_docs_sites_urls()
        docs = sites[0]["site_url"] if sites else None
    return SuiteRun(bool(result.success), failed, docs)
