"""Data tasks: pull a subject's photos at their DVC revision, validate them with Great Expectations."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from atelier.kernel.errors import DataValidationError
from atelier.kernel.workspace import checkout_subject, subject_revision
from atelier.models.validation.subject_suite import validate_subject_images
from atelier.tasks.common import BY_INPUTS, UNCACHED, logger, retry_transient, settings, tracked
from atelier.tasks.results import result_type

PULL_VERSION = "1"
VALIDATE_VERSION = "1"


@result_type
@dataclass(frozen=True)
class Snapshot:
    """A subject's photos at one data revision, checked out where the flow's tasks read them."""

    customer: str
    subject: str
    class_noun: str
    rev: str  # the workspace commit whose .dvc file pins the photos
    dvc_md5: str  # DVC's content hash of the photo folder
    path: str  # the local copy
    files: dict[str, str]  # file name -> sha256


@result_type
@dataclass(frozen=True)
class Validation:
    """Great Expectations passed on every photo (a failure raises instead)."""

    report_dir: str
    data_docs: str | None  # the Data Docs page, where GX wrote one
    count: int


@task(
    name="pull-subject", version=PULL_VERSION, cache_policy=UNCACHED, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=3
)
@tracked  # the DVC remote on S3 that does not answer: exit 6 naming S3
def pull_subject(customer: str, subject: str, rev: str | None = None) -> Snapshot:
    s = settings()
    rev = rev or subject_revision(s, customer, subject)
    snap = checkout_subject(s, customer, subject, rev, s.state_dir / "snapshots" / customer / subject / rev[:12])
    logger().info("pulled %d photos of %s/%s at data revision %s", len(snap.files), customer, subject, snap.rev[:12])
    return Snapshot(snap.customer, snap.subject, snap.class_noun, snap.rev, snap.dvc_md5, str(snap.path), snap.files)


@task(name="validate-subject", version=VALIDATE_VERSION, cache_policy=BY_INPUTS)
def validate_subject(snapshot: Snapshot) -> Validation:
    s = settings()
    report_dir = s.state_dir / "reports" / "validation" / snapshot.customer / snapshot.subject / snapshot.rev[:12]
    label = f"{snapshot.customer}/{snapshot.subject}"
    report = validate_subject_images(
        snapshot.path, s.images, report_dir, label=label, docs_root=s.data_docs_root, run_name=f"{label}@{snapshot.rev[:12]}"
    )
    rows = [
        {
            "file": f["file"],
            "format": f["format"],
            "size": f"{f['width']}x{f['height']}",
            "ok": all(x[0] != f["file"] for x in report.failures),
        }
        for f in report.facts
    ]
    create_table_artifact(
        rows,
        key=f"validation-{snapshot.customer}-{snapshot.subject}",
        description=f"Photos of {label} (data docs: {report.data_docs})",
    )
    if not report.success:
        create_markdown_artifact(
            "\n".join(["| file | rule | detail |", "|---|---|---|"] + [f"| {f} | {r} | {d} |" for f, r, d in report.failures]),
            description="validation failures",
        )
        raise DataValidationError(f"subject {label}", report.failures, str(report_dir))
    logger().info("validation passed: %d photos; report %s", len(report.facts), report.data_docs)
    return Validation(str(report_dir), report.data_docs, len(report.facts))
