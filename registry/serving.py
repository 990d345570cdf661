"""Serving side of the registry: pin NAME@ALIAS to one version and load it through MLflow's pyfunc
(so models come back from whatever artifact store the tracking server uses: a folder or S3)."""

from __future__ import annotations

from atelier.settings import Settings
from registry.dreambooth import client_for
from registry.isolation import require_owner
from registry.lineage import resolve


def pin(settings: Settings, ref: str, customer: str | None = None) -> dict:
    """One version for the whole run; refuses a model of another customer."""
    client = client_for(settings)
    mv = resolve(client, ref)
    if customer:
        require_owner(client, mv.name, customer)
    return {"ref": ref, "name": mv.name, "version": str(mv.version), "model": f"{mv.name}/{mv.version}"}


def load_python_model(settings: Settings, name: str, version: str):
    """The registered pyfunc's own Python object (DreamBoothModel, OCRModel) with its context loaded."""
    import mlflow.pyfunc

    client_for(settings)  # sets the tracking URI
    return mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model()
