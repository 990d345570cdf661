"""Serving side of the registry: pin NAME@ALIAS to one version and load it through MLflow's pyfunc
(so models come back from whatever artifact store the tracking server uses: a folder or S3)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from atelier.kernel.settings import Settings
from atelier.registry.client import client_for
from atelier.registry.isolation import require_owner
from atelier.registry.lineage import resolve


@dataclass(frozen=True)
class Pinned:
    """One registered version, resolved once from what the user asked for (`ref`: NAME@ALIAS or NAME/VERSION)."""

    ref: str
    name: str
    version: str
    model: str  # NAME/VERSION, as outputs and logs name it


def pin(settings: Settings, ref: str, customer: str | None = None) -> Pinned:
    """One version for the whole run; refuses a model of another customer."""
    client = client_for(settings)
    mv = resolve(client, ref)
    if customer:
        require_owner(client, mv.name, customer)
    return Pinned(ref, mv.name, str(mv.version), f"{mv.name}/{mv.version}")


def load_pyfunc(settings: Settings, name: str, version: str):
    """The registered version as MLflow's PyFuncModel, loaded from a local copy whose every file matches the
    manifest its signed ledger row vouches for (registry/model_files.py): a changed weight, MLmodel, wrapper
    or `code/` file is exit 5 before anything of it runs."""
    import sys

    import mlflow.pyfunc
    from mlflow.models import Model

    from atelier.registry import legacy_names
    from atelier.registry.model_files import SELF_CHECK_KEYS

    path = list(sys.path)
    with checked_copy(settings, name, version) as local:
        if legacy_names.is_legacy_layout(local / "code"):  # registered before the one import root
            legacy_names.install()
        config = Model.load(str(local)).flavors["python_function"].get("config") or {}
        checked = {key: None for key in SELF_CHECK_KEYS if key in config}  # every file was just checked: not again
        try:
            # the model's pip requirements are the lock's; MLflow's comparison against this environment only prints noise
            return mlflow.pyfunc.load_model(str(local), suppress_warnings=True, model_config=checked or None)
        finally:
            sys.path[:] = path  # MLflow prepends the model's code/: the platform keeps importing its own installed code


@contextlib.contextmanager
def checked_copy(settings: Settings, name: str, version: str) -> Iterator[Path]:
    """A local copy of the version whose every file matches the manifest its ledger row vouches for
    (what `atelier serve` hands to MLflow's scoring server), removed afterwards."""
    from atelier.registry.ledger import open_ledger
    from atelier.registry.model_files import verified_copy

    with verified_copy(client_for(settings), open_ledger(settings), name, version) as local:
        yield local


def load_python_model(settings: Settings, name: str, version: str):
    """The registered pyfunc's own Python object (DreamBoothModel, OCRModel) with its context loaded."""
    return load_pyfunc(settings, name, version).unwrap_python_model()


def load_ocr_engine(settings: Settings, ref: str):
    """(model version, the routed OCR engine) of a registered OCR model, pinned: NAME@ALIAS resolves
    once. A model that is not an OCR engine is refused by name."""
    from atelier.kernel.errors import NotFound

    mv = resolve(client_for(settings), ref)
    if mv.tags.get("atelier.kind") != "ocr":
        raise NotFound(f"model {mv.name}/{mv.version}", "is not an OCR model", "pass an OCR model, e.g. --model ocr@champion")
    return mv, load_python_model(settings, mv.name, str(mv.version)).engine
