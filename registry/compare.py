"""Two registered versions side by side: what changed between them (parameters, metrics, the photos
file by file, base model, class priors, code) and how the gate judged each. Built from each version's
lineage (registry/lineage.py), so it compares what the registry and the ledger vouch for."""

from __future__ import annotations

from mlflow import MlflowClient

from atelier.registry.ledger import Ledger
from atelier.registry.lineage import lineage


def compare(client: MlflowClient, ledger: Ledger, a: str, b: str) -> dict:
    return difference(lineage(client, ledger, a), lineage(client, ledger, b))


def difference(a: dict, b: dict) -> dict:
    """The differences between two lineage reports; equal values are left out."""

    def pairs(x: dict, y: dict) -> dict:
        return {k: [x.get(k), y.get(k)] for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}

    params = pairs({**(a["run"]["params"] or {}), **(a.get("params") or {})}, {**(b["run"]["params"] or {}), **(b.get("params") or {})})
    metrics = {}
    for key in sorted(set(a["run"]["metrics"]) | set(b["run"]["metrics"])):
        x, y = a["run"]["metrics"].get(key), b["run"]["metrics"].get(key)
        if x != y:
            metrics[key] = [x, y, (y - x) if isinstance(x, (int, float)) and isinstance(y, (int, float)) else None]
    files_a, files_b = a["data"]["files"] or {}, b["data"]["files"] or {}
    return {
        "a": f"{a['model']}/{a['version']}",
        "b": f"{b['model']}/{b['version']}",
        "params": params,
        "metrics": metrics,
        "data": {
            "rev": [a["data"]["rev"], b["data"]["rev"]],
            "added": sorted(set(files_b) - set(files_a)),
            "removed": sorted(set(files_a) - set(files_b)),
            "changed": sorted(n for n in set(files_a) & set(files_b) if files_a[n] != files_b[n]),
        },
        "inputs": pairs(
            {"base_model": a["base_model"]["sha256"], "class_priors": a["class_priors"]["key"], "code": a["code"]["git_sha"]},
            {"base_model": b["base_model"]["sha256"], "class_priors": b["class_priors"]["key"], "code": b["code"]["git_sha"]},
        ),
        "gate": [(a["evaluation"]["gate"] or {}).get("passed"), (b["evaluation"]["gate"] or {}).get("passed")],
        "aliases": [a["aliases"], b["aliases"]],
    }
