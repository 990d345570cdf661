"""Lineage: from a registered version back to its run, flow run, data, base model, priors and code,
with every promotion and rollback of the model; `verify` re-hashes what can be reached."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from atelier.kernel.errors import NotFound
from atelier.kernel.hashing import tree_hash, value_hash
from atelier.kernel.settings import Settings
from atelier.kernel.workspace import checkout_subject
from atelier.registry.client import LINEAGE_HASH_TAG, client_for
from atelier.registry.ledger import Ledger


def resolve(client: MlflowClient, ref: str):
    """NAME@ALIAS or NAME/VERSION -> the model version; a miss says what does exist."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
    else:
        raise NotFound(
            f"model reference {ref!r}",
            "is neither NAME@ALIAS nor NAME/VERSION",
            "write e.g. dreambooth-acme-robot@champion or dreambooth-acme-robot/3",
        )
    try:
        return client.get_model_version_by_alias(name, alias) if "@" in ref else client.get_model_version(name, version)
    except MlflowException:
        pass
    try:
        versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    except MlflowException:
        versions = []
    if not versions:
        import difflib

        try:
            known = [m.name for m in client.search_registered_models(max_results=500)]
        except MlflowException:
            known = []
        close = difflib.get_close_matches(name, known, n=3)
        raise NotFound(
            f"model {name}",
            "is not in the registry" + (f" (did you mean {', '.join(close)}?)" if close else ""),
            "check the name with `atelier ledger show` or the MLflow UI",
        ) from None
    listed = ", ".join(f"{v.version}" + (" (refused by the gate)" if "atelier.refused" in v.tags else "") for v in versions[-5:])
    what = f"has no alias {alias!r}" if "@" in ref else f"has no version {version}"
    raise NotFound(
        f"model {ref}",
        f"{what}; its versions: {listed}",
        f"pick one explicitly, e.g. {name}/{versions[-1].version}, or promote one: atelier promote {name} VERSION --reason ...",
    ) from None


def _value(text: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _record(client: MlflowClient, mv) -> tuple[dict, bool | None]:
    """The version's whole lineage: its run's `lineage.json`, and whether it still hashes to the
    `atelier.lineage.sha256` tag written with it (None: a version registered before that tag)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            record = json.loads(Path(client.download_artifacts(mv.run_id, "lineage.json", tmp)).read_text())
        except (MlflowException, OSError, ValueError):
            return {}, False if mv.tags.get(LINEAGE_HASH_TAG) else None
    want = mv.tags.get(LINEAGE_HASH_TAG)
    return record, (value_hash(record) == want) if want else None


def lineage(client: MlflowClient, ledger: Ledger, ref: str) -> dict:
    mv = resolve(client, ref)
    record, intact = _record(client, mv)
    # the tags carry what was added after registration (gate, judge) and, on older versions, everything
    tags = {**{k.removeprefix("atelier."): _value(v) for k, v in mv.tags.items() if k.startswith("atelier.")}, **record}
    run = client.get_run(mv.run_id)
    return {
        "model": mv.name,
        "version": str(mv.version),
        "aliases": list(mv.aliases or []),
        "source": mv.source,
        "customer": tags.get("customer"),
        "subject": tags.get("subject"),
        "model_sha256": tags.get("model.sha256"),
        "run": {
            "id": run.info.run_id,
            "status": run.info.status,
            "experiment_id": run.info.experiment_id,
            "start_time": run.info.start_time,
            "end_time": run.info.end_time,
            "artifact_uri": run.info.artifact_uri,
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
        },
        "prefect_flow_run": {
            "id": tags.get("prefect.flow_run_id"),
            "flow": tags.get("flow.name"),
            "flow_version": tags.get("flow.version"),
            "task_versions": tags.get("task_versions"),
        },
        "data": {
            "rev": tags.get("data.rev"),
            "dvc_md5": tags.get("data.dvc_md5"),
            "files": tags.get("data.files"),
            "validation_report": tags.get("data.validation_report"),
        },
        "base_model": {"id": tags.get("base_model.id"), "sha256": tags.get("base_model.sha256")},
        "class_priors": {"key": tags.get("class_priors.key"), "sha256": tags.get("class_priors.sha256")},
        "code": {"git_sha": tags.get("code.git_sha"), "dirty": tags.get("code.dirty"), "version": tags.get("code.version")},
        "evaluation": {"summary": tags.get("eval.summary"), "gate": tags.get("gate")},
        "training_key": tags.get("training.key"),
        "params": tags.get("params"),
        "lineage_record": {"artifact": "lineage.json", "sha256_matches_tag": intact},
        "promotions": [r.as_dict() for r in ledger.rows(mv.name)],
    }


def verify(settings: Settings, report: dict) -> list[str]:
    """Re-hash the model artifacts, the input photos at their revision, the base model and the class
    priors; return one line per drift (empty: everything matches)."""
    from atelier.models.dreambooth.base import model_hash  # diffusers and torch: only where a subject model is verified
    from atelier.models.dreambooth.priors import prior_images_hash

    drift: list[str] = []
    if report.get("lineage_record", {}).get("sha256_matches_tag") is False:
        drift.append(f"lineage.json: missing, or changed since registration (its sha256 differs from the version's {LINEAGE_HASH_TAG} tag)")
    from atelier.registry.ledger import open_ledger
    from atelier.registry.model_files import ModelTampered, verified_copy

    with tempfile.TemporaryDirectory() as tmp:
        try:  # every stored file (weights, MLmodel, wrapper code, code/, requirements) against the ledger's manifest
            with verified_copy(client_for(settings), open_ledger(settings), report["model"], report["version"]) as local:
                got = tree_hash(local / "artifacts" / "pipeline")
                if got != report["model_sha256"]:
                    drift.append(f"model artifacts: sha256 {got[:16]} differs from the registered {str(report['model_sha256'])[:16]}")
        except ModelTampered as exc:
            drift.append(f"model files: {exc.problem}")
        data = report["data"]
        if data.get("rev"):
            snap = checkout_subject(settings, report["customer"], report["subject"], data["rev"], Path(tmp) / "data")
            for name in sorted(set(snap.files) | set(data["files"] or {})):
                want, have = (data["files"] or {}).get(name), snap.files.get(name)
                if want != have:
                    drift.append(
                        f"input {name}: " + ("missing" if have is None else "not in the lineage" if want is None else "content changed")
                    )
    base = report["base_model"]
    base_dir = settings.tiny_model_dir if str(base.get("id", "")).startswith("atelier/tiny-sd") else Path(str(base.get("id")))
    if base_dir.is_dir():
        if model_hash(base_dir) != base.get("sha256"):
            drift.append(f"base model {base_dir}: content changed since training")
    else:
        drift.append(f"base model {base_dir}: not reachable here, not checked")
    priors = report["class_priors"]
    if priors.get("key") and priors["key"] != "none":
        folder = settings.priors_cache / priors["key"]
        if not folder.is_dir():
            drift.append(f"class priors {priors['key']}: not in this machine's cache, not checked")
        elif prior_images_hash(folder) != priors.get("sha256"):
            drift.append(f"class priors {priors['key']}: content changed since training")
    return drift
