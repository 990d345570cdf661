"""subject-finetune: one customer's subject, from DVC-tracked photos to a promoted MLflow model.

pull photos @ DVC rev -> validate (GX) -> class priors (cached) -> DreamBooth -> samples
-> register with lineage (alias candidate) -> promotion gate (alias champion)
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from atelier.flows.runs import claim_and_sweep, finished, run_name
from atelier.kernel.errors import ConfigError
from atelier.kernel.gitinfo import code_version
from atelier.kernel.hashing import stat_signature
from atelier.kernel.settings import load_settings
from atelier.kernel.storage import check_customer, check_slug, file_lock
from atelier.tasks import data as data_tasks
from atelier.tasks import dreambooth as db_tasks
from atelier.tasks import judge as judge_tasks
from atelier.tasks import registry as reg_tasks
from atelier.tasks.common import summary_artifact
from atelier.tasks.data import pull_subject, validate_subject
from atelier.tasks.dreambooth import class_priors, fingerprint_base_model, resolve_config, sample_images, train_dreambooth
from atelier.tasks.registry import promotion_gate, register_model

FLOW_VERSION = "1"
EMBEDDED_BASE_ID = "atelier/tiny-sd-v1 (embedded, random weights)"


def task_versions() -> dict[str, str]:
    return {
        "pull-subject": data_tasks.PULL_VERSION,
        "validate-subject": data_tasks.VALIDATE_VERSION,
        **db_tasks.VERSIONS,
        **reg_tasks.VERSIONS,
        **judge_tasks.VERSIONS,
    }


@flow(name="subject-finetune", version=FLOW_VERSION, log_prints=True, on_running=[claim_and_sweep], flow_run_name=run_name)
def subject_finetune(
    customer: str,
    subject: str,
    base_model: str | None = None,
    config_path: str | None = None,
    data_rev: str | None = None,
    skip_if_unchanged: bool = False,
) -> dict:
    """`skip_if_unchanged` (scheduled retraining): when a version was already registered from the same
    photos (DVC hashes), config, base model and class priors, stop before training and say so."""
    check_customer(customer)
    check_slug(subject, "subject")
    settings = load_settings()
    base = Path(base_model).resolve() if base_model else settings.resolved_base_model
    embedded = base == settings.tiny_model_dir
    if not base.exists():
        raise ConfigError(
            f"base model {base}",
            "does not exist",
            "pass --base-model DIR with a diffusers Stable Diffusion directory, or run `atelier init` for the embedded one",
        )
    config = resolve_config(config_path, embedded)

    snapshot = pull_subject(customer, subject, data_rev)
    validation = validate_subject(snapshot)
    base_hash = fingerprint_base_model(str(base), stat_signature(base))
    priors = None
    if config["with_prior_preservation"]:
        class_prompt = config["class_prompt"].format(identifier=config["identifier"], class_noun=snapshot.class_noun)
        priors = class_priors(str(base), base_hash, class_prompt, config)
    key = db_tasks.training_key(base_hash, snapshot, priors.key if priors else None, config, settings.train_processes)
    waited = []

    def say_waiting() -> None:
        waited.append(True)
        get_run_logger().info(
            "another run is training these same inputs (training key %s); waiting for it to finish, then using its version", key
        )

    # one training and one registration per training key, however many runs start at once
    with file_lock(settings.runs_dir / customer / f"{key}.lock", on_wait=say_waiting):
        if skip_if_unchanged or waited:
            existing = reg_tasks.find_registered(customer, subject, key)
            if existing is not None:
                note = (
                    f"no-op: inputs unchanged since {existing.name} version {existing.version} "
                    f"(same photos {snapshot.dvc_md5[:12]}, config, base model and priors; training key {key})"
                )
                get_run_logger().info(note)  # the run's log (the UI, `atelier logs`) and the terminal
                summary_artifact("subject-finetune", f"{existing.name}/{existing.version}", {}, note)
                return {
                    "model": existing.name,
                    "version": existing.version,
                    "noop": True,
                    "note": note,
                    "run_id": existing.run_id,
                    "training_key": key,
                    "gate": existing.gate or {"passed": existing.champion, "reasons": []},
                    "data_rev": snapshot.rev,
                    "flow_run_id": str(flow_run.id),
                }
        return _train_register_gate(customer, subject, settings, base, embedded, config, snapshot, validation, base_hash, priors)


def _train_register_gate(customer, subject, settings, base, embedded, config, snapshot, validation, base_hash, priors) -> dict:
    training = train_dreambooth(str(base), base_hash, snapshot, priors, config, settings.train_processes)
    samples = sample_images(training.output_dir, snapshot.class_noun, config, training.losses)

    code = code_version()
    lineage = {
        "customer": customer,
        "subject": subject,
        "data.rev": snapshot.rev,
        "data.dvc_md5": snapshot.dvc_md5,
        "data.files": snapshot.files,
        "data.class_noun": snapshot.class_noun,
        "data.validation_report": validation.report_dir,
        "base_model.id": EMBEDDED_BASE_ID if embedded else str(base),
        "base_model.sha256": base_hash,
        "class_priors.key": priors.key if priors else "none",
        "class_priors.sha256": priors.sha256 if priors else "none",
        "code.git_sha": code.git_sha,
        "code.dirty": str(code.dirty).lower(),
        "code.version": code.package_version,
        "flow.name": "subject-finetune",
        "flow.version": FLOW_VERSION,
        "task_versions": task_versions(),
        "params": config,
        "training.key": training.key,
        "prefect.flow_run_id": str(flow_run.id),
        "eval.summary": samples.health,
    }
    registered = register_model(customer, subject, training, samples, lineage, config)
    # scores go on the version before the gate reads them; a version this judge already scored is not
    # asked again (a rerun of unchanged inputs makes no request), and a gate decision that stands writes no row
    if settings.judge.backend != "none" and not (registered.reused and judge_tasks.judged_before(registered)):
        judge_tasks.record_judgment(registered, judge_tasks.judge_samples(samples, snapshot, priors, config["identifier"]))
    gate = promotion_gate(registered, str(flow_run.id))
    summary_artifact(
        "subject-finetune",
        f"{registered.name}/{registered.version}",
        {"run_id": registered.run_id},
        f"gate {'passed' if gate.passed else 'refused'}{' (already registered)' if registered.reused else ''}",
    )
    return finished(
        {
            "model": registered.name,
            "version": registered.version,
            "run_id": registered.run_id,
            "gate": asdict(gate),
            "data_rev": snapshot.rev,
            "training_key": training.key,
            "registered_before": registered.reused,
            "flow_run_id": str(flow_run.id),
            "steps": training.steps,
            "final_loss": samples.health["final_loss"],
            "noop": False,
        },
        gate,
    )
