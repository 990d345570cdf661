"""What a user watches while a job runs: the MLflow run that takes training's metrics live, and the
command line's progress bars. No flow here: these are the parts, against a real MLflow store."""

from __future__ import annotations

import io
import logging

import pytest
from mlflow import MlflowClient


@pytest.fixture
def tracking(workspace):
    return MlflowClient(workspace.resolved_tracking_uri)


def _open(workspace, subject: str, key: str):
    from atelier.registry.training_run import TrainingRun

    tags = {"atelier.customer": "livecust", "atelier.subject": subject, "atelier.training.key": key}
    return TrainingRun.open(workspace, "livecust", subject, tags, {"learning_rate": 1e-4, "max_train_steps": 6})


def test_training_run_takes_steps_live_and_fills_in_the_steps_of_an_earlier_attempt(workspace, tracking):
    first = _open(workspace, "live", "k1")
    run = _open(workspace, "live", "k1")  # a retry: the attempt that died while RUNNING is abandoned
    assert tracking.get_run(first.run_id).info.status == "FAILED"
    for step in (4, 5, 6):  # resumed from a checkpoint at step 3
        run.log(step, 1.0 / step, 1e-4)
    run.flush()
    assert [m.step for m in tracking.get_metric_history(run.run_id, "train/loss")] == [4, 5, 6]
    run.close([1.0, 0.5, 0.33, 0.25, 0.2, 0.166])
    history = {m.step: m.value for m in tracking.get_metric_history(run.run_id, "train/loss")}
    assert sorted(history) == [1, 2, 3, 4, 5, 6] and history[4] == pytest.approx(0.25)
    got = tracking.get_run(run.run_id)
    assert got.info.status == "RUNNING" and got.data.params["max_train_steps"] == "6"  # registration ends it
    assert run.usable == run.run_id


def test_each_attempt_has_its_own_name_and_only_a_changing_learning_rate_is_a_chart(workspace, tracking):
    from atelier.registry.training_run import TrainingRun

    tags = {"atelier.customer": "livecust", "atelier.subject": "named", "atelier.training.key": "k9"}
    constant = TrainingRun.open(workspace, "livecust", "named", tags, {"learning_rate": 1e-4, "lr_scheduler": "constant"})
    cosine = TrainingRun.open(workspace, "livecust", "named", tags, {"learning_rate": 1e-4, "lr_scheduler": "cosine"})
    for run in (constant, cosine):
        run.log(1, 0.5, 1e-4)
        run.close()
    assert tracking.get_metric_history(constant.run_id, "train/learning_rate") == []  # the parameter says it
    assert len(tracking.get_metric_history(cosine.run_id, "train/learning_rate")) == 1
    names = {tracking.get_run(r.run_id).info.run_name for r in (constant, cosine)}
    assert len(names) == 2 and all(n.startswith("livecust-named-") for n in names)  # an attempt and its retry: two rows
    assert tracking.get_run(constant.run_id).data.tags["mlflow.source.type"] == "JOB"


def test_a_tracking_server_that_goes_away_never_stops_training(workspace, tracking, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run = _open(workspace, "away", "k2")
    run.client = MlflowClient("http://127.0.0.1:9")  # nothing listens there
    t0 = time.perf_counter()
    for step in range(1, 101):
        run.log(step, 1.0 / step)
    assert time.perf_counter() - t0 < 0.5  # a step only queues its metrics
    run.close([1.0 / s for s in range(1, 101)], wait=20)
    assert run.broken and run.usable is None  # registration starts a run of its own with the whole curve


def test_registration_resumes_only_the_open_run_of_the_same_training(workspace, tracking):
    from atelier.registry.dreambooth import _live_run

    run = _open(workspace, "resume", "k3")
    assert _live_run(tracking, run.run_id, "resume", "k3") == run.run_id
    assert _live_run(tracking, run.run_id, "other-subject", "k3") is None
    assert _live_run(tracking, run.run_id, "resume", "another-key") is None
    tracking.set_tag(run.run_id, "atelier.lineage.sha256", "0" * 64)  # a registration began in it, then died
    assert _live_run(tracking, run.run_id, "resume", "k3") is None
    tracking.set_terminated(run.run_id, "FINISHED")
    assert _live_run(tracking, run.run_id, "resume", "k3") is None
    assert _live_run(tracking, "0" * 32, "resume", "k3") is None


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_reported_below_the_command_line_is_drawn_as_a_bar_with_log_lines_above_it(monkeypatch):
    from prefect.logging.handlers import PrefectConsoleHandler

    from atelier.cli.progress import bars
    from atelier.kernel import progress

    screen = _Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    handler = PrefectConsoleHandler(stream=screen)
    log = logging.getLogger("prefect.test-progress")
    log.addHandler(handler)
    original = handler.console
    try:
        with bars():
            for step in range(1, 41):
                progress.report("DreamBooth training", step, 40, "steps")
                if step == 20:
                    assert handler.console is not original  # log lines print through the bars' console
                    log.warning("halfway")
            progress.report("class images", 3, 8, "images")  # still open when the command ends
        assert handler.console is original and progress._listeners == []
    finally:
        log.removeHandler(handler)
    drawn = screen.getvalue()
    assert "DreamBooth training" in drawn and "/40" in drawn and "steps" in drawn and "ETA" in drawn
    assert "halfway" in drawn and "class images" in drawn


def test_off_a_terminal_nothing_is_drawn(monkeypatch):
    from atelier.cli.progress import bars
    from atelier.kernel import progress

    plain = io.StringIO()
    monkeypatch.setattr("sys.stderr", plain)
    with bars():
        progress.report("batch OCR", 5, 10, "files")
    assert plain.getvalue() == ""


def test_a_judge_answer_that_does_not_decode_reads_as_a_note():
    from atelier.models.vlm.scoring import readable

    assert readable("\ufffd\ufffd\x07") == "(no readable text: 3 characters that do not decode)"
    assert readable("yes \ufffd") == "yes" and readable("是的") == "是的" and readable("") == ""


def test_the_mlflow_ui_url_is_the_tracking_server_or_the_background_ui(workspace, tmp_path):
    import json

    from atelier.kernel.settings import Settings

    local = Settings(workspace=tmp_path)
    assert local.mlflow_ui_url() is None  # `atelier ui` not run yet
    assert local.mlflow_ui_url(planned=True) == f"http://127.0.0.1:{local.mlflow_ui_port}"  # where it will serve it
    assert 20000 <= local.mlflow_ui_port < 30000 and local.mlflow_ui_port == Settings(workspace=local.workspace).mlflow_ui_port
    local.local_servers_dir.mkdir(parents=True)
    (local.local_servers_dir / "mlflow.json").write_text(json.dumps({"url": "http://127.0.0.1:5999/"}))
    assert local.mlflow_ui_url() == "http://127.0.0.1:5999"
    assert Settings(workspace=tmp_path, tracking_uri="https://mlflow.example.com/").mlflow_ui_url() == "https://mlflow.example.com"


def test_prefect_artifacts_are_keyed_by_name_and_summaries_hold_no_json_cells():
    """The Artifacts page lists each model's gate, judgment and links by key; the run summary has one
    column per output, which `atelier runs` reads back (and still reads a summary of the old shape)."""
    import re

    from atelier.flows.runs import _outputs
    from atelier.tasks.common import OUTPUT, artifact_key

    key = artifact_key("gate", "dreambooth-acme_co-Robot.v2")
    assert key == "gate-dreambooth-acme-co-robot-v2" and re.fullmatch(r"[a-z0-9-]+", key)
    assert (
        _outputs({"flow": "f", f"{OUTPUT}report": "/o/report.json", f"{OUTPUT}items": "3"}) == '{"items": "3", "report": "/o/report.json"}'
    )
    assert _outputs({"flow": "f", "outputs": '{"a": 1}'}) == '{"a": 1}'


def test_a_failed_runs_note_gives_its_reason_once():
    from types import SimpleNamespace

    from atelier.flows.runs import _note

    def run(state: str, message: str):
        return SimpleNamespace(state_name=state, state=SimpleNamespace(message=message))

    assert _note("1 invalid", run("Failed", "manifest m: has no valid item")) == "1 invalid; manifest m: has no valid item"
    assert _note("gate refused", run("Refused", "gate refused")) == "gate refused"
    assert _note(None, run("Crashed", "its process is gone")) == "its process is gone"
    assert _note("done", run("Completed", "All states completed.")) == "done"
