"""The OCR engine as an MLflow pyfunc model, registered with its engine spec (routing table, recognisers
and their variants, the one served and the CPU it was chosen on), confidence map and lineage, once per
calibration key.

Artifacts: det.onnx, cls.onnx, rec_fp32.onnx and rec_int8.onnx (PP-OCRv6 small: both kept, the spec
says which serves), rec_charset.txt, ppocrv5.onnx + ppocrv5_charset.txt (the script probe), spec.json,
confidence.json.
Input: a DataFrame with `path` (a document image) and optionally `lang` and `kind` ("line" for a
pre-cropped line, "page" otherwise). Output: text, language, backend, confidence, flagged, lines
(JSON: text, confidence, box). Load it with plain `mlflow.pyfunc.load_model("models:/ocr@champion")`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from atelier.kernel import interrupts
from atelier.kernel.hashing import sha256_file
from atelier.kernel.settings import Settings
from atelier.registry.client import (
    Registered,
    client_for,
    code_paths,
    find_version,
    lineage_tags,
    model_missing,
    quiet_logger,
)
from atelier.registry.ledger import open_ledger
from atelier.registry.model_files import MANIFEST_TAG, record_manifest
from atelier.registry.promotion import record_candidate

MODEL_NAME = "ocr"
MODEL_CODE = Path(__file__).parent / "pyfunc_code" / "ocr_model.py"
EXPERIMENT = "ocr"
PIP_REQUIREMENTS = [
    "onnxruntime==1.32.0",
    "rapidocr-onnxruntime==1.4.4",
    "onnx==1.23.2",
    "opencv-python",
    "pandas",
    "pillow",
    "mlflow==3.17.2",
    "pydantic-settings",
]
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "path"), ColSpec("string", "lang", required=False), ColSpec("string", "kind", required=False)]),
    outputs=Schema(
        [
            ColSpec("string", "path"),
            ColSpec("string", "text"),
            ColSpec("string", "language"),
            ColSpec("string", "backend"),
            ColSpec("double", "confidence"),
            ColSpec("boolean", "flagged"),
            ColSpec("string", "lines"),
            ColSpec("string", "error"),
        ]
    ),
)


class OCRModel(mlflow.pyfunc.PythonModel):
    _skip_type_hint_validation = True

    def __init__(self, review_below: float = 0.5) -> None:
        self.review_below = review_below

    def load_context(self, context) -> None:
        import logging

        from atelier.models.ocr.engine import load_engine
        from atelier.registry.model_files import ModelTampered

        config = context.model_config or {}
        self.review_below = float(config.get("review_below", self.review_below))
        if config.get("artifact_files"):  # each artifact's sha256 as registered: refuse others before reading them
            for name, want in config["artifact_files"].items():
                path = Path(context.artifacts[name])
                if sha256_file(path) != want:
                    raise ModelTampered(
                        f"OCR artifact {name} ({path.name})",
                        "is not the file that was registered",
                        "do not load this version; check who can write the artifact store",
                    )

        a = {k: Path(v) for k, v in context.artifacts.items()}
        glm = os.environ.get("ATELIER_GLM_OCR_WEIGHTS")  # where this machine keeps GLM-OCR, if routed to
        self.engine = load_engine(
            a,
            json.loads(a["spec"].read_text()),
            json.loads(a["confidence"].read_text()),
            self.review_below,
            glm_weights=Path(glm) if glm else None,
            log=logging.getLogger("atelier.ocr").warning,
        )

    def predict(self, context, model_input, params=None):
        from atelier.models.ocr.engine import read_documents

        frame = pd.DataFrame(model_input)
        if "path" not in frame.columns or frame.empty:
            raise ValueError("model input needs a non-empty `path` column")
        rows = [{"path": str(r["path"]), "lang": _opt(r.get("lang")), "kind": _opt(r.get("kind")) or "page"} for _, r in frame.iterrows()]
        return pd.DataFrame(read_documents(self.engine, rows))


def _opt(value):
    return None if value is None or (isinstance(value, float) and pd.isna(value)) or value == "" else str(value)


def register_ocr(
    settings: Settings,
    files: dict[str, Path],
    spec: dict,
    confidence: dict,
    lineage: dict,
    metrics: dict[str, float],
    tables: dict[str, list[dict]],
    review_below: float,
) -> Registered:
    """One MLflow run (experiment `<prefix>-ocr`) with metrics and per-language tables; then a version of `ocr`
    aliased candidate. The same calibration key is registered once."""
    client = client_for(settings)
    experiment = settings.experiment_for(EXPERIMENT)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=settings.artifact_root_for(EXPERIMENT))
    mlflow.set_experiment(experiment)
    lineage = {**lineage, "kind": "ocr", "model.sha256": file_hashes_of(files)}
    tags = lineage_tags(lineage)
    existing = find_version(client, MODEL_NAME, "atelier.calibration.key", lineage.get("calibration.key"))
    if existing is not None:
        return Registered(MODEL_NAME, str(existing.version), existing.run_id, existing.source, reused=True)
    with mlflow.start_run(run_name="ocr-calibrate", tags=tags) as run:
        mlflow.log_metrics(metrics)
        mlflow.log_dict(lineage, "lineage.json")
        mlflow.log_dict(spec, "spec.json")
        for name, rows in tables.items():
            mlflow.log_table(pd.DataFrame(rows), f"tables/{name}.json")
        work = Path(settings.state_dir) / "ocr-artifacts" / lineage.get("calibration.key", "latest")
        work.mkdir(parents=True, exist_ok=True)
        (work / "spec.json").write_text(json.dumps(spec, indent=1))
        (work / "confidence.json").write_text(json.dumps(confidence, indent=1))
        staged = _stage(work / "files", files)
        artifacts = {**{k: str(v) for k, v in staged.items()}, "spec": str(work / "spec.json"), "confidence": str(work / "confidence.json")}
        with warnings.catch_warnings(), quiet_logger("mlflow.pyfunc"):
            warnings.filterwarnings("ignore", message=".*input example.*")
            info = mlflow.pyfunc.log_model(  # as code (registry/pyfunc_code/ocr_model.py), never a pickle
                name="model",
                python_model=str(MODEL_CODE),
                signature=SIGNATURE,
                pip_requirements=PIP_REQUIREMENTS,
                model_config={"review_below": review_below, "artifact_files": {k: sha256_file(Path(v)) for k, v in artifacts.items()}},
                artifacts=artifacts,
                code_paths=code_paths(),
            )
        _, manifest_sha = record_manifest(client, run.info.run_id, info.model_uri)
    if model_missing(client, MODEL_NAME):
        client.create_registered_model(MODEL_NAME, tags={"atelier.kind": "ocr"})
    interrupts.check()  # nothing is registered after a Ctrl-C, even one a finalizer swallowed
    version = client.create_model_version(
        MODEL_NAME, info.model_uri, run_id=run.info.run_id, tags={**tags, MANIFEST_TAG: manifest_sha}, model_id=info.model_id
    )
    record_candidate(client, open_ledger(settings), MODEL_NAME, str(version.version), actor=settings.actor, manifest_sha256=manifest_sha)
    return Registered(MODEL_NAME, str(version.version), run.info.run_id, info.model_uri)


def served_before(settings: Settings, serving_key: str) -> str | None:
    """The variant the newest version with this serving key (the same recognisers timed on the same CPU)
    served, or None when none was registered: `choose` keeps it unless a new timing clearly disagrees."""
    found = find_version(client_for(settings), MODEL_NAME, "atelier.serving.key", serving_key)
    return None if found is None else found.tags.get("atelier.serving.variant")


def _stage(folder: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Each artifact under its spec name (`rec_int8.onnx`, `rec_charset.txt`): MLflow keeps a file's
    own name, and two shipped models are both called rec.onnx."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, path in files.items():
        target = folder / f"{name}{Path(path).suffix}"
        shutil.copyfile(path, target)
        out[name] = target
    return out


def file_hashes_of(models: dict[str, Path]) -> dict[str, str]:
    return {k: sha256_file(Path(v)) for k, v in models.items()}
