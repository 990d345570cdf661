"""OCR tasks: document sets, validation, per-backend evaluation, int8 quantization, variant speeds,
confidence map, the routed engine's evaluation (no language given and given), registration."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact

from atelier.kernel.errors import DataValidationError
from atelier.kernel.hashing import sha256_file, tree_hash, value_hash
from atelier.kernel.stages import documents_dir, track_folder
from atelier.tasks.common import BY_INPUTS, UNCACHED, artifact_key, logger, retry_transient, settings, tracked
from atelier.tasks.registry import Registered  # (a result type: registered there)
from atelier.tasks.results import result_type

VERSIONS = {
    "document-sets": "2",
    "validate-documents": "1",
    "evaluate-ocr": "3",
    "prepare-recogniser": "2",
    "quantize-recogniser": "3",
    "compare-speed": "3",
    "choose-variant": "2",
    "fit-confidence": "1",
    "evaluate-engine": "1",
    "register-ocr": "2",
}
SETS = ("calibration", "evaluation")


@result_type
@dataclass(frozen=True)
class DocumentSet:
    """Labelled document images (labels.jsonl beside them) at one DVC-tracked revision."""

    path: str
    rev: str
    sha256: str  # of the folder's content


@result_type
@dataclass(frozen=True)
class DocumentsChecked:
    """Great Expectations passed on a document set (a failure raises instead)."""

    report_dir: str
    rows: int


@result_type
@dataclass(frozen=True)
class Evaluation:
    """One backend on a set's lines, language given: CER per language (and "overall"), its speed, and
    per line the confidence and whether it was read exactly (what the confidence map is fitted on)."""

    summary: dict[str, dict]
    lines_per_s: float
    rows: list[dict]

    def cer(self) -> dict[str, float]:
        return {lang: v["cer"] for lang, v in self.summary.items()}


@result_type
@dataclass(frozen=True)
class OnnxModel:
    """A recogniser the flow wrote: the exact fp32 rewrite (`made`: rewrite counts) or the int8 one
    (`made`: its quantization config)."""

    path: str
    sha256: str
    made: dict


@result_type
@dataclass(frozen=True)
class Timing:
    """Recognition lines/s of each variant on this machine (`cpu` names it)."""

    speed: dict[str, float]
    cpu: str


@result_type
@dataclass(frozen=True)
class VariantChoice:
    """The variant served here and why; `fp32_form` is the faster exact fp32 form (shipped or rewrite)."""

    served: str
    fp32_form: str
    why: str
    min_speedup: float


@result_type
@dataclass(frozen=True)
class Confidence:
    """The isotonic confidence map and the calibration error before and after it."""

    map: dict
    ece_before: float
    ece_after: float


@result_type
@dataclass(frozen=True)
class EngineRun:
    """The routed engine over the whole split in one mode: CER per language and images/s."""

    summary: dict[str, dict]
    images_per_s: float


@result_type
@dataclass(frozen=True)
class EngineEvaluation:
    """The routed engine as users run it: with no language given, with it given, and the router's confusion table."""

    no_hint: EngineRun
    hint: EngineRun
    confusion: list[dict]
    router_accuracy: float

    def modes(self) -> dict[str, EngineRun]:
        return {"no_hint": self.no_hint, "hint": self.hint}


@task(name="document-sets", version=VERSIONS["document-sets"], cache_policy=UNCACHED)
def document_sets() -> dict[str, DocumentSet]:
    """The workspace's own sets in data/documents/{calibration,evaluation} (tracked with `dvc add`), or
    else the synthetic ones of dvc.yaml's `documents` stage (`dvc repro documents`, dvc.lock committed)."""
    from atelier.kernel.stages import reproduce_stage

    s = settings()
    root = documents_dir(s)
    if all((root / name / "labels.jsonl").is_file() for name in SETS):
        return {
            name: DocumentSet(str(root / name), track_folder(s, root / name, f"document set {name}"), tree_hash(root / name))
            for name in SETS
        }
    logger().info("no document sets of the workspace's own in %s: the synthetic ones of the documents stage", root)
    rev = reproduce_stage(s, "documents", "synthetic OCR document sets (dvc repro documents)")
    synthetic = root / "synthetic"
    return {name: DocumentSet(str(synthetic / name), rev, tree_hash(synthetic / name)) for name in SETS}


@task(name="validate-documents", version=VERSIONS["validate-documents"], cache_policy=BY_INPUTS)
def validate_documents(name: str, document_set: DocumentSet) -> DocumentsChecked:
    from atelier.models.validation.document_suite import validate_document_set

    report_dir = settings().state_dir / "reports" / "documents" / name / document_set.sha256[:12]
    report = validate_document_set(
        Path(document_set.path),
        report_dir,
        docs_root=settings().data_docs_root,
        label=f"documents/{name}",
        run_name=f"documents/{name}@{document_set.sha256[:12]}",
    )
    if not report.success:
        raise DataValidationError(f"document set {name}", report.failures, str(report_dir))
    logger().info("document set %s: %d labelled images pass the suite", name, report.rows)
    return DocumentsChecked(str(report_dir), report.rows)


def shipped_models() -> dict[str, dict]:
    """The shipped det/cls/rec files (models/ocr/shipped.py) with their hashes."""
    from atelier.models.ocr.shipped import SHIPPED, shipped

    out = {}
    for name in SHIPPED:
        model, charset = shipped(name)
        out[name] = {"model": str(model), "charset": str(charset) if charset else None, "sha256": sha256_file(model)}
    return out


def _backend(kind: str, rec: str | None, charset: str | None = None):
    """`rec`: the recogniser file for PP-OCR, the weights directory for GLM-OCR."""
    from atelier.models.ocr.backends import PPOCR, Tesseract

    if kind == "glm":
        from atelier.models.ocr.glm import GlmOcr

        return GlmOcr(Path(rec))
    if kind == "tesseract":
        return Tesseract()
    return PPOCR(Path(rec), Path(charset) if charset else None, name=kind)


@task(name="evaluate-ocr", version=VERSIONS["evaluate-ocr"], cache_policy=BY_INPUTS)
def evaluate(
    backend: str,
    document_set: DocumentSet,
    rec: str | None = None,
    charset: str | None = None,
    rec_sha256: str | None = None,
    label: str | None = None,
) -> Evaluation:  # noqa: ARG001 (rec_sha256: cache key)
    """CER per language (language given, as a user who knows it would) and lines/s of one backend on a set's lines."""
    from atelier.models.ocr.evaluate import evaluate_lines, load_set

    records, images = load_set(Path(document_set.path))
    result = evaluate_lines(_backend(backend, rec, charset).read_lines, records, images)
    label = label or backend
    logger().info("%s: overall CER %.2f%% at %.1f lines/s", label, 100 * result.summary["overall"]["cer"], result.lines_per_s)
    create_table_artifact(
        [
            {"language": k, "cer_percent": round(100 * v["cer"], 2), "lines": v["lines"], "exact": round(v["exact"], 3)}
            for k, v in result.summary.items()
        ],
        key=artifact_key("ocr-cer", label),
        description=f"CER per language: {label}",
    )
    return Evaluation(result.summary, result.lines_per_s, [{k: r[k] for k in ("file", "lang", "confidence", "exact")} for r in result.rows])


@task(name="prepare-recogniser", version=VERSIONS["prepare-recogniser"], cache_policy=BY_INPUTS)
def prepare_recogniser(source: str, source_sha256: str) -> OnnxModel:
    """The shipped recogniser rewritten exactly (models/ocr/graph.py): a fp32 variant and the quantization source."""
    from atelier.models.ocr.quantize import write_simplified

    out = settings().state_dir / "ocr" / "fp32" / f"rec-{source_sha256[:12]}.onnx"
    counts = write_simplified(Path(source), out)
    logger().info("fp32 recogniser rewritten (%s) to %s", ", ".join(f"{v} {k}" for k, v in counts.items()), out)
    return OnnxModel(str(out), sha256_file(out), counts)


@task(name="quantize-recogniser", version=VERSIONS["quantize-recogniser"], cache_policy=BY_INPUTS, retries=0)
def quantize(calibration: DocumentSet, fp32: OnnxModel, charset: str | None, langs: list[str], config: dict) -> OnnxModel:
    from atelier.models.ocr.backends import PPOCR
    from atelier.models.ocr.evaluate import load_set
    from atelier.models.ocr.quantize import QuantizeConfig, quantize_model

    cfg = QuantizeConfig(**config)
    _, images = load_set(Path(calibration.path), langs=tuple(langs) or None)
    out = settings().state_dir / "ocr" / calibration.sha256[:12] / f"rec-int8-{cfg.method.lower()}-{fp32.sha256[:12]}.onnx"
    quantize_model(Path(fp32.path), out, cfg, images, PPOCR(Path(fp32.path), Path(charset) if charset else None).preprocess_line)
    logger().info(
        "int8 recogniser written to %s (%.1f MB, fp32 %.1f MB)", out, out.stat().st_size / 1e6, Path(fp32.path).stat().st_size / 1e6
    )
    return OnnxModel(str(out), sha256_file(out), asdict(cfg))


@task(name="compare-speed", version=VERSIONS["compare-speed"], cache_policy=UNCACHED)
def compare_speed(document_set: DocumentSet, variants: dict[str, str], charset: str | None, langs: list[str], repeats: int = 3) -> Timing:
    """Recognition lines/s of each variant (shipped fp32, fp32 rewrite, int8) on this machine: interleaved
    passes over the same lines of the languages the recogniser serves, so a busy neighbour slows all
    alike. Never cached: the answer belongs to the machine that runs it."""
    from atelier.models.ocr.backends import PPOCR
    from atelier.models.ocr.evaluate import load_set
    from atelier.models.ocr.variants import cpu_signature, measure

    _, images = load_set(Path(document_set.path), langs=tuple(langs) or None)
    readers = {k: PPOCR(Path(v), Path(charset) if charset else None).read_lines for k, v in variants.items()}
    speed = measure(readers, images, repeats)
    cpu = cpu_signature()
    logger().info(
        "recognition on %s, median of %d interleaved passes over %d lines: %s",
        cpu,
        repeats,
        len(images),
        ", ".join(f"{k} {v:.1f} lines/s" for k, v in speed.items()),
    )
    return Timing(speed, cpu)


@task(name="choose-variant", version=VERSIONS["choose-variant"], cache_policy=UNCACHED)
def choose_variant(fp32: Evaluation, int8: Evaluation, timing: Timing, langs: list[str], serving_key: str) -> VariantChoice:
    """The variant to serve here: int8 when it holds accuracy (the gate's rules against fp32) and is at
    least gate.ocr.min_speedup x the faster exact fp32 form (shipped or rewritten), else that fp32 form.
    A timing near the gate keeps what the same recognisers served on this CPU before (`serving_key`)."""
    from atelier.models.ocr.variants import choose
    from atelier.registry.gate import evaluate_ocr
    from atelier.registry.ocr import served_before

    rules = settings().gate.ocr
    speed = timing.speed
    fp32_form = "rewrite" if speed["rewrite"] >= speed["shipped"] else "shipped"
    held = evaluate_ocr({"cer_fp32": fp32.cer(), "cer_served": int8.cer(), "served": "int8", "langs": langs}, rules)
    before = served_before(settings(), serving_key)
    served = choose({"fp32": speed[fp32_form], **({"int8": speed["int8"]} if held.passed else {})}, rules.min_speedup, before)
    ratio = speed["int8"] / max(speed[fp32_form], 1e-9)
    kept = f" (it served {before} when last calibrated on this CPU)" if before is not None and held.passed else ""
    why = (
        f"int8 holds accuracy and runs {ratio:.2f}x the fp32 {fp32_form} here{kept}"
        if served == "int8"
        else f"int8 loses accuracy ({'; '.join(held.reasons)})"
        if not held.passed
        else f"int8 runs {ratio:.2f}x the fp32 {fp32_form} here, under gate.ocr.min_speedup {rules.min_speedup:.2f}x{kept}"
    )
    logger().info("serving the %s recogniser on %s: %s", served, timing.cpu, why)
    return VariantChoice(served, fp32_form, why, rules.min_speedup)


@task(name="fit-confidence", version=VERSIONS["fit-confidence"], cache_policy=BY_INPUTS)
def fit_confidence(calibration_eval: Evaluation, evaluation_eval: Evaluation) -> Confidence:
    """Isotonic map fitted on the calibration split, judged by ECE on the evaluation split."""
    from atelier.models.ocr.confidence import expected_calibration_error, fit_isotonic

    cal, ev = calibration_eval.rows, evaluation_eval.rows
    mapping = fit_isotonic([r["confidence"] for r in cal], [r["exact"] for r in cal])
    raw = [r["confidence"] for r in ev]
    hits = [r["exact"] for r in ev]
    before, after = expected_calibration_error(raw, hits), expected_calibration_error([mapping(c) for c in raw], hits)
    logger().info("confidence calibration: ECE %.3f -> %.3f on the evaluation split", before, after)
    return Confidence(mapping.to_dict(), before, after)


@task(name="evaluate-engine", version=VERSIONS["evaluate-engine"], cache_policy=UNCACHED)
def evaluate_engine(document_set: DocumentSet, files: dict[str, str], spec: dict, confidence: dict) -> EngineEvaluation:
    """The routed engine as users run it, on the whole evaluation split (lines and pages): with no
    language given and with it given, CER per language and images/s; the router's confusion table."""
    from atelier.models.ocr.engine import load_engine, read_documents
    from atelier.models.ocr.metrics import summarise
    from atelier.models.ocr.render import read_labels

    root = Path(document_set.path)
    labels = read_labels(root)
    engine = load_engine({k: Path(v) for k, v in files.items()}, spec, confidence)
    out: dict = {}
    for mode in ("no_hint", "hint"):
        rows = [
            {"path": str(root / r["file"]), "lang": r["lang"] if mode == "hint" else None, "kind": r.get("kind", "line")} for r in labels
        ]
        t0 = time.perf_counter()
        read = read_documents(engine, rows)
        seconds = time.perf_counter() - t0
        summary = summarise([{"lang": r["lang"], "text": r["text"], "predicted": o["text"]} for r, o in zip(labels, read)])
        out[mode] = {"summary": summary, "images_per_s": len(labels) / max(seconds, 1e-9)}
        if mode == "no_hint":
            confusion: dict[tuple[str, str], int] = {}
            for r, o in zip(labels, read):
                key = (r["lang"], o["language"] or "-")
                confusion[key] = confusion.get(key, 0) + 1
            out["confusion"] = [{"language": a, "identified_as": b, "images": n} for (a, b), n in sorted(confusion.items())]
            out["router_accuracy"] = sum(n for (a, b), n in confusion.items() if a == b) / max(len(labels), 1)
    logger().info(
        "routed engine on %d images: no language given %.2f%% CER at %.1f images/s (router %.1f%% right); "
        "language given %.2f%% at %.1f images/s",
        len(labels),
        100 * out["no_hint"]["summary"]["overall"]["cer"],
        out["no_hint"]["images_per_s"],
        100 * out["router_accuracy"],
        100 * out["hint"]["summary"]["overall"]["cer"],
        out["hint"]["images_per_s"],
    )
    create_table_artifact(out["confusion"], description="OCR router: language given in the labels vs identified with no hint")
    return EngineEvaluation(EngineRun(**out["no_hint"]), EngineRun(**out["hint"]), out["confusion"], out["router_accuracy"])


@task(
    name="register-ocr",
    version=VERSIONS["register-ocr"],
    cache_policy=UNCACHED,
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=5,
)
@tracked
def register(files: dict, spec: dict, confidence: dict, lineage: dict, metrics: dict, tables: dict, review_below: float) -> Registered:
    from atelier.registry.ocr import register_ocr

    reg = register_ocr(settings(), {k: Path(v) for k, v in files.items()}, spec, confidence, lineage, metrics, tables, review_below)
    logger().info("%s %s as %s version %s", "already registered" if reg.reused else "registered", "the OCR engine", reg.name, reg.version)
    return reg


def serving_key(evaluation: DocumentSet, cpu: str, *models: OnnxModel) -> str:
    """What a variant's timing depends on: the lines timed, the models timed and the CPU."""
    return "-".join([evaluation.sha256[:16], *(m.sha256[:16] for m in models), value_hash(cpu)[:16]])


def spec_hash(spec: dict) -> str:
    """What the engine does (routes, recognisers and the variant served), not what was measured on the way."""
    import hashlib
    import json

    keep = {k: spec[k] for k in ("routes", "first_pass", "probes", "detector", "classifier") if k in spec}
    keep["recognisers"] = {n: {k: r[k] for k in ("variants", "charset", "serve") if k in r} for n, r in spec["recognisers"].items()}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def routes(evaluations: dict[str, Evaluation], first_pass: str = "ppocr", probes: tuple[str, ...] = ("ppocrv6t", "ppocrv5")) -> dict:
    """The routing table (as a dict) from backend -> evaluation results."""
    from atelier.models.ocr.router import choose_routes

    return choose_routes(
        {k: v.cer() for k, v in evaluations.items()}, {k: v.lines_per_s for k, v in evaluations.items()}, first_pass, probes
    ).to_dict()


def glm_weights() -> tuple[str, str] | None:
    """The configured GLM-OCR directory and its content hash, or None."""
    weights = settings().glm_ocr_weights
    if weights is None:
        return None
    if not weights.is_dir():
        from atelier.kernel.errors import NotFound

        raise NotFound(str(weights), "ATELIER_GLM_OCR_WEIGHTS names no directory", "point it at a local GLM-OCR directory or unset it")
    return str(weights), tree_hash(weights)
