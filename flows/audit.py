"""ledger-audit: the promotion ledger against the registry, on a schedule (`audit:` in schedules.yaml).

Settles interrupted promotions, verifies the chain, its anchor and every champion/candidate alias, and
with `restore` puts aliases moved outside Atelier back to the ledger's versions. The run fails (and
says why) while a problem remains, so a Prefect notification on failed runs is an alarm on tampering.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow

from atelier.flows.runs import claim_and_sweep, run_name
from atelier.tasks.common import summary_artifact
from atelier.tasks.registry import audit_ledger

FLOW_VERSION = "1"


@flow(name="ledger-audit", version=FLOW_VERSION, log_prints=True, on_running=[claim_and_sweep], flow_run_name=run_name)
def ledger_audit(restore: bool = False) -> dict:
    result = audit_ledger(restore)
    summary_artifact(
        "ledger-audit",
        "-",
        {"rows": result.rows, "restored": len(result.restored)},
        note="intact" if not result.problems else f"{len(result.problems)} problem(s)",
    )
    if result.problems:
        raise RuntimeError("ledger audit: " + "; ".join(result.problems))
    return asdict(result)
