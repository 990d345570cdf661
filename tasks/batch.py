"""Batch inference tasks: pin a registered model version, read a manifest, run the items exactly
once into a local folder or S3 prefix, write the output manifest and the run report."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prefect import task
from prefect.artifacts import create_table_artifact

from atelier.kernel.errors import AtelierError, ConfigError
from atelier.kernel.objectstore import open_store, split_file_url
from atelier.models.batch.manifest import GenItem, read_generation_manifest
from atelier.models.batch.outputs import finish
from atelier.registry.serving import Pinned
from atelier.tasks.common import UNCACHED, logger, progress_logger, retry_transient, settings, tracked
from atelier.tasks.results import result_type

VERSIONS = {"pin-model": "1", "read-manifest": "1", "generate-batch": "1", "ocr-batch": "1", "write-outputs": "1"}
result_type(Pinned)  # what pin-model returns: the registry's own class


@result_type
@dataclass(frozen=True)
class Manifest:
    """A manifest's valid items and its invalid lines (each named with its line number and the problem)."""

    items: list[dict]
    invalid: list[dict]


@result_type
@dataclass(frozen=True)
class BatchDone:
    """What a batch run holds in its output: each item's record, and which items were written now,
    done before, redone (their output had changed) or failed."""

    records: dict[str, dict]
    progress: dict[str, list]

    @classmethod
    def nothing(cls) -> BatchDone:
        return cls({}, {"written": [], "done_before": [], "redone": [], "failed": []})


@result_type
@dataclass(frozen=True)
class Written:
    """Where the output manifest and the run report were written."""

    manifest: str
    report: str


@task(
    name="pin-model",
    version=VERSIONS["pin-model"],
    cache_policy=UNCACHED,
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=3,
)
@tracked
def pin_model(ref: str, customer: str | None = None) -> Pinned:
    """Resolve NAME@ALIAS (or NAME/VERSION) to one version, once, for the whole run; refuse a model of
    another customer."""
    from atelier.registry.serving import pin

    pinned = pin(settings(), ref, customer)
    logger().info("%s is %s: pinned for this run", ref, pinned.model)
    return pinned


@task(
    name="read-manifest",
    version=VERSIONS["read-manifest"],
    cache_policy=UNCACHED,
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=3,
)
@tracked
def read_manifest(url: str) -> Manifest:
    """Valid items and the invalid lines (each named with its line number and the problem)."""
    folder, name = split_file_url(url)
    items, invalid = read_generation_manifest(open_store(folder, settings().s3_endpoint_url).read_bytes(name), url, require_items=False)
    for bad in invalid:
        logger().warning("manifest %s: %s (skipped)", url, bad.error)
    logger().info("manifest %s: %d valid item(s), %d invalid", url, len(items), len(invalid))
    return Manifest([asdict(i) for i in items], [b.to_dict() for b in invalid])


@task(
    name="generate-batch",
    version=VERSIONS["generate-batch"],
    cache_policy=UNCACHED,
    retries=1,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=5,
)
@tracked
def generate_batch(pinned: Pinned, items: list[dict], out: str, batch_size: int = 8) -> BatchDone:
    """Generate the items not yet done in `out` with the pinned version (a retry or a rerun resumes)."""
    from atelier.models.batch.generate import run_generation
    from atelier.registry.serving import load_python_model

    s = settings()
    store = open_store(out, s.s3_endpoint_url)
    model = load_python_model(s, pinned.name, pinned.version)  # the pipeline itself: no base64 round trip per image
    report = progress_logger(f"batch generate {pinned.model}", max(1, len(items)), "images")
    records, progress = run_generation(
        model.pipe,
        [GenItem(**i) for i in items],
        store,
        pinned.model,
        model.defaults,
        batch_size,
        on_progress=lambda done, total: report(done),
    )
    logger().info(
        "%d generated, %d already done (verified), %d redone, %d failed",
        len(progress.written),
        len(progress.done_before),
        len(progress.redone),
        len(progress.failed),
    )
    return BatchDone(records, asdict(progress))


@task(
    name="ocr-batch",
    version=VERSIONS["ocr-batch"],
    cache_policy=UNCACHED,
    retries=1,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=5,
)
@tracked
def ocr_batch(pinned: Pinned, inputs: str, out: str, lang: str | None, kind: str, every: float = 1.0, max_frames: int = 300) -> BatchDone:
    from atelier.models.batch.ocr import list_inputs, run_ocr
    from atelier.models.ocr.langs import language
    from atelier.models.video.frames import Sampling
    from atelier.registry.serving import load_python_model

    if lang:
        language(lang)
    s = settings()
    source, store = open_store(inputs, s.s3_endpoint_url), open_store(out, s.s3_endpoint_url)
    keys = list_inputs(source)
    if not keys:
        raise ConfigError(
            inputs, "holds no images or video clips", "point it at a folder or S3 prefix with PNG/JPEG/TIFF images or MP4/MKV/WebM clips"
        )
    engine = load_python_model(s, pinned.name, pinned.version).engine
    report = progress_logger(f"batch OCR {pinned.model}", len(keys), "files")
    records, progress = run_ocr(
        engine,
        source,
        keys,
        store,
        pinned.model,
        lang,
        kind,
        on_progress=lambda done, total: report(done),
        sampling=Sampling(every, max_frames),
    )
    logger().info(
        "%d read, %d already done (verified), %d with errors", len(progress.written), len(progress.done_before), len(progress.failed)
    )
    return BatchDone(records, asdict(progress))


@task(
    name="write-outputs",
    version=VERSIONS["write-outputs"],
    cache_policy=UNCACHED,
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=3,
)
@tracked
def write_outputs(out: str, manifest_key: str, result: BatchDone, report: dict, payload_lines: bool = False) -> Written:
    """The output manifest (records sorted by id, or for OCR each result in input order) and the report."""
    store = open_store(out, settings().s3_endpoint_url)
    records = result.records
    if payload_lines:  # OCR: results.jsonl holds the results themselves, in input-path order
        ordered = sorted(records.values(), key=lambda r: r["path"])
        text = "".join(store.read_bytes(r["file"]).decode() + "\n" for r in ordered)
        store.write_bytes(manifest_key, text.encode())
        finish(store, "items.jsonl", records, report)
    else:
        finish(store, manifest_key, records, report)
    rows = [{"item": b.get("id") or f"line {b['line']}", "problem": b["error"]} for b in report.get("invalid", [])]
    rows += [{"item": f["id"], "problem": f["error"]} for f in report.get("failed", [])]
    if rows:
        create_table_artifact(rows, description=f"items not done in {out}: fix them and run again")
    logger().info("wrote %s/%s and %s/report.json (%d item(s))", store.url, manifest_key, store.url, len(records))
    return Written(f"{store.url}/{manifest_key}", f"{store.url}/report.json")


def report_of(pinned: Pinned, out: str, result: BatchDone, invalid: list[dict]) -> dict:
    """The run report (report.json), as the flow returns it too."""
    p = result.progress
    return {
        "model": pinned.model,
        "requested": pinned.ref,
        "out": out,
        "items": len(result.records),
        "written": len(p["written"]),
        "done_before": len(p["done_before"]),
        "redone": p["redone"],
        "invalid": invalid,
        "failed": p["failed"],
    }


def check_not_empty(items: list[dict], invalid: list[dict], manifest: str) -> None:
    if not items:
        raise AtelierError(
            manifest,
            f"has no valid item ({len(invalid)} invalid line(s): {invalid[0]['error']})",
            "fix the lines named in the log and run again",
        )
