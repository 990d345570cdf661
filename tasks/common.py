"""What every task shares: settings from the environment, a logger, cache policies."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from atelier.kernel.errors import AtelierError
from atelier.kernel.settings import Settings, load_settings
from atelier.tasks import results as _results  # noqa: F401 (registers the atelier-json result serializer, guards stored records)

# Inputs and the task's own code: a rerun with the same inputs and code reuses the result.
BY_INPUTS = INPUTS + TASK_SOURCE
UNCACHED = NO_CACHE


_first_outage: float | None = None  # when this process first saw a server not answer (one flow run per process)


def retry_transient(task, task_run, state) -> bool:  # noqa: ARG001 (Prefect's signature)
    """Retry only what may pass on a second try: Atelier's own errors (bad input) never do, but a
    server that did not answer (`ServiceUnavailable`) may be back, until `outage_budget` seconds have
    passed since the first such failure: then the flow stops with exit 6 naming the server."""
    global _first_outage
    import time

    try:
        state.result()
    except AtelierError as exc:
        if not exc.transient:
            return False
    except Exception:  # noqa: BLE001
        pass
    now = time.monotonic()
    _first_outage = _first_outage or now
    return now - _first_outage < load_settings().outage_budget


def tracked(fn):
    """Run a task body that talks to servers (MLflow, S3, the ledger's PostgreSQL) so that one that does
    not answer is a `ServiceUnavailable` naming it (which `retry_transient` retries), not a stack of
    HTTP errors."""
    import functools

    from atelier.registry.tracking import service_errors

    @functools.wraps(fn)
    def body(*args, **kwargs):
        with service_errors(load_settings()):
            return fn(*args, **kwargs)

    return body


def settings() -> Settings:
    """Settings with MLflow's, S3's and the offline switches' environment applied: a flow run that a
    worker started has only the ATELIER_* variables."""
    current = load_settings()
    current.apply_library_environment()
    return current


def logger():
    return get_run_logger()


def progress_logger(label: str, total: int, unit: str = "items", every: float = 0.1):
    """A callback for `label`'s progress: every call goes to `atelier.kernel.progress` (the command line's
    bars); about every 10% a log line and the Prefect progress artifact (the UI)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from atelier.kernel import progress

    log = logger()
    artifact_id = create_progress_artifact(progress=0.0, description=label)
    stride = max(1, int(total * every))

    def report(done: int, extra: str = "") -> None:
        progress.report(label, done, total, unit)
        if done % stride == 0 or done == total:
            log.info("%s: %d/%d %s %s", label, done, total, unit, extra)
            update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / total)

    return report


SUMMARY_KEY = "run-summary"
OUTPUT = "output: "  # a summary column holding one output (a column each, not a JSON string in one cell)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lower-case letters, digits, dashes) from names such as the model's: the
    Artifacts page then lists each customer's and subject's latest gate, judgment or CER table by name,
    with its history, instead of unnamed tables reachable only from a run."""
    import re

    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:200]


def summary_artifact(flow: str, model: str, outputs: dict, note: str = "") -> None:
    """The row `atelier runs` shows for this flow run: the model version it used or made, its outputs."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        [{"flow": flow, "model": model, **{f"{OUTPUT}{k}": str(v) for k, v in sorted(outputs.items())}, "note": note}],
        key=SUMMARY_KEY,
        description=f"{flow}: model and outputs",
    )
