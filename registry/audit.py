"""The ledger against the registry: settle what a crash left half-done, find alias moves that no ledger row
explains (the MLflow UI's alias editor, a client call), and put the ledger's aliases back.

`reconcile()` runs before every promotion and in `ledger verify` and `atelier audit`. It settles the
anchor (registry/ledger_anchor.py) and every open intent, by what MLflow shows: the alias moved, so a
confirming row is written; it did not, so an `abandon` row. It never touches an alias. `alias_drift()`
compares each platform model's live `champion` and `candidate` with the ledger's view; `restore()` moves
them back (champion through intent -> move -> `restore` row) and records each correction.
"""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient

from atelier.registry.gate import CANDIDATE, CHAMPION
from atelier.registry.ledger import CONFIRMS, Ledger, Problem, aliases, open_intents
from atelier.registry.ledger_anchor import AnchorStore, append
from atelier.registry.promotion import current_alias, move_champion

PLATFORM_TAGS = ("atelier.kind", "atelier.customer")


def reconcile(client: MlflowClient, ledger: Ledger, model: str | None = None) -> list[str]:
    """Settle open intents (of `model`, or all); returns one line per settled intent."""
    store = AnchorStore(client)
    store.settle(ledger)
    intents = open_intents(ledger.rows(model))
    anchor = store.read() if intents else None
    if intents and ledger.verify(anchor.head if anchor else None, anchor.pending if anchor else None):
        return []  # a tampered ledger is reported, never written onto (see ledger_anchor.require_intact)
    settled = []
    for intent in intents:
        action, _, reason = intent.reason.partition(": ")
        live = current_alias(client, intent.model)
        common: dict[str, Any] = dict(
            model=intent.model,
            version=intent.version,
            actor=f"{intent.actor} (reconciled)",
            gate={},
            metrics={},
            flow_run_id=intent.flow_run_id,
            from_alias=intent.from_alias,
            replaced_version=intent.replaced_version,
        )
        if live == intent.version:
            append(
                client,
                ledger,
                action=action if action in CONFIRMS else "promote",
                to_alias=CHAMPION,
                reason=f"confirmed by reconciliation: the promoting process stopped after moving the alias ({reason})",
                **common,
            )
            settled.append(f"{intent.model} v{intent.version}: the alias had moved; intent #{intent.seq} confirmed")
        else:
            append(
                client,
                ledger,
                action="abandon",
                to_alias=None,
                reason=f"the promoting process stopped before moving the alias ({reason})",
                **common,
            )
            settled.append(f"{intent.model} v{intent.version}: the alias never moved; intent #{intent.seq} abandoned")
    return settled


def platform_models(client: MlflowClient, ledger: Ledger) -> list[str]:
    """Every registered model Atelier made (its tags say so) or the ledger names."""
    names = {r.model for r in ledger.rows()}
    for model in client.search_registered_models(max_results=1000):
        if any(t in model.tags for t in PLATFORM_TAGS):
            names.add(model.name)
    return sorted(names)


def _live_aliases(client: MlflowClient, name: str) -> dict[str, str]:
    try:
        return {alias: str(version) for alias, version in (client.get_registered_model(name).aliases or {}).items()}
    except Exception:  # noqa: BLE001 (a model deleted behind the ledger's back: no aliases)
        return {}


def alias_drift(client: MlflowClient, ledger: Ledger) -> list[Problem]:
    problems = []
    for name in platform_models(client, ledger):
        expected, live = aliases(ledger.rows(name)), _live_aliases(client, name)
        checks = [(CHAMPION, expected.champion)] + ([(CANDIDATE, expected.candidate)] if expected.candidate_tracked else [])
        for alias, want in checks:
            have = live.get(alias)
            if have != want:
                problems.append(
                    Problem(
                        None,
                        "alias_drift",
                        (
                            f"{name}@{alias} is {'version ' + have if have else 'not set'} in MLflow, but the ledger says "
                            f"{'version ' + want if want else 'no ' + alias}: it was changed outside Atelier (the MLflow UI or a client). "
                            f"Fix: `atelier audit --restore` puts the ledger's {alias} back"
                            + (
                                f", or `atelier promote {name} {have} --reason ...` records the move through the gate"
                                if have and alias == CHAMPION
                                else ""
                            )
                        ),
                    )
                )
    return problems


def restore(client: MlflowClient, ledger: Ledger, actor: str) -> list[str]:
    """Put every drifted alias back to the ledger's view; one ledger row per correction."""
    done = []
    for name in platform_models(client, ledger):
        expected, live = aliases(ledger.rows(name)), _live_aliases(client, name)
        if live.get(CHAMPION) != expected.champion:
            reason = f"restored by audit: {name}@champion had been moved outside Atelier to {live.get(CHAMPION) or 'nothing'}"
            if expected.champion:
                move_champion(client, ledger, name, expected.champion, action="restore", actor=actor, reason=reason)
            else:
                client.delete_registered_model_alias(name, CHAMPION)
                append(
                    client,
                    ledger,
                    model=name,
                    version=live[CHAMPION],
                    action="restore",
                    actor=actor,
                    reason=reason,
                    from_alias=CHAMPION,
                    to_alias=None,
                    replaced_version=live[CHAMPION],
                )
            done.append(f"{name}@champion -> {expected.champion or 'removed'}")
        if expected.candidate_tracked and live.get(CANDIDATE) != expected.candidate:
            reason = f"restored by audit: {name}@candidate had been moved outside Atelier to {live.get(CANDIDATE) or 'nothing'}"
            if expected.candidate:
                append(
                    client,
                    ledger,
                    model=name,
                    version=expected.candidate,
                    action="restore",
                    actor=actor,
                    reason=reason,
                    to_alias=CANDIDATE,
                    replaced_version=live.get(CANDIDATE),
                )
                client.set_registered_model_alias(name, CANDIDATE, expected.candidate)
            else:
                append(
                    client,
                    ledger,
                    model=name,
                    version=live[CANDIDATE],
                    action="restore",
                    actor=actor,
                    reason=reason,
                    from_alias=CANDIDATE,
                    to_alias=None,
                    replaced_version=live[CANDIDATE],
                )
                client.delete_registered_model_alias(name, CANDIDATE)
            done.append(f"{name}@candidate -> {expected.candidate or 'removed'}")
    return done


def verify_all(client: MlflowClient, ledger: Ledger) -> tuple[list[str], list[Problem]]:
    """Reconcile, then check the chain, its anchor and every alias. Returns (settled, problems)."""
    settled = reconcile(client, ledger)
    anchor = AnchorStore(client).read()
    return settled, ledger.verify(anchor.head, anchor.pending) + alias_drift(client, ledger) + damaged_champions(client, ledger)


def damaged_champions(client: MlflowClient, ledger: Ledger) -> list[Problem]:
    """Champions whose stored files no longer include every file of their signed manifest (or that a rerun
    marked damaged): production would fail to load them, so `ledger verify` says so (exit 5)."""
    from atelier.registry.model_files import ModelTampered, refuse_damaged

    problems = []
    for name in platform_models(client, ledger):
        champion = _live_aliases(client, name).get(CHAMPION)
        if champion is None:
            continue
        try:
            refuse_damaged(client, ledger, client.get_model_version(name, champion))
        except ModelTampered as exc:
            problems.append(Problem(None, "damaged_champion", f"{name}@{CHAMPION}: {exc.problem}. Fix: {exc.fix}"))
    return problems
