"""The MLflow run of one training attempt, opened before its first step.

The loss curve and learning rate arrive while the model trains (sent in batches every couple of
seconds, so the trainer never waits on the tracking server), and MLflow's system-metrics monitor
samples CPU, memory, disk, network and GPU into the same run. The UI shows a run in progress with
its real duration, its parameters and its datasets; registration later resumes this run, adds the
samples and the model, and ends it.
"""

from __future__ import annotations

import logging
import threading
import time

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from atelier.kernel.settings import Settings
from atelier.registry.isolation import ensure_experiment
from atelier.registry.tracking import abandon_stale_runs

# The curves sit in the "train" section of the run's charts, above the single values ("validation/...")
LOSS, LEARNING_RATE = "train/loss", "train/learning_rate"
FLUSH_SECONDS = 2.0
CLOSE_SECONDS = 30.0
SYSTEM_METRICS_SECONDS = 3.0  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it


class TrainingRun:
    """An open MLflow run that training reports to: `log(step, loss, lr)` per step, `close(losses)` at
    the end (it fills in any steps an earlier, resumed attempt trained). A background thread sends
    the metrics, so a step never waits on the tracking server, even one that stopped answering. The
    run stays RUNNING until the model is registered into it."""

    def __init__(self, client: MlflowClient, run_id: str, system_metrics: bool = True, log_learning_rate: bool = True) -> None:
        self.client, self.run_id = client, run_id
        self.log_learning_rate = log_learning_rate
        self._pending: list[Metric] = []
        self._logged: set[int] = set()
        self._lock, self._sending = threading.Lock(), threading.Lock()
        self._wake, self._stopping = threading.Event(), False
        self.broken: str | None = None  # why live reporting stopped, if it did
        self._monitor = _system_monitor(run_id, client.tracking_uri) if system_metrics else None
        self._sender = threading.Thread(target=self._send_loop, name="atelier-live-metrics", daemon=True)
        self._sender.start()

    @classmethod
    def open(
        cls, settings: Settings, customer: str, subject: str, tags: dict[str, str], params: dict, datasets: list | None = None
    ) -> "TrainingRun":
        """Create the run in the customer's experiment; an earlier attempt at the same training (same
        subject and training key) that died while RUNNING is marked FAILED first."""
        client = MlflowClient(settings.resolved_tracking_uri)
        experiment_id = ensure_experiment(client, settings, customer)
        abandon_stale_runs(client, experiment_id, {k: tags[k] for k in ("atelier.subject", "atelier.training.key")})
        run = client.create_run(experiment_id, run_name=run_name(customer, subject), tags={**source_tags(settings), **tags})
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
        if datasets:
            client.log_inputs(run_id, datasets=datasets)
        # a constant learning rate is a parameter (it is one), not a flat line drawn at 0 on a chart
        varies = str(params.get("lr_scheduler", "constant")) != "constant" or int(params.get("lr_warmup_steps", 0) or 0) > 0
        return cls(client, run_id, log_learning_rate=varies)

    def log(self, step: int, loss: float, lr: float | None = None) -> None:
        now_ms = int(time.time() * 1000)
        with self._lock:
            self._pending.append(Metric(LOSS, float(loss), now_ms, step))
            if lr is not None and self.log_learning_rate:
                self._pending.append(Metric(LEARNING_RATE, float(lr), now_ms, step))
            self._logged.add(step)

    def flush(self) -> None:
        """Send what is pending now (the sender does it every FLUSH_SECONDS)."""
        with self._sending:  # one send at a time: a flush returns after the sender's batch is in
            with self._lock:
                pending, self._pending = self._pending, []
            if self.broken or not pending:
                return
            try:
                for i in range(0, len(pending), 1000):  # MLflow's batch limit
                    self.client.log_batch(self.run_id, metrics=pending[i : i + 1000])
            except Exception as exc:  # noqa: BLE001 (any failure to report is the same to training)
                self.broken = f"{type(exc).__name__}: {str(exc)[:200]}"

    def _send_loop(self) -> None:
        while not self._stopping:
            self._wake.wait(FLUSH_SECONDS)
            self.flush()

    def close(self, losses: list[float] | None = None, wait: float = CLOSE_SECONDS) -> None:
        """Send what is pending, and every step of `losses` (step i+1 is losses[i]) not sent live;
        waits at most `wait` seconds for the tracking server, else the run is marked broken."""
        now_ms = int(time.time() * 1000)
        with self._lock:
            self._pending.extend(
                Metric(LOSS, float(v), now_ms, step) for step, v in enumerate(losses or [], start=1) if step not in self._logged
            )
        self._stopping = True
        self._wake.set()
        self._sender.join(wait)
        if self._sender.is_alive():
            self.broken = self.broken or f"the tracking server took over {wait:.0f} s to take the metrics"
        else:
            self.flush()
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    @property
    def usable(self) -> str | None:
        """The run id, for registration to resume; None once live reporting broke."""
        return None if self.broken else self.run_id

    def fail(self) -> None:
        """Training raised (or was interrupted): the run ends FAILED (a retry opens a new one), after at
        most a few seconds for what is pending."""
        self.close(wait=5.0)
        try:
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception:  # noqa: BLE001 (the server is away: the retry's abandon_stale_runs ends it)
            pass


def run_name(customer: str, subject: str) -> str:
    """A name each attempt has to itself: an interrupted run and its resume are two rows, told apart."""
    import secrets

    return f"{customer}-{subject}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def source_tags(settings: Settings) -> dict[str, str]:
    """MLflow's User and Source columns: who started the training (the platform's actor: the person, or
    the deployment that scheduled it) and that it ran as Atelier's fine-tuning job."""
    from atelier import __version__

    return {
        "mlflow.user": settings.actor,
        "mlflow.source.type": "JOB",
        "mlflow.source.name": f"atelier {__version__} subject-finetune",
    }


def _system_monitor(run_id: str, tracking_uri: str):
    """MLflow's own system-metrics thread (system/cpu_utilization_percentage, system/gpu_*, ...)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # its start/stop INFO lines and the no-GPU note
        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_SECONDS, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception:  # noqa: BLE001 (psutil missing or an odd platform: training goes on without them)
        return None
