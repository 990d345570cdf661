"""What the registry holds, for people: every model (or one customer's), its versions with their aliases,
the gate's verdict and whether their stored files were found damaged."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from atelier.registry.model_files import DAMAGED_TAG


def catalog(client: MlflowClient, customer: str | None = None) -> list[dict]:
    """[{name, customer, kind, versions: [{version, aliases, verdict, created}]}], by name; versions newest first."""
    query = f"tags.`atelier.customer` = '{customer}'" if customer else ""
    models = []
    for rm in sorted(client.search_registered_models(query, max_results=1000), key=lambda m: m.name):
        versions = sorted(client.search_model_versions(f"name = '{rm.name}'"), key=lambda v: -int(v.version))
        by_version: dict[str, list[str]] = {}  # (a search leaves versions' aliases empty: the model has them)
        for alias, version in (client.get_registered_model(rm.name).aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        models.append(
            {
                "name": rm.name,
                "customer": rm.tags.get("atelier.customer", ""),
                "kind": rm.tags.get("atelier.kind", ""),
                "versions": [
                    {
                        "version": str(v.version),
                        "aliases": sorted(by_version.get(str(v.version), [])),
                        "verdict": _verdict(v.tags),
                        "created": v.creation_timestamp,
                    }
                    for v in versions
                ],
            }
        )
    return models


def _verdict(tags: dict) -> str:
    if tags.get(DAMAGED_TAG):
        return "damaged"
    gate = tags.get("atelier.gate")
    if gate is None:
        return "not gated"
    try:
        return "passed" if json.loads(gate).get("passed") else "refused"
    except ValueError:
        return "unreadable gate tag"
