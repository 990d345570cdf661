"""The MLflow tracking server as a remote service: an unreachable server becomes one clear, retryable
error, and a registration attempt that died half-way leaves no run pretending to be in progress."""

from __future__ import annotations

import contextlib
from typing import Iterator

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from atelier.kernel.errors import ServiceUnavailable
from atelier.kernel.outages import MLFLOW_UNREACHABLE as _UNREACHABLE
from atelier.kernel.outages import classify
from atelier.kernel.settings import Settings

ABANDONED_TAG = "atelier.abandoned"


def unreachable(exc: BaseException) -> bool:
    import requests

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    return isinstance(exc, MlflowException) and any(marker in str(exc) for marker in _UNREACHABLE)


@contextlib.contextmanager
def tracking_errors(tracking_uri: str) -> Iterator[None]:
    """Raise `ServiceUnavailable` (which tasks retry) instead of a stack of HTTP errors when the
    tracking server does not answer."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (re-raised unless it is the server being away)
        if not unreachable(exc):
            raise
        reason = str(exc).split("(Caused by")[-1].strip(" ()'\"")[:200]
        raise ServiceUnavailable(
            f"MLflow tracking server at {tracking_uri}",
            f"did not answer ({reason})",
            "start it again (`atelier up` restarts a stopped one; `docker compose up -d mlflow`) and rerun; "
            "a model version is created only after its artifacts, in one call with its lineage tags, "
            "so nothing was half-registered",
        ) from None


@contextlib.contextmanager
def service_errors(settings: Settings) -> Iterator[None]:
    """Like `tracking_errors`, for every service a task talks to: S3 (artifacts, DVC, results) and
    PostgreSQL (the ledger) as well as MLflow. An outage becomes `ServiceUnavailable` naming it."""
    try:
        with tracking_errors(settings.resolved_tracking_uri):  # MLflow's own, more telling message first
            yield
    except ServiceUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 (re-raised unless it is a service that did not answer)
        outage = classify(exc, settings)
        if outage is None:
            raise
        raise outage from None


def abandon_stale_runs(client: MlflowClient, experiment_id: str, match: dict[str, str], keep: str | None = None) -> list[str]:
    """Mark FAILED the runs of an earlier attempt at the same registration (every tag in `match`
    equal: the subject and the training key) that still say RUNNING, because their process died
    with the server or the worker; returns their ids. Such a run never has a version. `keep` is the
    run of the attempt in progress."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in sorted(match.items()))
    stale = [r for r in client.search_runs([experiment_id], f"{where} and attributes.status = 'RUNNING'") if r.info.run_id != keep]
    for run in stale:
        client.set_tag(run.info.run_id, ABANDONED_TAG, "the attempt died before registering; a retry replaced it")
        client.set_terminated(run.info.run_id, "FAILED")
    return [r.info.run_id for r in stale]


def ui_links(settings: Settings, name: str, version: str, run_id: str) -> list[tuple[str, str, str]]:
    """(url, text, description) of a model version and its training run in the MLflow UI; the
    models:/ URI alone when no UI is known yet (`atelier ui` starts the embedded default's)."""
    ui = settings.mlflow_ui_url(planned=True)
    later = "" if settings.mlflow_ui_url() else " (it opens once `atelier ui` has started the MLflow UI)"
    experiment = MlflowClient(settings.resolved_tracking_uri).get_run(run_id).info.experiment_id
    return [
        (f"{ui}/#/models/{name}/versions/{version}{ML_VIEW}", f"{name} v{version}", f"registered model version in the MLflow UI{later}"),
        (
            f"{ui}/#/experiments/{experiment}/runs/{run_id}{ML_VIEW}",
            f"training run {run_id[:8]}",
            f"its MLflow run: loss curve, system metrics, datasets, samples{later}",
        ),
    ]


# MLflow 3's UI opens in its GenAI view (traces, "detect issues") unless told otherwise; Atelier's runs are
# model training, so every link Atelier prints asks for that view
ML_VIEW = "?workflowType=machine_learning"
