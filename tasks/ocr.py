"""OCR tasks: document sets, validation, evaluation, int8 quantization, confidence map, registration."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact

from atelier.errors import DataValidationError
from atelier.hashing import sha256_file, tree_hash
from atelier.workspace import documents_dir, track_folder
from tasks.common import BY_INPUTS, UNCACHED, logger, retry_transient, settings, tracked

VERSIONS = {"document-sets": "2", "validate-documents": "1", "evaluate-ocr": "2", "prepare-recogniser": "1", "quantize-recogniser": "2", "compare-speed": "2",
            "fit-confidence": "1", "register-ocr": "1"}
SETS = ("calibration", "evaluation")


@task(name="document-sets", version=VERSIONS["document-sets"], cache_policy=UNCACHED)
def document_sets() -> dict:
    """The workspace's own sets in data/documents/{calibration,evaluation} (tracked with `dvc add`), or
    else the synthetic ones of dvc.yaml's `documents` stage (`dvc repro documents`, dvc.lock committed)."""
    from atelier.workspace import reproduce_stage

    s = settings()
    root = documents_dir(s)
    if all((root / name / "labels.jsonl").is_file() for name in SETS):
        return {name: {"path": str(root / name), "rev": track_folder(s, root / name, f"document set {name}"),
                       "sha256": tree_hash(root / name)} for name in SETS}
    logger().info("no document sets of the workspace's own in %s: the synthetic ones of the documents stage", root)
    rev = reproduce_stage(s, "documents", "synthetic OCR document sets (dvc repro documents)")
    synthetic = root / "synthetic"
    return {name: {"path": str(synthetic / name), "rev": rev, "sha256": tree_hash(synthetic / name)} for name in SETS}


@task(name="validate-documents", version=VERSIONS["validate-documents"], cache_policy=BY_INPUTS)
def validate_documents(name: str, document_set: dict) -> dict:
    from models.validation.document_suite import validate_document_set

    report_dir = settings().state_dir / "reports" / "documents" / name / document_set["sha256"][:12]
    report = validate_document_set(Path(document_set["path"]), report_dir)
    if not report.success:
        raise DataValidationError(f"document set {name}", report.failures, str(report_dir))
    logger().info("document set %s: %d labelled images pass the suite", name, report.rows)
    return {"report_dir": str(report_dir), "rows": report.rows}


def _backend(kind: str, rec: str | None):
    """`rec`: the recogniser file for PP-OCR, the weights directory for GLM-OCR."""
    from models.ocr.backends import PPOCR, Tesseract

    if kind == "glm":
        from models.ocr.glm import GlmOcr

        return GlmOcr(Path(rec))
    return Tesseract() if kind == "tesseract" else PPOCR(rec=Path(rec) if rec else None)


@task(name="evaluate-ocr", version=VERSIONS["evaluate-ocr"], cache_policy=BY_INPUTS)
def evaluate(backend: str, document_set: dict, rec: str | None = None, rec_sha256: str | None = None) -> dict:  # noqa: ARG001 (cache key)
    """CER per language (language given) and lines/s of one backend on a set's lines."""
    from models.ocr.evaluate import evaluate_lines, load_set

    records, images = load_set(Path(document_set["path"]))
    result = evaluate_lines(_backend(backend, rec).read_lines, records, images)
    label = f"{backend}{' ' + Path(rec).name if rec else ''}"
    logger().info("%s: overall CER %.2f%% at %.1f lines/s", label, 100 * result.summary["overall"]["cer"], result.lines_per_s)
    create_table_artifact([{"language": k, "cer_percent": round(100 * v["cer"], 2), "lines": v["lines"], "exact": round(v["exact"], 3)}
                           for k, v in result.summary.items()], description=f"CER per language: {label}")
    return {"summary": result.summary, "lines_per_s": result.lines_per_s,
            "rows": [{k: r[k] for k in ("file", "lang", "confidence", "exact")} for r in result.rows]}


@task(name="prepare-recogniser", version=VERSIONS["prepare-recogniser"], cache_policy=BY_INPUTS)
def prepare_recogniser(source: str, source_sha256: str) -> dict:
    """The shipped recogniser rewritten exactly (models/ocr/graph.py): the fp32 baseline and the
    quantization source."""
    from models.ocr.quantize import write_simplified

    out = settings().state_dir / "ocr" / "fp32" / f"rec-{source_sha256[:12]}.onnx"
    counts = write_simplified(Path(source), out)
    logger().info("fp32 recogniser rewritten (%s) to %s", ", ".join(f"{v} {k}" for k, v in counts.items()), out)
    return {"path": str(out), "sha256": sha256_file(out), "rewrites": counts}


@task(name="quantize-recogniser", version=VERSIONS["quantize-recogniser"], cache_policy=BY_INPUTS, retries=0)
def quantize(calibration: dict, fp32: dict, langs: list[str], config: dict) -> dict:
    from models.ocr.backends import PPOCR
    from models.ocr.evaluate import load_set
    from models.ocr.quantize import QuantizeConfig, quantize_model

    cfg = QuantizeConfig(**config)
    _, images = load_set(Path(calibration["path"]), langs=tuple(langs))
    out = settings().state_dir / "ocr" / calibration["sha256"][:12] / f"rec-int8-{cfg.method.lower()}-{fp32['sha256'][:12]}.onnx"
    quantize_model(Path(fp32["path"]), out, cfg, images, PPOCR(rec=Path(fp32["path"])).preprocess_line)
    logger().info("int8 recogniser written to %s (%.1f MB, fp32 %.1f MB)", out, out.stat().st_size / 1e6, Path(fp32["path"]).stat().st_size / 1e6)
    return {"path": str(out), "sha256": sha256_file(out), "config": asdict(cfg)}


@task(name="compare-speed", version=VERSIONS["compare-speed"], cache_policy=BY_INPUTS)
def compare_speed(document_set: dict, fp32: dict, int8: dict, langs: list[str], repeats: int = 3) -> dict:
    """Recognition lines/s of the fp32 rewrite and the int8 model, interleaved passes over the same
    lines of the languages the recogniser is routed for (the gate's speed rule reads this, not the
    separate evaluation runs)."""
    from models.ocr.backends import PPOCR
    from models.ocr.evaluate import interleaved_speed, load_set

    _, images = load_set(Path(document_set["path"]), langs=tuple(langs) or None)
    engines = {"fp32": PPOCR(rec=Path(fp32["path"])), "int8": PPOCR(rec=Path(int8["path"]))}
    speed = interleaved_speed({k: e.read_lines for k, e in engines.items()}, images, repeats)
    logger().info("recognition, median of %d interleaved passes over %d lines (%s): fp32 %.1f lines/s, int8 %.1f (%.2fx)",
                  repeats, len(images), ", ".join(langs) or "all languages", speed["fp32"], speed["int8"], speed["int8"] / speed["fp32"])
    return speed


@task(name="fit-confidence", version=VERSIONS["fit-confidence"], cache_policy=BY_INPUTS)
def fit_confidence(calibration_eval: dict, evaluation_eval: dict) -> dict:
    """Isotonic map fitted on the calibration split, judged by ECE on the evaluation split."""
    from models.ocr.confidence import expected_calibration_error, fit_isotonic

    cal, ev = calibration_eval["rows"], evaluation_eval["rows"]
    mapping = fit_isotonic([r["confidence"] for r in cal], [r["exact"] for r in cal])
    raw = [r["confidence"] for r in ev]
    hits = [r["exact"] for r in ev]
    before, after = expected_calibration_error(raw, hits), expected_calibration_error([mapping(c) for c in raw], hits)
    logger().info("confidence calibration: ECE %.3f -> %.3f on the evaluation split", before, after)
    return {"map": mapping.to_dict(), "ece_before": before, "ece_after": after}


@task(name="register-ocr", version=VERSIONS["register-ocr"], cache_policy=UNCACHED, retries=2, retry_condition_fn=retry_transient,
      retry_delay_seconds=5)
@tracked
def register(models: dict, routing: dict, confidence: dict, lineage: dict, metrics: dict, tables: dict, review_below: float) -> dict:
    from registry.ocr import register_ocr

    reg = register_ocr(settings(), {k: Path(v) for k, v in models.items()}, routing, confidence, lineage, metrics, tables, review_below)
    logger().info("%s %s as %s version %s", "already registered" if reg.reused else "registered", "the OCR engine", reg.name, reg.version)
    return {"name": reg.name, "version": reg.version, "run_id": reg.run_id, "model_uri": reg.model_uri, "reused": reg.reused}


def cer_of(evaluation: dict) -> dict[str, float]:
    return {lang: v["cer"] for lang, v in evaluation["summary"].items()}


def routes(evaluations: dict[str, dict]) -> dict:
    """The routing table (as a dict) from backend -> evaluation results."""
    from models.ocr.router import choose_routes

    return choose_routes({k: cer_of(v) for k, v in evaluations.items()}, {k: v["lines_per_s"] for k, v in evaluations.items()}).to_dict()


def shipped_models() -> dict[str, str]:
    from models.ocr.backends import shipped_ppocr_models

    return {k: str(v) for k, v in shipped_ppocr_models().items()}


def glm_weights() -> tuple[str, str] | None:
    """The configured GLM-OCR directory and its content hash, or None."""
    weights = settings().glm_ocr_weights
    if weights is None:
        return None
    if not weights.is_dir():
        from atelier.errors import NotFound

        raise NotFound(str(weights), "ATELIER_GLM_OCR_WEIGHTS names no directory", "point it at a local GLM-OCR directory or unset it")
    return str(weights), tree_hash(weights)
