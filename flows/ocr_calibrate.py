"""ocr-calibrate: document sets -> validate (GX) -> exact fp32 rewrite of the recogniser -> fp32 and
Tesseract baselines -> routing table -> int8 quantization -> int8 evaluation -> confidence map ->
register (alias candidate) -> gate (int8 accuracy loss, speed-up over the fp32 rewrite) -> alias
champion."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from atelier.gitinfo import code_version
from atelier.hashing import sha256_file
from flows.runs import claim_and_sweep
from tasks import judge as judge_tasks
from tasks import ocr as ocr_tasks
from tasks.common import summary_artifact
from tasks.ocr import cer_of as _cer
from tasks.registry import VERSIONS as REG_VERSIONS, promotion_gate

FLOW_VERSION = "1"


@flow(name="ocr-calibrate", version=FLOW_VERSION, log_prints=True, on_running=[claim_and_sweep])
def ocr_calibrate(method: str = "Percentile", calibration_lines: int = 64, review_below: float = 0.5) -> dict:
    sets = ocr_tasks.document_sets()
    reports = {name: ocr_tasks.validate_documents(name, sets[name]) for name in sets}
    shipped = ocr_tasks.shipped_models()
    rec_fp32 = ocr_tasks.prepare_recogniser(shipped["rec"], sha256_file(Path(shipped["rec"])))
    fp32 = ocr_tasks.evaluate("ppocr", sets["evaluation"], rec_fp32["path"], rec_fp32["sha256"])
    baselines = {"ppocr": fp32}
    if shutil.which("tesseract"):
        baselines["tesseract"] = ocr_tasks.evaluate("tesseract", sets["evaluation"])
    glm = ocr_tasks.glm_weights()
    if glm is not None:
        baselines["glm"] = ocr_tasks.evaluate("glm", sets["evaluation"], *glm)
    first = ocr_tasks.routes(baselines)
    pp_langs = sorted(lang for lang, b in first["routes"].items() if b == "ppocr")
    quantized = ocr_tasks.quantize(sets["calibration"], rec_fp32, pp_langs, {"method": method, "calibration_lines": calibration_lines})
    int8 = ocr_tasks.evaluate("ppocr", sets["evaluation"], quantized["path"], quantized["sha256"])
    int8_cal = ocr_tasks.evaluate("ppocr", sets["calibration"], quantized["path"], quantized["sha256"])
    confidence = ocr_tasks.fit_confidence(int8_cal, int8)
    deployed = {**baselines, "ppocr": int8}
    routing = ocr_tasks.routes(deployed)
    if glm is not None:
        routing["glm_weights"] = glm[0]

    cross = None
    if ocr_tasks.settings().judge.backend != "none":  # label-free signal: the VLM judge reads the pages too
        cross = judge_tasks.ocr_cross_check(sets["evaluation"], quantized["path"])["summary"]
    # every language the int8 recogniser will serve is checked, including any the final table adds
    served = sorted(set(pp_langs) | {lang for lang, b in routing["routes"].items() if b == "ppocr"})
    speed = ocr_tasks.compare_speed(sets["evaluation"], rec_fp32, quantized, served)
    summary = {"cer_fp32": _cer(fp32), "cer_int8": _cer(int8), "speed_fp32": speed["fp32"], "speed_int8": speed["int8"],
               "langs": served, "ece_before": confidence["ece_before"], "ece_after": confidence["ece_after"]}
    code = code_version()
    lineage = {
        "data.calibration": {k: sets["calibration"][k] for k in ("rev", "sha256")},
        "data.evaluation": {k: sets["evaluation"][k] for k in ("rev", "sha256")},
        "data.validation_reports": {k: v["report_dir"] for k, v in reports.items()},
        "base_model.id": "PP-OCRv4 (rapidocr-onnxruntime 1.4.4)", "base_model.rewrites": rec_fp32["rewrites"],
        "quantize.config": quantized["config"],
        "code.git_sha": code.git_sha, "code.dirty": str(code.dirty).lower(), "code.version": code.package_version,
        "flow.name": "ocr-calibrate", "flow.version": FLOW_VERSION, "task_versions": {**ocr_tasks.VERSIONS, **REG_VERSIONS},
        "calibration.key": f"{sets['calibration']['sha256'][:16]}-{sets['evaluation']['sha256'][:16]}-{quantized['sha256'][:16]}",
        "prefect.flow_run_id": str(flow_run.id), "eval.summary": summary, "routing": routing["routes"],
        **({"eval.judge_ocr": cross} if cross is not None else {}),
    }
    metrics = {f"cer_{tag}_{lang}": v for tag, ev in (("fp32", fp32), ("int8", int8)) for lang, v in _cer(ev).items()}
    metrics.update({"lines_per_s_fp32": speed["fp32"], "lines_per_s_int8": speed["int8"],
                    "int8_speedup": speed["int8"] / speed["fp32"], "ece_before": confidence["ece_before"],
                    "ece_after": confidence["ece_after"]})
    if cross and cross.get("agreement_cer") is not None:
        metrics["judge_agreement_cer"] = cross["agreement_cer"]
    if "tesseract" in baselines:
        metrics.update({f"cer_tesseract_{lang}": v for lang, v in _cer(baselines["tesseract"]).items()})
        metrics["lines_per_s_tesseract"] = baselines["tesseract"]["lines_per_s"]
    tables = {"cer_per_language": [{"language": lang, **{f"{k}_cer": round(_cer(v).get(lang, float("nan")), 4) for k, v in
                                                          {"fp32": fp32, "int8": int8, **{k: v for k, v in baselines.items() if k != "ppocr"}}.items()},
                                    "route": routing["routes"].get(lang, "")} for lang in sorted(_cer(fp32))]}
    models = {"det": shipped["det"], "rec": quantized["path"], "rec_fp32": rec_fp32["path"], "cls": shipped["cls"]}
    registered = ocr_tasks.register(models, routing, {"ppocr": confidence["map"]}, lineage, metrics, tables, review_below)
    gate = promotion_gate(registered, str(flow_run.id), flow_name="ocr-calibrate")
    summary_artifact("ocr-calibrate", f"{registered['name']}/{registered['version']}", {"int8": quantized["path"]},
                               f"gate {'passed' if gate['passed'] else 'refused'}; routes {routing['routes']}")
    return {"model": registered["name"], "version": registered["version"], "gate": gate, "routes": routing["routes"],
            "summary": summary, "registered_before": registered["reused"], "int8_model": str(Path(quantized["path"]))}
