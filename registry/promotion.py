"""Promotion and rollback: every alias move goes through the gate and the ledger.

A champion move is three steps, each durable before the next: an `intent` row, the alias move in
MLflow, then the confirming row (`promote`, `rollback` or `restore`). A process killed between any two
leaves an open intent, which `reconcile()` (run by the next promotion, `ledger verify` and `atelier
audit`) settles by looking at MLflow: the alias moved, so the intent is confirmed; it did not, so it is
abandoned. No crash point leaves an alias move that the ledger does not explain. Candidate moves are
`candidate` rows, and a refused version loses `candidate` (and is tagged `atelier.refused`). Readers
resolve `NAME@champion` in one registry call, so they see the old or the new version, never a mix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from atelier.kernel import interrupts
from atelier.kernel.errors import GateRefused, NotFound
from atelier.kernel.settings import GateRules
from atelier.models.dreambooth.health import Health
from atelier.registry.gate import (
    CANDIDATE,
    CHAMPION,
    GateResult,
    evaluate_challenger,
    evaluate_judge,
    evaluate_ocr,
    evaluate_training_health,
)
from atelier.registry.judge import JUDGE_TAG
from atelier.registry.ledger import CONFIRMS, Ledger, LedgerRow, aliases
from atelier.registry.ledger_anchor import AnchorStore, append, require_intact
from atelier.registry.model_files import refuse_damaged

REFUSED_TAG = "atelier.refused"


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
        raise NotFound(
            f"model {name} version {version}",
            "is not in the registry",
            "check the name and version with `atelier lineage NAME@champion` or the MLflow UI",
        ) from None


def gate_for(mv, rules: GateRules) -> tuple[GateResult, dict]:
    summary = json.loads(mv.tags.get("atelier.eval.summary") or "{}")
    if not summary:
        raise NotFound(
            f"model {mv.name} version {mv.version}",
            "has no evaluation summary (atelier.eval.summary tag)",
            "register it through the subject-finetune flow so the gate has evidence",
        )
    if mv.tags.get("atelier.kind") == "ocr":
        return evaluate_ocr(summary, rules.ocr), summary
    result = evaluate_training_health(Health(**summary), rules)
    judged = json.loads(mv.tags.get(JUDGE_TAG) or "{}")
    if judged:
        checks = result.checks + evaluate_judge(judged, rules.judge)
        result = GateResult(all(c.passed for c in checks), checks)
        summary = {**summary, "judge": judged}
    return result, summary


def move_champion(
    client: MlflowClient,
    ledger: Ledger,
    name: str,
    version: str,
    *,
    action: str,
    actor: str,
    reason: str,
    gate: dict | None = None,
    metrics: dict | None = None,
    from_alias: str | None = None,
    flow_run_id: str | None = None,
) -> LedgerRow:
    """intent row -> alias move -> confirming row (`action`)."""
    previous = current_alias(client, name)
    common = dict(
        model=name,
        version=str(version),
        actor=actor,
        gate=gate,
        metrics=metrics,
        from_alias=from_alias,
        to_alias=CHAMPION,
        replaced_version=previous,
        flow_run_id=flow_run_id,
    )
    interrupts.check()  # a Ctrl-C that a finalizer swallowed still stops a promotion before its first row
    append(client, ledger, action="intent", reason=f"{action}: {reason}", **common)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return append(client, ledger, action=action, reason=reason, **common)


def record_candidate(
    client: MlflowClient,
    ledger: Ledger,
    name: str,
    version: str,
    *,
    actor: str,
    flow_run_id: str | None = None,
    manifest_sha256: str | None = None,
) -> None:
    """Make `version` the candidate, with its ledger row (once: a retry only puts the alias back). The
    row carries the sha256 of the version's file manifest (registry/model_files.py): signed, it is what
    vouches for the stored files."""
    from atelier.registry.audit import reconcile

    reconcile(client, ledger, name)
    if aliases(ledger.rows(name)).candidate != str(version):
        append(
            client,
            ledger,
            model=name,
            version=str(version),
            action="candidate",
            actor=actor,
            reason="registered",
            to_alias=CANDIDATE,
            replaced_version=current_alias(client, name, CANDIDATE),
            flow_run_id=flow_run_id,
            metrics={"manifest_sha256": manifest_sha256} if manifest_sha256 else {},
        )
    client.set_registered_model_alias(name, CANDIDATE, str(version))


def promote(
    client: MlflowClient,
    ledger: Ledger,
    name: str,
    version: str,
    *,
    actor: str,
    reason: str,
    rules: GateRules,
    flow_run_id: str | None = None,
    action: str = "promote",
) -> Promotion:
    """Gate `version`; if it passes, make it champion. Either way, the ledger says what happened."""
    from atelier.registry.audit import reconcile

    reconcile(client, ledger, name)
    rows, previous = ledger.rows(name), current_alias(client, name)
    if action == "promote" and previous == str(version) and aliases(rows).champion == str(version):
        # already the champion, by the ledger and in MLflow (a cached rerun): nothing moves, so nothing is written,
        # but a ledger that was tampered with is still reported, as a move would report it
        require_intact(AnchorStore(client), ledger)
        confirmed = [r for r in rows if r.action in CONFIRMS and r.to_alias == CHAMPION and r.version == str(version)]
        return Promotion(name, str(version), True, [], str(version), confirmed[-1])
    mv = model_version(client, name, version)
    refuse_damaged(client, ledger, mv)  # a version whose files are gone never becomes champion (exit 5)
    result, summary = gate_for(mv, rules)
    if action == "promote" and previous not in (None, str(version)) and mv.tags.get("atelier.kind") != "ocr":
        result = _against_champion(client, name, previous, result, summary, rules)
    client.set_model_version_tag(name, str(version), "atelier.gate", result.as_json())
    gate = json.loads(result.as_json())
    from_alias = CANDIDATE if CANDIDATE in (mv.aliases or []) else None
    if not result.passed:
        last = _latest_verdict(rows, str(version))
        if (
            action == "promote"
            and last is not None
            and last.action == "refuse"
            and last.replaced_version == previous
            and json.loads(last.gate or "{}") == gate
        ):
            return Promotion(name, str(version), False, result.reasons, previous, last)  # the same refusal again: nothing to add
        row = append(
            client,
            ledger,
            model=name,
            version=str(version),
            action="refuse",
            actor=actor,
            reason=reason,
            gate=gate,
            metrics=summary,
            from_alias=from_alias,
            to_alias=None,
            replaced_version=previous,
            flow_run_id=flow_run_id,
        )
        client.set_model_version_tag(name, str(version), REFUSED_TAG, "; ".join(result.reasons)[:4000])
        if from_alias == CANDIDATE:  # a refused version is nobody's candidate
            client.delete_registered_model_alias(name, CANDIDATE)
        return Promotion(name, str(version), False, result.reasons, previous, row)
    row = move_champion(
        client,
        ledger,
        name,
        str(version),
        action=action,
        actor=actor,
        reason=reason,
        gate=gate,
        metrics=summary,
        from_alias=from_alias,
        flow_run_id=flow_run_id,
    )
    return Promotion(name, str(version), True, [], str(version), row)


def _latest_verdict(rows: list[LedgerRow], version: str) -> LedgerRow | None:
    verdicts = [r for r in rows if r.version == version and (r.action == "refuse" or r.action in CONFIRMS)]
    return verdicts[-1] if verdicts else None


def _against_champion(client: MlflowClient, name: str, champion: str, result: GateResult, summary: dict, rules: GateRules) -> GateResult:
    """Add the champion/challenger checks (registry/gate.evaluate_challenger) to a version's gate result."""
    try:
        _, theirs = gate_for(model_version(client, name, champion), rules)
    except NotFound:  # a champion with no evaluation (made outside the flow): nothing to compare with
        return result
    checks = result.checks + evaluate_challenger(summary, theirs, champion, rules.challenger)
    return GateResult(all(c.passed for c in checks), checks)


def rollback_target(rows: list[LedgerRow], current: str) -> str | None:
    """The newest earlier champion that is still good: not the current one, not one a rollback removed,
    not one whose latest verdict was a refusal."""
    rolled_back = {r.replaced_version for r in rows if r.action == "rollback" and r.to_alias == CHAMPION and r.replaced_version}
    verdict: dict[str, str] = {}
    for r in rows:
        if r.action == "refuse" or (r.action in CONFIRMS and r.to_alias == CHAMPION):
            verdict[r.version] = r.action
    champions = [r.version for r in rows if r.action in CONFIRMS and r.to_alias == CHAMPION]
    for version in reversed(champions):
        if version != current and version not in rolled_back and verdict.get(version) != "refuse":
            return version
    return None


def rollback(
    client: MlflowClient, ledger: Ledger, name: str, *, actor: str, reason: str, rules: GateRules, to: str | None = None
) -> Promotion:
    """Move champion back to the last good version before it (or to `to`, named), through the gate and the
    ledger. Versions that were rolled back or refused are skipped, so a rollback of a rollback never
    quietly brings back what was rolled back."""
    current = current_alias(client, name)
    if current is None:
        raise NotFound(f"model {name}", "has no champion to roll back", "promote a version first: atelier promote NAME VERSION")
    target = str(to) if to is not None else rollback_target(ledger.rows(name), current)
    if target is None:
        raise NotFound(
            f"model {name}",
            f"has no good champion before version {current} in the ledger (earlier ones were rolled back or refused)",
            "name the version: atelier rollback NAME --to VERSION --reason ...",
        )
    if target == current:
        raise NotFound(f"model {name}", f"version {target} is already the champion", "name another version with --to")
    done = promote(client, ledger, name, target, actor=actor, reason=reason, rules=rules, action="rollback")
    if not done.passed:
        raise GateRefused(
            f"rollback of {name} to version {target}", "; ".join(done.reasons), "fix the gate rules or promote another version"
        )
    return done
