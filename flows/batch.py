"""Batch inference flows: a registered model pinned by version for the whole run, items done exactly
once into a local folder or S3 prefix, an output manifest naming the version of every item.

batch-generate: pin dreambooth-<customer>-<subject>@champion -> read the manifest -> generate the
items not yet done -> output manifest + report.
batch-ocr: pin ocr@champion -> read every image under the input -> results.jsonl + report.

`out` may hold `{date}` (the run's UTC date, YYYY-MM-DD) and `{flow_run}` (its name), so that a
scheduled run writes a new folder each day while a restarted run resumes its own.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone

from prefect import flow
from prefect.runtime import flow_run

from atelier.flows.runs import claim_and_sweep, run_name
from atelier.kernel.storage import check_customer, check_slug
from atelier.tasks import batch as batch_tasks
from atelier.tasks.common import summary_artifact

FLOW_VERSION = "1"


def _expand(out: str) -> str:
    start = flow_run.scheduled_start_time or datetime.now(timezone.utc)
    return out.replace("{date}", start.strftime("%Y-%m-%d")).replace("{flow_run}", str(flow_run.name or "run"))


@flow(name="batch-generate", version=FLOW_VERSION, log_prints=True, on_running=[claim_and_sweep], flow_run_name=run_name)
def batch_generate(customer: str, subject: str, manifest: str, out: str, model: str | None = None, batch_size: int = 8) -> dict:
    check_customer(customer)
    check_slug(subject, "subject")
    out = _expand(out)
    pinned = batch_tasks.pin_model(model or f"dreambooth-{customer}-{subject}@champion", customer)
    parsed = batch_tasks.read_manifest(manifest)
    result = batch_tasks.generate_batch(pinned, parsed.items, out, batch_size) if parsed.items else batch_tasks.BatchDone.nothing()
    report = batch_tasks.report_of(pinned, out, result, parsed.invalid)
    written = batch_tasks.write_outputs(out, "manifest.jsonl", result, report)
    summary_artifact(
        "batch-generate",
        pinned.model,
        asdict(written),
        f"{report['written']} new, {report['done_before']} already done, {len(report['invalid'])} invalid, {len(report['failed'])} failed",
    )
    batch_tasks.check_not_empty(parsed.items, parsed.invalid, manifest)
    return {**report, **asdict(written)}


@flow(name="batch-ocr", version=FLOW_VERSION, log_prints=True, on_running=[claim_and_sweep], flow_run_name=run_name)
def batch_ocr(
    inputs: str,
    out: str,
    model: str = "ocr@champion",
    lang: str | None = None,
    kind: str = "page",
    every: float = 1.0,
    max_frames: int = 300,
) -> dict:
    out = _expand(out)
    pinned = batch_tasks.pin_model(model)
    result = batch_tasks.ocr_batch(pinned, inputs, out, lang, kind, every, max_frames)
    report = batch_tasks.report_of(pinned, out, result, [])
    written = batch_tasks.write_outputs(out, "results.jsonl", result, report, payload_lines=True)
    summary_artifact(
        "batch-ocr",
        pinned.model,
        asdict(written),
        f"{report['written']} new, {report['done_before']} already done, {len(report['failed'])} with errors",
    )
    return {**report, **asdict(written)}
