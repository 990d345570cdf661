"""VLM judgments on a registered version: the summary as a model-version tag (the gate reads it),
the per-image table (thumbnail, prompt, scores, answer, caption) logged to the version's MLflow run.
The judge's API key never reaches MLflow."""

from __future__ import annotations

import json

import mlflow

from atelier.kernel.settings import Settings
from atelier.registry.client import client_for

JUDGE_TAG = "atelier.eval.judge"


def record_judgment(settings: Settings, name: str, version: str, run_id: str, summary: dict, rows: list[dict]) -> None:
    client = client_for(settings)
    client.set_model_version_tag(name, version, JUDGE_TAG, json.dumps(summary, sort_keys=True, default=str))
    if rows:
        columns = sorted({k for r in rows for k in r} - {"path"})
        table = {c: [r.get(c) for r in rows] for c in columns}
        table["thumbnail"] = [_thumbnail(r.get("path")) for r in rows]  # MLflow shows image columns in its table view
        mlflow.log_table(table, artifact_file="judge/judgments.json", run_id=run_id)
    metrics = {f"validation/judge_{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)


def recorded_judgment(settings: Settings, name: str, version: str) -> dict | None:
    """The judgement summary on the version's card, or None."""
    tag = client_for(settings).get_model_version(name, version).tags.get(JUDGE_TAG)
    return json.loads(tag) if tag else None


def _thumbnail(path: str | None):
    from pathlib import Path

    from PIL import Image

    if not path or not Path(path).is_file():
        return None
    with Image.open(path) as opened:
        thumbnail = opened.convert("RGB")
        thumbnail.thumbnail((128, 128))
        return thumbnail
