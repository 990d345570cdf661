"""Schedules: which flows run when, as Prefect deployments served by `atelier worker`.

The schedule file (default `schedules.yaml` in the workspace):

    batch_generate:            # batch inference per customer subject
      - {customer: acme, subject: robot, manifest: s3://prompts/acme.jsonl, out: "s3://out/acme/{date}", cron: "0 2 * * *"}
    batch_ocr:
      - {name: scans, input: s3://scans/incoming, out: "s3://scans/read/{date}", cron: "30 2 * * *"}
    retrain:                   # a no-op when photos, config and base model are unchanged
      - {customer: acme, subject: robot, cron: "0 3 * * *"}
    ocr_recalibrate: {cron: "0 4 * * 0"}
    audit: {cron: "0 * * * *", restore: true}   # the ledger against the registry; restore undoes out-of-band alias moves

With a work pool (settings `work_pool`, or `work_pool:` on an entry, e.g. `atelier-gpu` for retraining)
the deployments go to that pool and its workers run them. Retraining deployments (one per customer subject) and OCR recalibration have a concurrency limit of
one run, so two retrainings of one subject never overlap (a second waits); batch deployments have
none and never wait on retraining.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atelier.kernel.errors import ConfigError, schema_problems, yaml_problem
from atelier.kernel.storage import check_slug


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cron: str = Field(..., description="cron expression, UTC")
    paused: bool = False
    work_pool: str | None = Field(
        None, description="this entry's work pool (e.g. atelier-gpu for retraining); default: the settings' work_pool"
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=value)
        except ValueError:
            raise ValueError(f"{value!r} is not a cron expression (e.g. '0 2 * * *')") from None
        return value


class _Subject(_Entry):
    customer: str
    subject: str

    @field_validator("customer", "subject")
    @classmethod
    def _slug(cls, value: str) -> str:
        check_slug(value, "name")
        return value


class BatchGenerate(_Subject):
    manifest: str
    out: str
    model: str | None = None
    batch_size: int = Field(8, ge=1, le=256)


class BatchOcr(_Entry):
    name: str

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        check_slug(value, "name")
        return value

    input: str
    out: str
    model: str = "ocr@champion"
    lang: str | None = None
    kind: str = Field("page", pattern="^(page|line)$")


class Retrain(_Subject):
    config: str | None = None


class Audit(_Entry):
    restore: bool = Field(False, description="put champion/candidate aliases moved outside Atelier back to the ledger's")


class Schedules(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_generate: list[BatchGenerate] = []
    batch_ocr: list[BatchOcr] = []
    retrain: list[Retrain] = []
    ocr_recalibrate: _Entry | None = None
    audit: Audit | None = None

    @model_validator(mode="after")
    def _unique(self) -> Schedules:
        """Two entries that would make the same deployment: the later would silently replace the earlier."""
        names = [f"batch-{b.customer}-{b.subject}" for b in self.batch_generate] + [f"ocr-{o.name}" for o in self.batch_ocr]
        names += [f"retrain-{r.customer}-{r.subject}" for r in self.retrain]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"more than one entry makes the deployment {', '.join(twice)}: give each its own customer/subject or name")
        return self


def load_schedules(path: Path) -> Schedules:
    if not path.is_file():
        raise ConfigError(str(path), "no schedule file", "write one (see `atelier deploy --help` and the README's Schedules section)")
    try:
        return Schedules.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"is not YAML ({yaml_problem(exc)})", "fix the syntax") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from None
    except RecursionError:
        raise ConfigError(str(path), "is nested too deeply to be a schedule file", "write the entries as the README shows") from None
    except ValidationError as exc:
        said, fix = schema_problems(exc.errors())
        raise ConfigError(str(path), said, f"{fix} (the guide's Schedules section shows each entry)") from None


def deployments(schedules: Schedules) -> list:
    """RunnerDeployments (module entrypoints, so a worker anywhere with Atelier installed runs them)."""
    from prefect.deployments.runner import EntrypointType

    from atelier.flows.audit import ledger_audit
    from atelier.flows.batch import batch_generate, batch_ocr
    from atelier.flows.ocr_calibrate import ocr_calibrate
    from atelier.flows.subject_finetune import subject_finetune

    out = []

    def module(entry: _Entry) -> dict:
        return {"entrypoint_type": EntrypointType.MODULE_PATH, "work_pool_name": entry.work_pool}

    for b in schedules.batch_generate:
        out.append(
            batch_generate.to_deployment(
                name=f"batch-{b.customer}-{b.subject}",
                cron=b.cron,
                paused=b.paused,
                tags=[f"customer:{b.customer}", "batch"],
                parameters={
                    "customer": b.customer,
                    "subject": b.subject,
                    "manifest": b.manifest,
                    "out": b.out,
                    "model": b.model,
                    "batch_size": b.batch_size,
                },
                **module(b),
            )
        )
    for o in schedules.batch_ocr:
        out.append(
            batch_ocr.to_deployment(
                name=f"ocr-{o.name}",
                cron=o.cron,
                paused=o.paused,
                tags=["batch", "ocr"],
                parameters={"inputs": o.input, "out": o.out, "model": o.model, "lang": o.lang, "kind": o.kind},
                **module(o),
            )
        )
    for r in schedules.retrain:
        out.append(
            subject_finetune.to_deployment(
                name=f"retrain-{r.customer}-{r.subject}",
                cron=r.cron,
                paused=r.paused,
                concurrency_limit=1,
                tags=[f"customer:{r.customer}", "retrain"],
                parameters={"customer": r.customer, "subject": r.subject, "config_path": r.config, "skip_if_unchanged": True},
                **module(r),
            )
        )
    if schedules.ocr_recalibrate:
        out.append(
            ocr_calibrate.to_deployment(
                name="ocr-recalibrate",
                cron=schedules.ocr_recalibrate.cron,
                paused=schedules.ocr_recalibrate.paused,
                concurrency_limit=1,
                tags=["retrain", "ocr"],
                **module(schedules.ocr_recalibrate),
            )
        )
    if schedules.audit:
        out.append(
            ledger_audit.to_deployment(
                name="ledger-audit",
                cron=schedules.audit.cron,
                paused=schedules.audit.paused,
                concurrency_limit=1,
                tags=["audit"],
                parameters={"restore": schedules.audit.restore},
                **module(schedules.audit),
            )
        )
    return out
