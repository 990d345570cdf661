"""Registry tasks: register the trained pipeline with its lineage, then apply the promotion gate."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from atelier.models.dreambooth.config import TrainConfig
from atelier.registry.client import Registered, client_for
from atelier.registry.dreambooth import record_gate_on_card, register_dreambooth
from atelier.registry.ledger import open_ledger
from atelier.registry.promotion import promote
from atelier.tasks.common import UNCACHED, artifact_key, logger, retry_transient, settings, tracked
from atelier.tasks.dreambooth import Samples, Training
from atelier.tasks.results import result_type

VERSIONS = {"register-model": "1", "promotion-gate": "1", "find-registered": "1", "audit-ledger": "1"}


result_type(Registered)  # what register-model (and the OCR flow's register) return: a model version in the registry


@result_type
@dataclass(frozen=True)
class GateDecision:
    """The promotion gate's verdict, as its ledger row records it."""

    passed: bool
    reasons: list[str]
    champion: str | None  # the champion's version after the decision
    ledger_seq: int


@result_type
@dataclass(frozen=True)
class Existing:
    """The version registered before from exactly these inputs (same training key)."""

    name: str
    version: str
    aliases: list[str]
    run_id: str
    gate: dict | None  # the decision on its card; None: never gated (an interrupted run)

    @property
    def champion(self) -> bool:
        return "champion" in self.aliases


@result_type
@dataclass(frozen=True)
class Audit:
    """The ledger against the registry: its rows, what was settled and restored, what is still wrong."""

    rows: int
    settled: list[str]
    restored: list[str]
    problems: list[str]


# a tracking server that is away gets three more tries over about 45 s (it may be restarting)
@task(
    name="register-model",
    version=VERSIONS["register-model"],
    cache_policy=UNCACHED,
    retries=3,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=[3, 10, 30],
)
@tracked
def register_model(customer: str, subject: str, training: Training, samples: Samples, lineage: dict, config: dict) -> Registered:
    cfg = TrainConfig(**config)
    # one value each: under "validation/" (sample health, the judge's scores), below the "train/" curves in the UI
    metrics = {f"validation/health_{k}": float(v) for k, v in samples.health.items()}
    metrics.update({"train/seconds": float(training.seconds), "train/steps": float(training.steps)})
    reg = register_dreambooth(
        settings(),
        customer,
        subject,
        Path(training.output_dir),
        lineage,
        config,
        training.losses,
        metrics,
        [Path(p) for p in samples.files],
        Path(samples.grid),
        cfg.sampling.sampler,
        cfg.sampling.steps,
        cfg.sampling.guidance_scale,
        training.run_id,
    )
    if reg.reused:
        logger().info("these training outputs are already registered as %s version %s; not registering again", reg.name, reg.version)
    else:
        logger().info("registered %s version %s (run %s) as candidate", reg.name, reg.version, reg.run_id)
    link_to_mlflow(reg.name, reg.version, reg.run_id)
    return reg


def link_to_mlflow(name: str, version: str, run_id: str) -> None:
    """Prefect artifacts that open the model version and its training run in the MLflow UI (on the
    embedded default once `atelier ui` has started it; before that, the models:/ URI)."""
    from atelier.registry.tracking import ui_links

    for (link, text, description), kind in zip(ui_links(settings(), name, version, run_id), ("mlflow-version", "mlflow-run")):
        create_link_artifact(link, link_text=text, description=description, key=artifact_key(kind, name))


@task(
    name="promotion-gate",
    version=VERSIONS["promotion-gate"],
    cache_policy=UNCACHED,
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=5,
)
@tracked
def promotion_gate(registered: Registered, flow_run_id: str | None = None, flow_name: str = "subject-finetune") -> GateDecision:
    """Gate the new version; champion moves only if it passes. The ledger records either outcome."""
    s = settings()
    result = promote(
        client_for(s),
        open_ledger(s),
        registered.name,
        registered.version,
        actor=f"{s.actor} via {flow_name}",
        reason=f"new version from the {flow_name} flow",
        rules=s.gate,
        flow_run_id=flow_run_id,
    )
    record_gate_on_card(client_for(s), registered.name, registered.version, {"passed": result.passed, "reasons": result.reasons})
    checks = json.loads(result.row.gate)["checks"]
    lines = [f"| {c['name']} | {_verdict(c)} | {c['detail']} |" for c in checks]
    create_markdown_artifact(
        "\n".join(["| check | result | detail |", "|---|---|---|", *lines]),
        key=artifact_key("gate", registered.name),
        description=f"promotion gate for {registered.name} v{registered.version}",
    )
    if result.passed:
        logger().info("gate passed: %s v%s is champion (ledger row %d)", result.model, result.version, result.row.seq)
    else:
        logger().warning(
            "gate refused %s v%s: %s; champion stays %s",
            result.model,
            result.version,
            "; ".join(result.reasons),
            result.champion or "(none)",
        )
    return GateDecision(result.passed, list(result.reasons), result.champion, result.row.seq)


def _verdict(check: dict) -> str:
    """pass / FAIL, or "recorded, not enforced" for a check the gate does not enforce (an uncalibrated judge)."""
    if not check.get("enforced", True):
        return "recorded, not enforced"
    return "pass" if check["passed"] else "FAIL"


@task(
    name="find-registered",
    version=VERSIONS["find-registered"],
    cache_policy=UNCACHED,
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=5,
)
@tracked
def find_registered(customer: str, subject: str, training_key: str) -> Existing | None:
    """The version already registered from exactly these inputs (training key), or None; its `gate` is
    the decision recorded on its card, or None if it was never gated."""
    from atelier.registry.client import find_version
    from atelier.registry.dreambooth import model_name

    name = model_name(customer, subject)
    mv = find_version(client_for(settings()), name, "atelier.training.key", training_key)
    if mv is None:
        return None
    gate = json.loads(mv.tags["atelier.gate"]) if "atelier.gate" in mv.tags else None  # None: never gated (interrupted)
    return Existing(name, str(mv.version), list(mv.aliases), mv.run_id, gate)


@task(
    name="audit-ledger",
    version=VERSIONS["audit-ledger"],
    cache_policy=UNCACHED,
    retries=2,
    retry_condition_fn=retry_transient,
    retry_delay_seconds=10,
)
@tracked
def audit_ledger(restore: bool = False) -> Audit:
    """Reconcile, verify, and with `restore` put drifted aliases back; problems are logged by name."""
    from atelier.registry.audit import restore as restore_aliases
    from atelier.registry.audit import verify_all

    s = settings()
    client, ledger = client_for(s), open_ledger(s)
    settled, problems = verify_all(client, ledger)
    restored = []
    if restore and any(p.kind == "alias_drift" for p in problems):
        restored = restore_aliases(client, ledger, f"{s.actor} via ledger-audit")
        settled, problems = verify_all(client, ledger)
    for line in settled + [f"restored {r}" for r in restored]:
        logger().info(line)
    for p in problems:
        logger().error("%s: %s", p.kind, p.detail)
    return Audit(len(ledger.rows()), settled, restored, [p.detail for p in problems])
