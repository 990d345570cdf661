"""VLM judge tasks: score a candidate's samples against its prompts and its subject's photos, and
its class-prior images for subject leakage; record the result on the registered version."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact

from atelier.registry.client import Registered
from atelier.tasks.common import UNCACHED, artifact_key, logger, retry_transient, settings, tracked
from atelier.tasks.data import Snapshot
from atelier.tasks.dreambooth import Priors, Samples
from atelier.tasks.ocr import DocumentSet
from atelier.tasks.results import result_type

VERSIONS = {"judge-samples": "1", "judged-before": "1", "record-judgment": "1", "judge-ocr-cross-check": "2"}
MAX_CLASS_IMAGES = 4


@result_type
@dataclass(frozen=True)
class Judgment:
    """The VLM judge's summary (scores, usage, or {"error": ...} that fails the gate) and its per-image rows."""

    summary: dict
    rows: list[dict]


@task(name="judge-samples", version=VERSIONS["judge-samples"], cache_policy=UNCACHED)
def judge_samples(samples: Samples, snapshot: Snapshot, priors: Priors | None, identifier: str) -> Judgment:
    """Scores and per-image rows; a judge that cannot be reached gives {"error": ...}, which fails the gate."""
    from atelier.models.vlm.base import JudgeError
    from atelier.models.vlm.factory import make_judge
    from atelier.models.vlm.scoring import Cache, Scorer, judge_images

    s = settings()
    sample_dir = Path(samples.dir)
    prompts = json.loads((sample_dir / "prompts.json").read_text())
    # samples made with the identifier should show the subject; those made without it (prior
    # preservation prompts) should not, and count with the class images as prior leak
    items = [
        (str(sample_dir / p["file"]), (sample_dir / p["file"]).read_bytes(), p["prompt"].replace(f"{identifier} ", ""))
        for p in prompts
        if identifier in p["prompt"].split()
    ]
    plain = [(str(sample_dir / p["file"]), (sample_dir / p["file"]).read_bytes()) for p in prompts if identifier not in p["prompt"].split()]
    refs = [p.read_bytes() for p in sorted(Path(snapshot.path).iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg")][:4]
    class_images = plain + (
        [(str(p), p.read_bytes()) for p in sorted(Path(priors.path).glob("*.png"))[:MAX_CLASS_IMAGES]] if priors else []
    )
    try:
        judge = make_judge(s.judge, s.tiny_judge_dir)
        scorer = Scorer(judge, Cache(s.state_dir / "judge-cache"))
        rows, summary = judge_images(scorer, items, refs, class_images, captions=s.judge.captions)
    except JudgeError as exc:
        logger().warning("VLM judge failed: %s; the gate will refuse", exc)
        return Judgment({"error": str(exc), "calibrated": False}, [])
    if s.judge.clip_weights or s.judge.dino_weights:  # the DreamBooth paper's metrics, reported beside the judge's
        from atelier.models.vlm.classic import ClassicMetrics

        summary.update(ClassicMetrics(s.judge.clip_weights, s.judge.dino_weights).score([(png, prompt) for _, png, prompt in items], refs))
    usage = judge.usage
    summary.update(
        judge=judge.name,
        judge_config=judge_config(s.judge),
        requests=usage.requests,
        retries=usage.retries,
        cache_hits=scorer.cache.hits,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost_usd=usage.cost(s.judge.usd_per_million_input, s.judge.usd_per_million_output),
    )
    logger().info(
        "VLM judge %s%s: prompt %.2f, fidelity %s, prior leak %s, %d failed, %d requests (%d cached), %d+%d tokens",
        judge.name,
        "" if summary["calibrated"] else " (uncalibrated)",
        summary["prompt_score"] or 0.0,
        f"{summary['fidelity']:.2f}" if summary["fidelity"] is not None else "-",
        f"{summary['prior_leak']:.2f}" if summary["prior_leak"] is not None else "-",
        summary["failures"],
        usage.requests,
        scorer.cache.hits,
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    for r in rows:  # the image's path stays for the thumbnail; the table shows its file name
        r["path"], r["image"] = r["image"], Path(r["image"]).name
    table = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in ("objects", "path")} for r in rows]
    create_table_artifact(
        table,
        key=artifact_key("judge", snapshot.customer, snapshot.subject),
        description=f"VLM judgments of {snapshot.customer}/{snapshot.subject} ({judge.name}"
        f"{'' if summary['calibrated'] else ', uncalibrated'})",
    )
    return Judgment(summary, rows)


def judge_config(cfg) -> str:
    """What makes two judgements of the same images comparable: the judge and how it is asked."""
    from atelier.kernel.hashing import value_hash

    return value_hash(
        {
            "backend": cfg.backend,
            "model": cfg.model,
            "base_url": cfg.base_url,
            "weights": str(cfg.local_weights),
            "captions": cfg.captions,
            "clip": str(cfg.clip_weights),
            "dino": str(cfg.dino_weights),
            "task": VERSIONS["judge-samples"],
        }
    )[:16]


@task(
    name="judged-before",
    version=VERSIONS["judged-before"],
    cache_policy=UNCACHED,
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=5,
)
@tracked
def judged_before(registered: Registered) -> bool:
    """The version (same content: same training key) holds a judgement by this judge that did not fail."""
    from atelier.registry.judge import recorded_judgment

    summary = recorded_judgment(settings(), registered.name, registered.version)
    ok = summary is not None and not summary.get("error") and summary.get("judge_config") == judge_config(settings().judge)
    if ok:
        logger().info(
            "%s v%s was judged before by %s: reusing that judgement (no request)",
            registered.name,
            registered.version,
            summary.get("judge"),
        )
    return ok


@task(
    name="record-judgment",
    version=VERSIONS["record-judgment"],
    cache_policy=UNCACHED,
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=5,
)
@tracked
def record_judgment(registered: Registered, judgment: Judgment) -> None:
    from atelier.registry.judge import record_judgment as record

    record(settings(), registered.name, registered.version, registered.run_id, judgment.summary, judgment.rows)


@task(name="judge-ocr-cross-check", version=VERSIONS["judge-ocr-cross-check"], cache_policy=UNCACHED)
def ocr_cross_check(document_set: DocumentSet, files: dict[str, str], spec: dict, max_pages: int = 8) -> Judgment:
    """The VLM judge reads the set's pages; its agreement (CER) with the routed engine's reading is a
    label-free quality signal. A judge that fails gives {"error": ...}; the OCR gate does not use it."""
    from atelier.models.ocr.engine import load_engine
    from atelier.models.ocr.images import load_document
    from atelier.models.ocr.render import read_labels
    from atelier.models.vlm.base import JudgeError
    from atelier.models.vlm.factory import make_judge
    from atelier.models.vlm.scoring import Cache, Scorer, ocr_agreement

    s = settings()
    root = Path(document_set.path)
    pages = [r for r in read_labels(root) if r.get("kind") == "page"][:max_pages]
    engine = load_engine({k: Path(v) for k, v in files.items()}, spec, {})
    items = []
    for r in pages:
        reading = engine.read_page(load_document(root / r["file"]), r["lang"])
        items.append(
            {"name": r["file"], "png": (root / r["file"]).read_bytes(), "lang": r["lang"], "label": r["text"], "ocr_text": reading.text}
        )
    try:
        scorer = Scorer(make_judge(s.judge, s.tiny_judge_dir), Cache(s.state_dir / "judge-cache"))
        rows, summary = ocr_agreement(scorer, items)
    except JudgeError as exc:
        logger().warning("VLM OCR cross-check failed: %s", exc)
        return Judgment({"error": str(exc)}, [])
    logger().info(
        "VLM OCR cross-check on %d pages: judge vs OCR CER %s, judge vs labels %s, %d failed%s",
        len(rows),
        summary["agreement_cer"],
        summary["judge_cer"],
        summary["failures"],
        "" if summary["calibrated"] else " (uncalibrated judge)",
    )
    create_table_artifact(
        [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("judge_text", "ocr_text")} for r in rows],
        key=artifact_key("ocr-cross-check", "documents"),
        description="VLM OCR cross-check: judge vs OCR agreement per page",
    )
    return Judgment(summary, rows)
