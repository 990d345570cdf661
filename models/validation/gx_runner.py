"""Run a Great Expectations suite over a per-file facts table and say which file broke which rule.

Every validation of a workspace goes into one file-backed GX project (`docs_root`): one suite per
kind of data, one data asset per data set (a subject, a document set), and one Data Docs site whose
index lists every run with its name (the data set at its revision) and time, passed or failed. The
report directory of a run keeps its own validation result and facts as JSON, so a failed run leaves
something a person can open.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from atelier.kernel.storage import file_lock, write_json_atomic


@dataclass
class SuiteRun:
    success: bool
    failed: list[tuple[str, str | None]]  # (rule, file); file None for table-level rules
    data_docs: str | None


def _project_lock(root: Path):
    """One writer at a time in a GX project (flows validate in parallel; GX's file stores do not lock)."""
    return file_lock(root / ".atelier.lock")


def _asset_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "files"


def run_suite(
    name: str,
    df: pd.DataFrame,
    named: list[tuple[str, object]],
    report_dir: Path | None,
    facts: list[dict] | None = None,
    docs_root: Path | None = None,
    asset: str = "files",
    run_name: str | None = None,
) -> SuiteRun:
    """Validate `df` (one row per file, a `file` column) against the named expectations. With
    `docs_root` the run goes into that shared GX project and its Data Docs (as `asset`, named
    `run_name`); else, with `report_dir`, into a project of its own there; else into memory."""
    project = Path(docs_root) if docs_root is not None else Path(report_dir) if report_dir is not None else None
    if report_dir is not None:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
    with _project_lock(project) if project is not None else contextlib.nullcontext():
        return _run(name, df, named, report_dir, facts, project, _asset_name(asset), run_name)


def _run(name, df, named, report_dir, facts, project, asset, run_name) -> SuiteRun:
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    context = gx.get_context(mode="file", project_root_dir=str(project)) if project is not None else gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_or_update_pandas(name)
    data = source.get_asset(asset) if asset in [a.name for a in source.assets] else source.add_dataframe_asset(asset)
    batch_def = next(iter(data.batch_definitions), None) or data.add_batch_definition_whole_dataframe("all")
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=[e for _, e in named]))
    definition = context.validation_definitions.add_or_update(gx.ValidationDefinition(name=f"{name}.{asset}", data=batch_def, suite=suite))
    actions = [gx.checkpoint.UpdateDataDocsAction(name="data-docs")] if project is not None else []
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=f"{name}.{asset}",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["file"]},
        )
    )
    built = time.time()
    result = checkpoint.run(
        batch_parameters={"dataframe": df}, run_id=RunIdentifier(run_name=(run_name or asset).replace("/", "."))
    )  # GX keys are path parts

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
        write_json_atomic(Path(report_dir) / "validation.json", validation.to_json_dict())
        if facts is not None:
            write_json_atomic(Path(report_dir) / "facts.json", facts)
    if project is not None:
        from atelier.models.validation.data_docs import make_offline

        sites = context.get_docs_sites_urls()
        docs = sites[0]["site_url"] if sites else None
        if docs and docs.startswith("file://"):
            make_offline(Path(docs.removeprefix("file://")).parent, since=built)  # the pages this run (re)wrote
    return SuiteRun(bool(result.success), failed, docs)
