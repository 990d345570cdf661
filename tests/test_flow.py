"""The whole subject-finetune flow on the tiny model, under one Prefect test harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from atelier.cli.demo_data import write_demo_photos
from atelier.kernel.errors import DataValidationError, ModelFormatError
from atelier.kernel.hashing import sha256_file
from atelier.kernel.workspace import add_subject, subject_revision
from atelier.models.dreambooth.base import model_hash

pytestmark = pytest.mark.slow
NAME = "dreambooth-acme-robot"


def stored_files(client, mv) -> dict:
    from atelier.registry.dreambooth import stored_model_files

    return stored_model_files(client, mv)


def _artifacts(flow_run_id: str):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect:
        return prefect.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _flow_run(run_id: str):
    from prefect import get_client

    with get_client(sync_client=True) as prefect:
        return prefect.read_flow_run(run_id)


@pytest.fixture(scope="module")
def client(workspace):
    return MlflowClient(workspace.resolved_tracking_uri)


@pytest.fixture(scope="module")
def robot_photos(workspace, tmp_path_factory):
    photos = write_demo_photos(tmp_path_factory.mktemp("robot"), count=5)
    add_subject(workspace, "acme", "robot", "toy", photos)
    return photos


@pytest.fixture(scope="module")
def first_run(prefect_harness, robot_photos):
    from atelier.flows.subject_finetune import subject_finetune

    return subject_finetune("acme", "robot")


def test_flow_registers_promotes_and_records_lineage(first_run, workspace, client, robot_photos, tiny_model, tmp_path):
    assert first_run["gate"]["passed"] and first_run["model"] == NAME
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == first_run["version"]
    assert client.get_model_version_by_alias(NAME, "candidate").version == champion.version
    tags = champion.tags
    assert tags["atelier.data.rev"] == subject_revision(workspace, "acme", "robot")
    assert tags["atelier.base_model.sha256"] == model_hash(tiny_model)
    assert len(tags["atelier.code.git_sha"]) in (40, 7) or tags["atelier.code.git_sha"] == "unknown"
    assert tags["atelier.prefect.flow_run_id"] == first_run["flow_run_id"]
    assert json.loads(tags["atelier.gate"])["passed"] is True
    # tags are short and searchable; the whole lineage (file hashes, params, task versions) is lineage.json, hashed into a tag
    lineage_tags = {
        k: v
        for k, v in tags.items()
        if k.startswith("atelier.") and k not in ("atelier.gate", "atelier.eval.judge", "atelier.eval.summary")
    }
    assert "atelier.data.files" not in tags and "atelier.params" not in tags and max(map(len, lineage_tags.values())) <= 200
    record = json.loads(Path(client.download_artifacts(champion.run_id, "lineage.json", str(tmp_path))).read_text())
    assert record["data.files"] == {p.name: sha256_file(p) for p in robot_photos}
    assert record["task_versions"]["train-dreambooth"] == "1" and record["params"]["max_train_steps"] == 60
    from atelier.kernel.hashing import value_hash

    assert tags["atelier.lineage.sha256"] == value_hash(record)
    run = client.get_run(champion.run_id)
    assert run.data.params["learning_rate"] == "0.0001"
    # the run was opened before training and took its metrics live: the loss and learning rate per
    # step, MLflow's system metrics, and a duration that covers the training
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 60
    # a constant learning rate is the parameter above, not a flat chart; the run has a name of its own and
    # MLflow's User and Source columns filled
    assert client.get_metric_history(run.info.run_id, "train/learning_rate") == []
    assert run.info.run_name.startswith("acme-robot-") and run.info.run_name != "acme-robot"
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"].endswith("subject-finetune")
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    assert run.info.status == "FINISHED" and (run.info.end_time - run.info.start_time) / 1000 >= run.data.metrics["train/seconds"]
    first_loss = client.get_metric_history(run.info.run_id, "train/loss")[0]
    assert first_loss.timestamp < client.get_metric_history(run.info.run_id, "train/loss")[-1].timestamp  # sent as trained, not at the end
    assert f"registered as `{NAME}` version {champion.version}" in run.data.tags["mlflow.note.content"]  # the run's description
    # every metric in a section of the UI's charts: the curves ("train/") above the single values ("validation/")
    assert all(k.startswith(("system/", "train/", "validation/")) for k in run.data.metrics), sorted(run.data.metrics)
    model_files = {a.path for a in client.list_artifacts(run.info.run_id)} | set(stored_files(client, champion))
    assert "input_example.json" in model_files and "serving_input_example.json" in model_files
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"sample_grid.png", "loss_curve.png", "lineage.json", "samples"} <= artifacts
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "images")]  # validation samples, with their step
    assert any("validation_0+step+30+" in p for p in logged), logged
    # the embedded default's tiny judge ran: its scores are recorded, marked uncalibrated, not enforced
    judged = json.loads(tags["atelier.eval.judge"])
    assert judged["calibrated"] is False and judged["images"] >= 6 and judged["requests"] > 0
    gate_checks = json.loads(tags["atelier.gate"])["checks"]
    assert any(c["name"].startswith("judge_") and "uncalibrated" in c["detail"] for c in gate_checks)
    # what the Prefect UI shows: a readable name, searchable tags, and the model card on MLflow
    prefect_run = _flow_run(first_run["flow_run_id"])
    assert prefect_run.name == f"acme-robot-{first_run['flow_run_id'][:8]}" and prefect_run.state.name == "Completed"
    assert {"customer:acme", "subject:robot", f"model:{NAME}"} <= set(prefect_run.tags)
    # no UI started here: the links name where `atelier ui` will serve it, in MLflow's model-training view
    from atelier.kernel.settings import load_settings

    ui = f"http://127.0.0.1:{load_settings().mlflow_ui_port}"
    links = [str(a.data) for a in _artifacts(first_run["flow_run_id"]) if ui in str(a.data)]  # [text](url)
    assert any(f"{ui}/#/models/{NAME}/versions/{first_run['version']}?workflowType=machine_learning" in link for link in links), links
    assert "gate: **passed**" in champion.description and "acme/robot" in champion.description
    assert f"atelier generate {NAME}@champion" in client.get_registered_model(NAME).description
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    datasets = {i.dataset.name: i for i in run.inputs.dataset_inputs}  # the UI's Datasets column
    photos = datasets[f"photos acme/robot@{tags['atelier.data.rev'][:12]}"]
    assert {t.key: t.value for t in photos.tags}["dvc_md5"] == tags["atelier.data.dvc_md5"]
    assert any(name.startswith("class priors ") for name in datasets)


def test_generate_takes_the_models_options_and_writes_provenance_into_the_png(first_run, tmp_path):
    from PIL import Image

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "atelier.cli",
            "generate",
            f"{NAME}@champion",
            "--prompt",
            "a sks toy in the snow",
            "--seed",
            "7",
            "--steps",
            "2",
            "--guidance",
            "3.5",
            "--size",
            "32",
            "--negative-prompt",
            "blurry",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (png,) = tmp_path.glob("*.png")
    image = Image.open(png)
    assert image.size == (32, 32)
    assert image.text["prompt"] == "a sks toy in the snow" and image.text["seed"] == "7" and image.text["negative_prompt"] == "blurry"
    assert image.text["model"] == NAME and image.text["model_version"] == first_run["version"] and image.text["steps"] == "2"
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr  # third-party noise stays out


def test_champion_loads_with_plain_mlflow_in_a_fresh_process(first_run, workspace, tmp_path):
    code = (
        "import base64, io, mlflow.pyfunc, pandas as pd\n"
        "from PIL import Image\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "out = m.predict(pd.DataFrame({'prompt': ['a sks toy on the beach'], 'seed': [3]}))\n"
        "img = Image.open(io.BytesIO(base64.b64decode(out['image_png_base64'][0])))\n"
        "print('IMAGE', img.size, img.mode)\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": workspace.resolved_tracking_uri}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "IMAGE (64, 64) RGB" in done.stdout


def test_atelier_serve_answers_a_prompt_with_a_png_over_http(first_run, workspace, tmp_path):
    """What the model card says to run: `atelier serve NAME@champion`, then a POST to /invocations (a real
    HTTP request to MLflow's scoring server) answers with the image; Ctrl-C stops it with exit 130."""
    import base64
    import io
    import signal
    import socket
    import time

    import requests
    from PIL import Image

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ATELIER_WORKSPACE": str(workspace.workspace)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atelier.cli", "serve", f"{NAME}@champion", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        url, answer = f"http://127.0.0.1:{port}", None
        for _ in range(240):
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        answer = requests.post(
            f"{url}/invocations", json={"dataframe_records": [{"prompt": "a sks toy on the beach", "seed": 3, "steps": 2}]}, timeout=300
        )
        assert answer.status_code == 200, answer.text[:500]
        png = base64.b64decode(answer.json()["predictions"][0]["image_png_base64"])
        assert Image.open(io.BytesIO(png)).size == (64, 64)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert f"serving {NAME}/{first_run['version']} (every file checked against the ledger)" in err
    assert not list(tmp_path.glob("mlflow.db")) and "Traceback" not in err  # nothing created where it ran


def test_rerun_with_same_inputs_registers_nothing_new(first_run, workspace):
    from atelier.flows.subject_finetune import subject_finetune

    rows = len(workspace_ledger_rows(workspace))
    again = subject_finetune("acme", "robot")
    assert again["version"] == first_run["version"] and again["registered_before"] and again["gate"]["passed"]
    assert len(workspace_ledger_rows(workspace)) == rows  # the recorded decision stands: no new intent/promote rows


def test_second_subject_of_the_same_class_reuses_class_priors(first_run, workspace, client, tmp_path):
    from atelier.cli.demo_data import draw_robot
    from atelier.flows.subject_finetune import subject_finetune

    folder = tmp_path / "other"
    folder.mkdir()
    photos = []
    for i in range(4):
        photos.append(folder / f"other-{i}.png")
        draw_robot(5000 + i).save(photos[-1])
    add_subject(workspace, "acme", "robot2", "toy", photos)
    cached = sorted(p.name for p in workspace.priors_cache.iterdir())  # (other tests' classes may be there too)
    result = subject_finetune("acme", "robot2")
    first = client.get_model_version(NAME, first_run["version"]).tags["atelier.class_priors.key"]
    second = client.get_model_version(result["model"], result["version"]).tags["atelier.class_priors.key"]
    assert first == second and first in cached
    assert sorted(p.name for p in workspace.priors_cache.iterdir()) == cached  # nothing generated again
    assert result["training_key"] != first_run["training_key"]


def test_failed_gate_leaves_the_champion_alone(first_run, client, monkeypatch, tmp_path):
    from atelier.flows.subject_finetune import subject_finetune
    from atelier.tasks.dreambooth import TINY_CONFIG

    config = tmp_path / "short.yaml"
    config.write_text(TINY_CONFIG.read_text().replace("max_train_steps: 60", "max_train_steps: 6"))
    monkeypatch.setenv("ATELIER_GATE__MAX_FINAL_LOSS", "0.0001")
    result = subject_finetune("acme", "robot", config_path=str(config))
    assert not result["gate"]["passed"] and "final loss" in result["gate"]["reasons"][0]
    assert result["version"] != first_run["version"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == first_run["version"]
    refused = client.get_model_version(NAME, result["version"])
    assert json.loads(refused.tags["atelier.gate"])["passed"] is False and "final loss" in refused.tags["atelier.refused"]
    assert "candidate" not in refused.aliases  # a refused version is nobody's candidate
    assert "gate: **REFUSED**: final loss" in refused.description
    assert "candidate" not in client.get_registered_model(NAME).aliases
    state = _flow_run(result["flow_run_id"]).state  # not a plain green Completed: the UI says it was refused, and why
    assert state.is_completed() and state.name == "Refused" and "final loss" in state.message


def test_bad_photos_stop_the_flow_before_training(prefect_harness, workspace, client, robot_photos, tmp_path):
    from atelier.flows.subject_finetune import subject_finetune

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not an image")
    add_subject(workspace, "acme", "broken", "toy", [*robot_photos[:3], corrupt])  # bypasses the CLI's check
    runs_before = set((workspace.runs_dir / "acme").iterdir())
    with pytest.raises(DataValidationError) as err:
        subject_finetune("acme", "broken")
    assert "corrupt.jpg" in str(err.value) and "decodable" in str(err.value)
    assert set((workspace.runs_dir / "acme").iterdir()) == runs_before  # no training started
    assert not client.search_registered_models("name = 'dreambooth-acme-broken'")
    assert list((workspace.state_dir / "reports" / "validation" / "acme" / "broken").glob("*/validation.json"))


def test_a_base_model_that_is_not_sd_is_refused(prefect_harness, robot_photos, tmp_path):
    from atelier.flows.subject_finetune import subject_finetune

    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelFormatError, match="FluxPipeline"):
        subject_finetune("acme", "robot", base_model=str(tmp_path))


def test_lineage_of_the_champion_reaches_every_input_file(first_run, workspace, client, robot_photos):
    from atelier.registry.ledger import open_ledger
    from atelier.registry.lineage import lineage, verify

    report = lineage(client, open_ledger(workspace), f"{NAME}@champion")
    assert report["version"] == first_run["version"]
    assert report["data"]["files"] == {p.name: sha256_file(p) for p in robot_photos}
    assert report["data"]["rev"] == first_run["data_rev"]
    assert report["prefect_flow_run"]["id"] == first_run["flow_run_id"]
    assert report["run"]["params"]["max_train_steps"] == "60"
    assert report["class_priors"]["key"] != "none" and report["base_model"]["sha256"]
    assert report["lineage_record"]["sha256_matches_tag"] is True and report["params"]["max_train_steps"] == 60
    assert any(r["action"] == "promote" and r["version"] == first_run["version"] for r in report["promotions"])
    assert verify(workspace, report) == []


def test_promote_rollback_and_ledger_through_the_cli(first_run, workspace, client):
    from sqlalchemy import create_engine, text
    from typer.testing import CliRunner

    from atelier.cli.main import app

    runner = CliRunner()
    refused = [
        r
        for r in client.search_model_versions(f"name = '{NAME}'")
        if r.tags.get("atelier.gate") and not json.loads(r.tags["atelier.gate"])["passed"]
    ]
    other = str(refused[0].version)  # refused under a strict gate earlier; passes the default rules
    # the operator promotes another training on purpose (the comparison with the champion is test_ledger_audit's)
    out = runner.invoke(
        app, ["promote", NAME, other, "--reason", "reviewed the samples by hand"], env={"ATELIER_GATE__CHALLENGER__ENABLED": "false"}
    )
    assert out.exit_code == 0, out.output
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == other
    out = runner.invoke(app, ["rollback", NAME, "--reason", "customer preferred the old one"])
    assert out.exit_code == 0, out.output
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == first_run["version"]
    shown = runner.invoke(app, ["ledger", "show", NAME]).output
    assert "rollback" in shown and "reviewed the samples by hand" in shown and "refuse" in shown
    out = runner.invoke(app, ["lineage", f"{NAME}@champion"])
    assert out.exit_code == 0 and "rollback" in out.output and "sha256" in out.output
    assert runner.invoke(app, ["ledger", "verify"]).exit_code == 0
    engine = create_engine(workspace.resolved_ledger_url)
    with engine.begin() as conn:
        original = conn.execute(text("SELECT actor FROM promotion_ledger WHERE seq = 1")).scalar_one()
        conn.execute(text("UPDATE promotion_ledger SET actor = 'someone else' WHERE seq = 1"))
    out = runner.invoke(app, ["ledger", "verify"])
    assert out.exit_code == 5 and "edited" in out.output
    with engine.begin() as conn:  # put it back for the tests after this one
        conn.execute(text("UPDATE promotion_ledger SET actor = :a WHERE seq = 1"), {"a": original})
    assert runner.invoke(app, ["ledger", "verify"]).exit_code == 0


def test_lineage_verify_reports_tampered_model_artifacts(first_run, workspace, client):
    from atelier.registry.ledger import open_ledger
    from atelier.registry.lineage import lineage, verify

    versions = sorted(client.search_model_versions(f"name = '{NAME}'"), key=lambda v: int(v.version))
    victim = versions[-1]
    report = lineage(client, open_ledger(workspace), f"{NAME}/{victim.version}")
    from urllib.parse import urlparse

    model_id = victim.source.removeprefix("models:/")
    stored = Path(urlparse(client.get_logged_model(model_id).artifact_location).path)
    config = stored / "artifacts" / "pipeline" / "unet" / "config.json"
    config.write_text(config.read_text().replace('"sample_size": 32', '"sample_size": 33'))
    drift = verify(workspace, report)
    assert any(d.startswith("model files") and "artifacts/pipeline/unet/config.json: changed" in d for d in drift), drift
    # the lineage record itself: an edited lineage.json no longer matches the hash tagged on the version
    record = Path(urlparse(client.get_run(victim.run_id).info.artifact_uri).path) / "lineage.json"
    edited = json.loads(record.read_text())
    edited["params"]["learning_rate"] = 1.0  # a record that no longer says how the model was trained
    record.write_text(json.dumps(edited))
    report = lineage(client, open_ledger(workspace), f"{NAME}/{victim.version}")
    assert report["lineage_record"]["sha256_matches_tag"] is False
    assert any(d.startswith("lineage.json") for d in verify(workspace, report))


def test_a_rewritten_wrapper_or_code_file_in_the_artifact_store_never_runs(first_run, workspace, client, tmp_path):
    """The audit's attack, as models-from-code: whoever can write the artifact store rewrites the stored wrapper
    (or a module under code/) to run a command. `generate` refuses the version with exit 5 naming the file,
    before loading anything of it; lineage --verify names it too. Nothing is unpickled anywhere."""
    from urllib.parse import urlparse

    mv = client.get_model_version_by_alias(NAME, "champion")
    stored = Path(urlparse(client.get_logged_model(mv.source.removeprefix("models:/")).artifact_location).path)
    assert not list(stored.rglob("*.pkl")) and (stored / "dreambooth_model.py").is_file()
    marker = tmp_path / "planted-code-ran"
    for victim in (stored / "dreambooth_model.py", stored / "code" / "atelier" / "registry" / "pyfunc.py"):
        original = victim.read_text()
        victim.write_text(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n" + original)
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "atelier.cli",
                    "generate",
                    f"{NAME}@champion",
                    "--prompt",
                    "x",
                    "--steps",
                    "1",
                    "--out",
                    str(tmp_path / "out"),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
        finally:
            victim.write_text(original)
        assert done.returncode == 5, done.stderr[-2000:]
        assert f"{victim.relative_to(stored).as_posix()}: changed" in done.stderr and "Traceback" not in done.stderr
        assert not marker.exists()


def test_the_finetune_is_a_dvc_stage_downstream_of_photos_and_priors(first_run, workspace):
    """`dvc dag` connects the subject's photos and the class priors to its fine-tune, and `dvc repro`
    of that stage runs the flow (cached: nothing new is registered) and records it in dvc.lock."""
    import yaml

    from atelier.kernel.stages import reproduce_stage

    ws = workspace.workspace
    assert "acme.robot" in yaml.safe_load((ws / "subjects.yaml").read_text())["subjects"]  # `subject add` listed it
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    dag = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--dot", "finetune@acme.robot"], cwd=ws, capture_output=True, text=True, env=env
    )
    assert dag.returncode == 0, dag.stderr
    edges = dag.stdout.replace('"', "")
    assert "data/subjects/acme/robot.dvc -> finetune@acme.robot" in edges and "class_priors@toy -> finetune@acme.robot" in edges, edges
    reproduce_stage(workspace, "finetune@acme.robot", "fine-tune (test)")
    record = json.loads((ws / "models" / "acme.robot.json").read_text())
    assert record["model"] == NAME and record["version"] == first_run["version"] and record["gate_passed"] is True
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "finetune@acme.robot"], cwd=ws, capture_output=True, text=True, env=env)
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout


def test_two_identical_finetunes_at_once_train_once_and_register_once(first_run, workspace, client, tmp_path):
    """Two `atelier finetune` of the same subject and data started together: one trains, the other
    waits on the training key's lock, then uses the version the first registered."""
    add_subject(workspace, "acme", "twin", "toy", write_demo_photos(tmp_path / "twin", count=4))
    before = len(workspace_ledger_rows(workspace))
    procs = []
    for _ in range(2):  # 5 s apart: each command's temporary Prefect server migrates the same database on start
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "atelier.cli", "finetune", "acme", "twin"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        time.sleep(5)
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    versions = client.search_model_versions("name = 'dreambooth-acme-twin'")
    assert len(versions) == 1, [v.version for v in versions]
    assert sum("waiting for it to finish" in out for out in outputs) == 1, outputs
    actions = [r.action for r in workspace_ledger_rows(workspace)[before:]]
    assert actions.count("promote") == 1, actions  # the waiting run wrote nothing to the ledger


def workspace_ledger_rows(workspace):
    from atelier.registry.ledger import open_ledger

    return open_ledger(workspace).rows()


def test_atelier_models_lists_versions_with_aliases_and_verdicts(first_run, workspace, client):
    from typer.testing import CliRunner

    from atelier.cli.main import app

    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["models", "--customer", "acme", "--json"]).output)
    robot = next(m for m in listed if m["name"] == NAME)
    assert robot["customer"] == "acme" and robot["kind"] == "dreambooth"
    champion = client.get_model_version_by_alias(NAME, "champion").version
    by_version = {v["version"]: v for v in robot["versions"]}
    assert "champion" in by_version[str(champion)]["aliases"] and by_version[str(champion)]["verdict"] == "passed"
    assert [int(v["version"]) for v in robot["versions"]] == sorted(map(int, by_version), reverse=True)
    text = runner.invoke(app, ["models"]).output
    assert f"{NAME}  (dreambooth, customer acme)" in text and "@champion" in text
    assert runner.invoke(app, ["models", "--customer", "nobody"]).output.startswith("no registered models for customer nobody")
    assert runner.invoke(app, ["models", "--customer", "../x"]).exit_code == 2


def test_atelier_customer_list_shows_subjects_models_and_champions(first_run, workspace, client):
    from typer.testing import CliRunner

    from atelier.cli.main import app

    runner = CliRunner()
    listed = {r["customer"]: r for r in json.loads(runner.invoke(app, ["customer", "list", "--json"]).output)}
    champion = client.get_model_version_by_alias(NAME, "champion").version
    assert "robot" in listed["acme"]["subjects"] and listed["acme"]["models"][NAME] == str(champion)
    text = runner.invoke(app, ["customer", "list"]).output
    assert f"{NAME} (champion v{champion})" in text and "  credentials: " in text


def test_atelier_compare_names_what_changed_between_two_versions(first_run, workspace, client):
    from typer.testing import CliRunner

    from atelier.cli.main import app
    from atelier.registry.compare import difference
    from atelier.registry.ledger import open_ledger
    from atelier.registry.lineage import lineage

    runner = CliRunner()
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{NAME}'"))
    first, last = versions[0], versions[-1]
    done = runner.invoke(app, ["compare", f"{NAME}/{first}", f"{NAME}/{last}", "--json"])
    assert done.exit_code == 0, done.output
    diff = json.loads(done.output)
    assert diff["a"] == f"{NAME}/{first}" and diff["b"] == f"{NAME}/{last}" and len(diff["gate"]) == 2
    report = lineage(client, open_ledger(workspace), f"{NAME}/{first}")
    same = difference(report, report)
    assert same["params"] == {} and same["metrics"] == {} and same["inputs"] == {} and same["data"]["changed"] == []
    other = json.loads(json.dumps(report))
    other["data"]["files"] = {**(report["data"]["files"] or {}), "new.png": "0" * 64}
    other["run"]["metrics"] = {**report["run"]["metrics"], "final_loss": 9.0}
    changed = difference(report, other)
    assert changed["data"]["added"] == ["new.png"] and changed["metrics"]["final_loss"][1] == 9.0
    text = runner.invoke(app, ["compare", f"{NAME}/{first}", f"{NAME}/{first}"]).output
    assert "no difference in parameters, metrics, photos or inputs" in text


def test_atelier_logs_prints_a_runs_log_and_how_it_ended(first_run):
    from typer.testing import CliRunner

    from atelier.cli.main import app

    runner = CliRunner()
    short = str(first_run["flow_run_id"])[:8]
    done = runner.invoke(app, ["logs", short])
    assert done.exit_code == 0, done.output
    assert str(first_run["flow_run_id"]) in done.output and "subject-finetune" in done.output
    assert done.output.rstrip().splitlines()[-1].startswith("state: Completed") and len(done.output.splitlines()) > 5
    as_json = json.loads(runner.invoke(app, ["logs", short, "--json"]).output)
    assert as_json["id"] == str(first_run["flow_run_id"]) and as_json["lines"]
    missing = runner.invoke(app, ["logs", "ffffffff-none"])
    assert missing.exit_code == 2 and "matches no flow run" in missing.output


def test_ctrl_c_during_registration_is_exit_130_and_registers_nothing(first_run, workspace, client, robot_photos):
    """SIGINT a moment after the samples are written (registration under way): the command says so within
    seconds and ends with exit 130 and no traceback, and no version of the model exists; a rerun registers once.
    The suite's commands start a temporary Prefect server each (ATELIER_PREFECT_SERVER=temporary), which Prefect
    gives up to 5 s to stop after the command's own end: the reaction is timed to the message, the exit more
    loosely (11.5 s under the suite's load with the images building beside it, 5.4 s on a quiet machine)."""
    import signal
    import time

    add_subject(workspace, "acme", "sigint", "toy", robot_photos)
    env = {**os.environ, "ATELIER_WORKSPACE": str(workspace.workspace)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atelier.cli", "finetune", "acme", "sigint"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "sample-images" in line and "Finished in state" in line:  # registration starts next
            time.sleep(0.2)
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    said = None
    for line in proc.stderr:
        seen.append(line)
        if "interrupted: stopped" in line:
            said = time.monotonic() - sent
            break
    _, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130, err[-4000:]
    assert said is not None and said < 10 and "Traceback" not in err, err[-4000:]
    assert time.monotonic() - sent < 30
    assert client.search_model_versions("name = 'dreambooth-acme-sigint'") == []
