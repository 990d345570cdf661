"""Promotion and rollback: every alias move goes through the gate and the ledger.

The alias moves inside the ledger's transaction: if the move fails nothing is written, and if the
write fails the alias is put back. Readers resolve `NAME@champion` in one registry call, so they see
either the old or the new version, never a mix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from atelier.errors import GateRefused, NotFound
from atelier.settings import GateRules
from models.dreambooth.health import Health
from registry.gate import CANDIDATE, CHAMPION, GateResult, evaluate_judge, evaluate_ocr, evaluate_training_health
from registry.judge import JUDGE_TAG
from registry.ledger import Ledger, LedgerRow

ANCHOR_TAG = "atelier.ledger.head"


@dataclass(frozen=True)
class Promotion:
    model: str
    version: str
    passed: bool
    reasons: list[str]
    champion: str | None  # after the call
    row: LedgerRow


def current_alias(client: MlflowClient, name: str, alias: str = CHAMPION) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def model_version(client: MlflowClient, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise NotFound(f"model {name} version {version}", "is not in the registry",
                       "check the name and version with `atelier lineage NAME@champion` or the MLflow UI") from None


def gate_for(mv, rules: GateRules) -> tuple[GateResult, dict]:
    summary = json.loads(mv.tags.get("atelier.eval.summary") or "{}")
    if not summary:
        raise NotFound(f"model {mv.name} version {mv.version}", "has no evaluation summary (atelier.eval.summary tag)",
                       "register it through the subject-finetune flow so the gate has evidence")
    if mv.tags.get("atelier.kind") == "ocr":
        return evaluate_ocr(summary, rules.ocr), summary
    result = evaluate_training_health(Health(**summary), rules)
    judged = json.loads(mv.tags.get(JUDGE_TAG) or "{}")
    if judged:
        checks = result.checks + evaluate_judge(judged, rules.judge)
        result = GateResult(all(c.passed for c in checks), checks)
        summary = {**summary, "judge": judged}
    return result, summary


def _move(client: MlflowClient, name: str, alias: str, version: str, previous: str | None) -> callable:
    def move(row: LedgerRow) -> None:
        client.set_registered_model_alias(name, alias, version)
        try:
            client.set_registered_model_tag(name, ANCHOR_TAG, f"{row.seq}:{row.row_hash}")
        except Exception:
            if previous is not None:
                client.set_registered_model_alias(name, alias, previous)
            else:
                client.delete_registered_model_alias(name, alias)
            raise

    return move


def promote(client: MlflowClient, ledger: Ledger, name: str, version: str, *, actor: str, reason: str, rules: GateRules,
            flow_run_id: str | None = None, action: str = "promote") -> Promotion:
    """Gate `version`; if it passes, make it champion. Either way, one ledger row says what happened."""
    mv = model_version(client, name, version)
    result, summary = gate_for(mv, rules)
    previous = current_alias(client, name)
    client.set_model_version_tag(name, str(version), "atelier.gate", result.as_json())
    gate = json.loads(result.as_json())
    from_alias = CANDIDATE if CANDIDATE in (mv.aliases or []) else None
    if not result.passed:
        row = ledger.append(model=name, version=str(version), action="refuse", actor=actor, reason=reason, gate=gate,
                            metrics=summary, from_alias=from_alias, to_alias=None, replaced_version=previous,
                            flow_run_id=flow_run_id, before_commit=_anchor(client, name))
        return Promotion(name, str(version), False, result.reasons, previous, row)
    row = ledger.append(model=name, version=str(version), action=action, actor=actor, reason=reason, gate=gate,
                        metrics=summary, from_alias=from_alias, to_alias=CHAMPION, replaced_version=previous,
                        flow_run_id=flow_run_id, before_commit=_move(client, name, CHAMPION, str(version), previous))
    return Promotion(name, str(version), True, [], str(version), row)


def _anchor(client: MlflowClient, name: str):
    return lambda row: client.set_registered_model_tag(name, ANCHOR_TAG, f"{row.seq}:{row.row_hash}")


def rollback(client: MlflowClient, ledger: Ledger, name: str, *, actor: str, reason: str, rules: GateRules) -> Promotion:
    """Move champion back to the version it replaced, through the gate and the ledger."""
    current = current_alias(client, name)
    if current is None:
        raise NotFound(f"model {name}", "has no champion to roll back", "promote a version first: atelier promote NAME VERSION")
    made_current = [r for r in ledger.rows(name) if r.to_alias == CHAMPION and r.version == current]
    if not made_current or made_current[-1].replaced_version is None:
        raise NotFound(f"model {name}", f"has no champion before version {current} in the ledger",
                       "promote the version you want explicitly: atelier promote NAME VERSION --reason ...")
    target = made_current[-1].replaced_version
    done = promote(client, ledger, name, target, actor=actor, reason=reason, rules=rules, action="rollback")
    if not done.passed:
        raise GateRefused(f"rollback of {name} to version {target}", "; ".join(done.reasons), "fix the gate rules or promote another version")
    return done


def anchors(client: MlflowClient, models: list[str]) -> dict[str, str]:
    """model -> the ledger head recorded on the registered model (missing tags count as empty)."""
    out = {}
    for name in models:
        try:
            out[name] = client.get_registered_model(name).tags.get(ANCHOR_TAG, "")
        except MlflowException:
            out[name] = ""
    return out
