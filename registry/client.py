"""The pieces of registration every model kind shares (DreamBooth, OCR): the MLflow client for the
settings, the registered version's record, lineage as short searchable tags, the code a model ships,
finding a version by tag, and keeping a library's warnings out of the output."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from atelier.kernel.hashing import value_hash
from atelier.kernel.settings import Settings

LINEAGE_HASH_TAG = "atelier.lineage.sha256"  # the sha256 of a version's whole lineage.json
CODE_PARTS = ("kernel", "models", "registry")  # what a model's code imports, below the `atelier` root


@functools.cache
def code_paths() -> list[str]:
    """The packages a model's code imports, shipped in its `code/` folder as one `atelier` package
    (MLflow copies each path by its base name, and the parts live in separate folders of the source
    tree): staged once per process, sources only (MLflow leaves out __pycache__)."""
    import atexit
    import importlib
    import shutil
    import tempfile

    import atelier

    staging = tempfile.TemporaryDirectory(prefix="atelier-code-")
    atexit.register(staging.cleanup)
    root = Path(staging.name) / "atelier"
    root.mkdir()
    shutil.copy2(atelier.__file__, root / "__init__.py")
    for part in CODE_PARTS:
        source = Path(importlib.import_module(f"atelier.{part}").__path__[0])
        shutil.copytree(source, root / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return [str(root)]


TAG_VALUE_LIMIT = 5000  # MLflow's
SHORT_TAG_LIMIT = 200
GATE_INPUTS = ("eval.summary",)  # structured, but the gate reads it from the version


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    run_id: str
    model_uri: str
    reused: bool = False


def client_for(settings: Settings) -> MlflowClient:
    mlflow.set_tracking_uri(settings.resolved_tracking_uri)
    return MlflowClient(settings.resolved_tracking_uri)


def lineage_tags(lineage: dict) -> dict[str, str]:
    """The searchable part of the lineage as MLflow tags: short scalars (revisions, hashes, keys, ids),
    the evaluation summary the gate reads, and the sha256 of the whole lineage. The whole record (file
    hashes, parameters, task versions) is the run's `lineage.json`, which `atelier lineage` reads and
    checks against that hash."""
    tags = {LINEAGE_HASH_TAG: value_hash(lineage)}
    for key, value in lineage.items():
        structured = isinstance(value, (dict, list))
        if structured and key not in GATE_INPUTS:
            continue
        text = json.dumps(value, sort_keys=True) if structured or not isinstance(value, str) else value
        if len(text) <= (TAG_VALUE_LIMIT if key in GATE_INPUTS else SHORT_TAG_LIMIT):
            tags[f"atelier.{key}"] = text
    return tags


@contextlib.contextmanager
def quiet_logger(logger: str):
    """A library logger's WARNING lines kept out of the output while the block runs (errors still show)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def find_version(client: MlflowClient, name: str, tag: str, value: str | None):
    """The newest version of `name` whose tag `tag` equals `value`, or None."""
    if value is None or model_missing(client, name):
        return None
    versions = client.search_model_versions(f"name = '{name}'")
    hits = [v for v in versions if v.tags.get(tag) == value]
    return max(hits, key=lambda v: int(v.version)) if hits else None


def model_missing(client: MlflowClient, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return False
    except MlflowException:
        return True
