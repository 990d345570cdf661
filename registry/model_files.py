"""Every file of a registered model version, hashed at registration and checked before anything loads it.

A registered MLflow model is more than weights: `MLmodel`, the wrapper's code (models-from-code, see
registry/pyfunc_code/), the `code/` folder MLflow puts on `sys.path` when it loads, requirements. Whoever
can write the artifact store could change any of them, and loading would run what they wrote. So at
registration the platform hashes every stored file into a manifest (`model_manifest.json`, an artifact of
the version's run); the manifest's sha256 is a version tag and is written into the version's signed
`candidate` ledger row, which the artifact store cannot change. Before the platform loads a version
(`generate`, batch flows, OCR serving) it downloads the version, checks every file against the manifest
the ledger vouches for, and loads that checked copy; any missing, extra or changed file is exit 5,
named. `atelier lineage --verify` runs the same check.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlflow import MlflowClient

from atelier.kernel.errors import AtelierError
from atelier.kernel.hashing import sha256_file
from atelier.kernel.storage import write_text_atomic

MANIFEST = "model_manifest.json"
MANIFEST_TAG = "atelier.model.manifest.sha256"
DAMAGED_TAG = "atelier.artifacts.damaged"  # set when a rerun found a version's stored files missing or changed
# model_config keys under which the wrappers keep their files' hashes, to check them on any load (registry/pyfunc.py,
# registry/ocr.py); a copy that verified_copy checked already is loaded with them unset, so no file is hashed twice
SELF_CHECK_KEYS = ("pipeline_files", "artifact_files")


class ModelTampered(AtelierError):
    """A registered version's stored files are not the ones registered: exit 5, like a tampered ledger."""

    exit_code = 5


# written by MLflow's downloader itself into a copy of models:/NAME/VERSION (the name and version it was fetched as);
# it is not a stored file of the model
DOWNLOADER_FILES = frozenset({"registered_model_meta"})


def manifest_of(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder`."""
    files = {p.relative_to(folder).as_posix(): p for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    return {rel: sha256_file(p) for rel, p in files.items() if rel not in DOWNLOADER_FILES}


def manifest_hash(manifest: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record_manifest(client: MlflowClient, run_id: str, model_uri: str) -> tuple[dict[str, str], str]:
    """Download the just-logged model, hash every file, log the manifest to the run; (manifest, its sha256)."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="atelier-manifest-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(Path(tmp) / "model")))
        manifest = manifest_of(local)
        path = Path(tmp) / MANIFEST
        write_text_atomic(path, json.dumps(manifest, indent=1, sort_keys=True))
        client.log_artifact(run_id, str(path))
    return manifest, manifest_hash(manifest)


def vouched_hash(ledger, name: str, version: str) -> str | None:
    """The manifest hash the version's signed `candidate` ledger row carries (None: registered before manifests)."""
    for row in reversed(ledger.rows(name)):
        if row.version == str(version) and row.action == "candidate":
            return json.loads(row.metrics or "{}").get("manifest_sha256")
    return None


def check_files(local: Path, manifest: dict[str, str], what: str) -> None:
    """Refuse (exit 5) a downloaded model whose files differ from `manifest`, naming the first few."""
    have = manifest_of(local)
    problems = [f"{p}: changed" for p in sorted(manifest) if p in have and have[p] != manifest[p]]
    problems += [f"{p}: missing" for p in sorted(manifest) if p not in have]
    problems += [f"{p}: not registered (added later)" for p in sorted(have) if p not in manifest]
    if problems:
        raise ModelTampered(
            what,
            f"{len(problems)} stored file(s) differ from what was registered ({'; '.join(problems[:5])})",
            "do not load it: restore the files from a backup, or retrain to register a new version; then check "
            "who can write the artifact store",
        )


@contextmanager
def verified_copy(client: MlflowClient, ledger, name: str, version: str) -> Iterator[Path]:
    """A local copy of `name`/`version` whose every file matches the manifest its ledger row vouches for."""
    import mlflow.artifacts

    what = f"model {name}/{version}"
    want = vouched_hash(ledger, name, version)
    mv = client.get_model_version(name, str(version))
    if want is None:
        raise ModelTampered(
            what,
            "has no file manifest in the ledger (registered before manifests, or not by Atelier)",
            "register it again (rerun its fine-tune or calibration); only versions whose files the ledger vouches for are loaded",
        )
    if mv.tags.get(MANIFEST_TAG) != want:
        raise ModelTampered(
            what, "carries a manifest tag that is not the one its ledger row vouches for", "check who can write the registry"
        )
    if not mv.run_id:
        raise ModelTampered(what, "has no MLflow run, so no manifest of its files", "register it again with Atelier")
    manifest = vouched_manifest(client, mv, want, "check who can write the artifact store; do not load this version")
    with tempfile.TemporaryDirectory(prefix="atelier-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(Path(tmp) / "model")))
        check_files(local, manifest, what)
        yield local


def vouched_manifest(client: MlflowClient, mv, want: str, fix: str) -> dict[str, str]:
    """The version's stored manifest, refused (exit 5) unless it is the one whose sha256 the ledger vouches for."""
    what = f"model {mv.name}/{mv.version}"
    with tempfile.TemporaryDirectory(prefix="atelier-manifest-") as tmp:
        try:
            manifest = json.loads(Path(client.download_artifacts(mv.run_id, MANIFEST, tmp)).read_text())
        except (OSError, ValueError) as exc:
            raise ModelTampered(what, f"its file manifest is unreadable ({exc.__class__.__name__})", fix) from None
    if manifest_hash(manifest) != want:
        raise ModelTampered(f"{what} ({MANIFEST})", "is not the manifest that was registered (its sha256 differs from the ledger's)", fix)
    return manifest


def stored_model_files(client: MlflowClient, mv) -> dict[str, int | None]:
    """Every file of a version's stored MLflow model (relative path -> size), read from the artifact store."""
    from mlflow.store.artifact.artifact_repository_registry import (
        get_artifact_repository,
    )

    source = mv.source or ""
    model_id = mv.model_id or (source.split("/")[-1] if source.startswith("models:/m-") else None)
    location = (
        client.get_logged_model(model_id).artifact_location if model_id else client.get_model_version_download_uri(mv.name, mv.version)
    )
    repo = get_artifact_repository(location)
    files: dict[str, int | None] = {}
    pending: list[str | None] = [None]
    while pending:
        for info in repo.list_artifacts(pending.pop()):
            if info.is_dir:
                pending.append(info.path)
            else:
                files[info.path] = info.file_size
    return files


def refuse_damaged(client: MlflowClient, ledger, mv) -> None:
    """Before a version becomes champion (promote, rollback): exit 5 if it was marked damaged, or if a file
    its manifest names is no longer stored (a listing, not a download: contents are checked when it loads).
    A version registered before manifests has nothing to compare with and passes."""
    what = f"model {mv.name}/{mv.version}"
    fix = "promote or roll back to another version (atelier ledger show names them), or rerun its fine-tune to register it again"
    if mv.tags.get(DAMAGED_TAG):
        raise ModelTampered(what, f"is marked damaged ({mv.tags[DAMAGED_TAG]})", fix)
    want = vouched_hash(ledger, mv.name, str(mv.version))
    if want is None or not mv.run_id:
        return
    manifest = vouched_manifest(client, mv, want, fix)
    stored = stored_model_files(client, mv)
    missing = sorted(p for p in manifest if p not in stored)
    if missing:
        raise ModelTampered(what, f"{len(missing)} registered file(s) are no longer stored (first: {missing[0]})", fix)
