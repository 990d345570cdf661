"""Batch inference and schedules: manifests, exactly-once outputs (kill and rerun), a moved alias,
S3 through moto's server, batch OCR, deployments served by `atelier worker`, `atelier runs`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from atelier.models.batch.manifest import default_seed, parse_generation_manifest

CUSTOMER, SUBJECT = "batchco", "robot"


def test_manifest_names_each_bad_line_and_keeps_the_good_ones():
    text = "\n".join(
        [
            json.dumps({"id": "a", "prompt": "a sks toy", "seed": 3, "size": [64, 48], "steps": 4}),
            "{not json",
            json.dumps({"id": "a", "prompt": "again"}),
            json.dumps({"prompt": "no id"}),
            json.dumps({"id": "../../etc/passwd", "prompt": "x"}),
            json.dumps({"id": "b", "prompt": "p", "size": 60}),
            json.dumps({"id": "c", "prompt": "p", "colour": "red"}),
            json.dumps({"id": "d", "prompt": "p", "steps": 2.5}),
            "",
            json.dumps({"id": "e", "prompt": "fine"}),
        ]
    )
    items, invalid = parse_generation_manifest(text)
    assert [i.id for i in items] == ["a", "e"]
    assert (items[0].width, items[0].height, items[0].seed) == (64, 48, 3)
    assert items[1].seed == default_seed("e") == parse_generation_manifest(json.dumps({"id": "e", "prompt": "x"}))[0][0].seed
    errors = {b.line: b.error for b in invalid}
    assert "not JSON" in errors[2] and "repeats id 'a' of line 1" in errors[3] and "misses `id`" in errors[4]
    assert "must be 1-128 letters" in errors[5] and "multiples of 8" in errors[6] and "colour" in errors[7] and "whole" in errors[8]


def test_store_keys_cannot_escape_and_local_writes_are_atomic(tmp_path):
    from atelier.kernel.objectstore import StoreError, open_store

    store = open_store(str(tmp_path / "out"))
    for bad in ("../x", "/abs", "a/../../b", ""):
        with pytest.raises(StoreError):
            store.write_bytes(bad, b"x")
    store.write_bytes("images/a.png", b"123")
    (tmp_path / "out" / "images" / ".b.png.123.tmp").write_bytes(b"half")  # a temporary left by a killed writer
    assert store.list() == ["images/a.png"]


# --- flows: one registered subject model (two versions) shared by the tests below -------------------------


@pytest.fixture(scope="module")
def versions(prefect_harness, workspace, tmp_path_factory):
    """dreambooth-batchco-robot v1 (champion) and v2 (a different step count), both registered."""
    from atelier.cli.demo_data import write_demo_photos
    from atelier.flows.subject_finetune import subject_finetune
    from atelier.kernel.workspace import add_subject
    from atelier.tasks.dreambooth import TINY_CONFIG

    photos = write_demo_photos(tmp_path_factory.mktemp("photos"), count=5)
    add_subject(workspace, CUSTOMER, SUBJECT, "toy", photos)
    first = subject_finetune(CUSTOMER, SUBJECT)
    cfg = yaml.safe_load(Path(TINY_CONFIG).read_text())
    cfg["max_train_steps"] = 30
    other = tmp_path_factory.mktemp("cfg") / "tiny-30.yaml"
    other.write_text(yaml.safe_dump(cfg))
    second = subject_finetune(CUSTOMER, SUBJECT, config_path=str(other))
    assert first["version"] != second["version"]
    _promote(workspace, first["model"], first["version"])
    return first["model"], first["version"], second["version"]


def _promote(workspace, name: str, version: str) -> None:
    """Through the gate and the ledger, as an operator would (an alias moved with the MLflow client is
    drift that `atelier ledger verify` reports)."""
    from atelier.kernel.settings import ChallengerRules
    from atelier.registry.client import client_for
    from atelier.registry.ledger import open_ledger
    from atelier.registry.promotion import promote

    # these tests move the alias between two trainings on purpose: the champion/challenger comparison is not their subject
    rules = workspace.gate.model_copy(update={"challenger": ChallengerRules(enabled=False)})
    done = promote(client_for(workspace), open_ledger(workspace), name, version, actor="tests", reason="batch test", rules=rules)
    assert done.passed, done.reasons


def manifest(path: Path, n: int, steps: int = 4, start: int = 0) -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": f"item-{i:03d}", "prompt": f"a sks toy number {i}", "steps": steps}) + "\n" for i in range(start, start + n)
        )
    )
    return path


def records(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_a_batch_for_another_customers_model_is_refused_before_any_run(versions, workspace, tmp_path):
    """Exit 2 with one line naming the owner, no Prefect run and no traceback (it was a failed flow run)."""
    name, _, _ = versions
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "atelier.cli",
            "batch-generate",
            "globex",
            "widget",
            "--model",
            f"{name}@champion",
            "--manifest",
            str(manifest(tmp_path / "m.jsonl", 1)),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and f"belongs to customer {CUSTOMER!r}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_killed_run_started_again_makes_every_item_exactly_once(versions, workspace, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from atelier.flows.batch import batch_generate

    name, v1, _ = versions
    m = manifest(tmp_path / "m.jsonl", 16, steps=12)  # slow enough that the kill lands mid-run
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atelier.cli",
            "batch-generate",
            CUSTOMER,
            SUBJECT,
            "--manifest",
            str(m),
            "--out",
            str(out),
            "--batch-size",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "items").glob("*.json"))) < 3:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.stem: p.read_bytes() for p in (out / "items").glob("*.json")}
    assert 3 <= len(done) < 16 and not (out / "manifest.jsonl").exists()  # killed mid-run
    images_before = {p.name: p.read_bytes() for p in (out / "images").glob("*.png")}
    victim = sorted(done)[0]
    (out / "images" / f"{victim}.png").write_bytes(b"truncated")  # a payload that no longer verifies
    (out / "images" / ".item-015.png.x.tmp").write_bytes(b"half")  # a partial file: never counts

    result = batch_generate(CUSTOMER, SUBJECT, str(m), str(out), batch_size=4)
    got = records(out)
    assert sorted(got) == [f"item-{i:03d}" for i in range(16)]
    assert sorted(p.name for p in (out / "images").glob("*.png")) == sorted(f"{k}.png" for k in got)
    assert result["redone"] == [victim] and result["done_before"] == len(done) - 1 and result["written"] == 16 - len(done) + 1
    for key, data in images_before.items():
        if key != f"{victim}.png" and key.removesuffix(".png") in done:
            assert (out / "images" / key).read_bytes() == data  # verified items were not made again
    assert all(r["model"] == f"{name}/{v1}" for r in got.values())
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == 16 and report["invalid"] == [] and report["failed"] == []


@pytest.mark.slow
def test_a_moved_alias_each_output_names_the_version_that_made_it(versions, workspace, tmp_path):
    from atelier.flows.batch import batch_generate

    name, v1, v2 = versions
    m1 = manifest(tmp_path / "m1.jsonl", 3)
    batch_generate(CUSTOMER, SUBJECT, str(m1), str(tmp_path / "a"))
    _promote(workspace, name, v2)  # promoted between two runs
    try:
        batch_generate(CUSTOMER, SUBJECT, str(m1), str(tmp_path / "b"))
        m2 = manifest(tmp_path / "m2.jsonl", 5)  # the first 3 again plus 2 new, into the first run's folder
        again = batch_generate(CUSTOMER, SUBJECT, str(m2), str(tmp_path / "a"))
    finally:
        _promote(workspace, name, v1)
    assert {r["model"] for r in records(tmp_path / "b").values()} == {f"{name}/{v2}"}
    a = records(tmp_path / "a")
    assert [a[f"item-{i:03d}"]["model"] for i in range(5)] == [f"{name}/{v1}"] * 3 + [f"{name}/{v2}"] * 2
    assert again["model"] == f"{name}/{v2}" and again["done_before"] == 3


@pytest.mark.slow
def test_bad_references_are_named(versions, workspace, tmp_path):
    from atelier.flows.batch import batch_generate
    from atelier.kernel.errors import AtelierError

    name, _, _ = versions
    m = manifest(tmp_path / "m.jsonl", 1)
    with pytest.raises(AtelierError, match="has no alias 'no-such-alias'; its versions: 1, 2"):
        batch_generate(CUSTOMER, SUBJECT, str(m), str(tmp_path / "o"), model=f"{name}@no-such-alias")
    with pytest.raises(AtelierError, match="not in the registry"):
        batch_generate(CUSTOMER, SUBJECT, str(m), str(tmp_path / "o"), model="dreambooth-batchco-nosuch@champion")
    with pytest.raises(AtelierError, match="belongs to customer 'batchco'"):
        batch_generate("othercust", SUBJECT, str(m), str(tmp_path / "o"), model=f"{name}@champion")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    with pytest.raises(AtelierError, match="no valid item"):
        batch_generate(CUSTOMER, SUBJECT, str(bad), str(tmp_path / "o2"))
    assert "not JSON" in json.loads((tmp_path / "o2" / "report.json").read_text())["invalid"][0]["error"]  # still reported
    from atelier.flows.runs import recent_runs

    failed = [r for r in recent_runs(20) if r["state"] in ("Failed", "Refused", "Crashed")]  # `atelier runs` says why
    assert any("no valid item" in (r["note"] or "") for r in failed), [(r["state"], r["note"]) for r in failed]


@pytest.fixture
def moto_s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "ATELIER_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(key, value)
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    client.create_bucket(Bucket="atelier")
    yield client
    server.stop()


@pytest.mark.slow
def test_batch_generate_reads_and_writes_s3(versions, moto_s3, tmp_path):
    from atelier.flows.batch import batch_generate

    name, v1, _ = versions
    moto_s3.put_object(Bucket="atelier", Key="in/prompts.jsonl", Body=manifest(tmp_path / "m.jsonl", 3).read_bytes())
    first = batch_generate(CUSTOMER, SUBJECT, "s3://atelier/in/prompts.jsonl", "s3://atelier/out/{date}")
    keys = {o["Key"] for o in moto_s3.list_objects_v2(Bucket="atelier", Prefix="out/")["Contents"]}
    day = first["out"].rsplit("/", 1)[1]
    assert {f"out/{day}/images/item-00{i}.png" for i in range(3)} <= keys and f"out/{day}/manifest.jsonl" in keys
    lines = moto_s3.get_object(Bucket="atelier", Key=f"out/{day}/manifest.jsonl")["Body"].read().decode().splitlines()
    assert [json.loads(x)["model"] for x in lines] == [f"{name}/{v1}"] * 3
    again = batch_generate(CUSTOMER, SUBJECT, "s3://atelier/in/prompts.jsonl", "s3://atelier/out/{date}")
    assert again["written"] == 0 and again["done_before"] == 3


@pytest.mark.slow
def test_batch_ocr_reads_a_folder_once_and_names_bad_files(prefect_harness, workspace, tmp_path):
    from PIL import Image, ImageDraw

    from atelier.flows.batch import batch_ocr
    from atelier.models.ocr.engine import shipped_engine_files
    from atelier.registry.ocr import register_ocr

    files, spec = shipped_engine_files({"en": "ppocr", "zh": "ppocr"})
    reg = register_ocr(workspace, files, spec, {}, {"calibration.key": "batch-test"}, {}, {}, 0.5)
    docs = tmp_path / "docs"
    (docs / "sub dir").mkdir(parents=True)
    img = Image.new("RGB", (320, 48), "white")
    ImageDraw.Draw(img).text((8, 16), "HELLO", fill="black")
    img.save(docs / "one.png")
    img.save(docs / "sub dir" / "two.png")
    (docs / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "read"
    first = batch_ocr(str(docs), str(out), model=f"ocr/{reg.version}", lang="en", kind="line")
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == ["broken.png", "one.png", "sub dir/two.png"]
    assert "not an image" in rows[0]["error"] and rows[1]["error"] == "" and rows[1]["model"] == f"ocr/{reg.version}"
    assert first["written"] == 3 and len(first["failed"]) == 1
    assert f"{docs}/broken.png" in rows[0]["error"] and "atelier-ocr-" not in rows[0]["error"]  # the user's file, not a temporary copy
    again = batch_ocr(str(docs), str(out), model=f"ocr/{reg.version}", lang="en", kind="line")
    assert again["written"] == 0 and again["done_before"] == 3
    # the command: a batch with items not done is exit 7 (not 0), each one named by the user's path
    from prefect.settings import PREFECT_API_URL

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "atelier.cli",
            "batch-ocr",
            str(docs),
            "--out",
            str(tmp_path / "cli"),
            "--model",
            f"ocr/{reg.version}",
            "--lang",
            "en",
            "--lines",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
    )
    assert done.returncode == 7, done.stdout + done.stderr[-3000:]
    assert f"not done: {docs}/broken.png" in done.stderr and "1 item(s) of the batch" in done.stderr and "Traceback" not in done.stderr
    # clips in the folder: their text as cues with times, once per (file, sampling); another interval reads them again
    from tests.video_clips import make_clip

    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(clips / "a.mp4", [(1.0, 2.0, "HELLO", "en")], duration=3.0)
    (clips / "cut.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    read = batch_ocr(str(clips), str(tmp_path / "clips-read"), model=f"ocr/{reg.version}", every=0.5)
    rows = {r["path"]: r for r in (json.loads(x) for x in (tmp_path / "clips-read" / "results.jsonl").read_text().splitlines())}
    assert [c["text"] for c in rows["a.mp4"]["cues"]] == ["HELLO"] and rows["a.mp4"]["cues"][0]["start"] == 1.0
    assert "cut.mp4" in rows["cut.mp4"]["error"] and read["written"] == 2 and len(read["failed"]) == 1
    assert batch_ocr(str(clips), str(tmp_path / "clips-read"), model=f"ocr/{reg.version}", every=0.5)["done_before"] == 2
    assert batch_ocr(str(clips), str(tmp_path / "clips-read"), model=f"ocr/{reg.version}", every=1.0)["written"] == 2


@pytest.mark.slow
def test_deployments_are_served_by_the_worker_and_a_triggered_retrain_is_a_noop(versions, workspace, tmp_path):
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from atelier.flows.runs import recent_runs

    sched = tmp_path / "schedules.yaml"
    sched.write_text(
        yaml.safe_dump(
            {
                "retrain": [{"customer": CUSTOMER, "subject": SUBJECT, "cron": "0 3 * * *"}],
                "batch_generate": [
                    {
                        "customer": CUSTOMER,
                        "subject": SUBJECT,
                        "manifest": str(manifest(tmp_path / "m.jsonl", 2)),
                        "out": str(tmp_path / "sched-{date}"),
                        "cron": "0 2 * * *",
                    }
                ],
                "ocr_recalibrate": {"cron": "0 4 * * 0"},
            }
        )
    )
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "atelier.cli", "deploy", "--file", str(sched)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with get_client(sync_client=True) as client:
        retrain = client.read_deployment_by_name(f"subject-finetune/retrain-{CUSTOMER}-{SUBJECT}")
        batch = client.read_deployment_by_name(f"batch-generate/batch-{CUSTOMER}-{SUBJECT}")
        assert retrain.schedules[0].schedule.cron == "0 3 * * *" and batch.schedules[0].schedule.cron == "0 2 * * *"
        assert retrain.global_concurrency_limit.limit == 1 and batch.global_concurrency_limit is None  # batch never waits on retraining
        assert retrain.parameters["skip_if_unchanged"] is True
        client.read_deployment_by_name("ocr-calibrate/ocr-recalibrate")

    worker = subprocess.Popen(
        [sys.executable, "-m", "atelier.cli", "worker", "--file", str(sched)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        run = run_deployment(f"subject-finetune/retrain-{CUSTOMER}-{SUBJECT}", timeout=240)
        assert run.state.is_completed(), run.state
        gen = run_deployment(f"batch-generate/batch-{CUSTOMER}-{SUBJECT}", timeout=240)
        assert gen.state.is_completed(), gen.state
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    rows = {r["id"]: r for r in recent_runs(50)}
    assert rows[str(run.id)]["note"].startswith("no-op: inputs unchanged since")
    assert rows[str(run.id)]["deployment"] == f"retrain-{CUSTOMER}-{SUBJECT}"
    assert rows[str(gen.id)]["model"].startswith(f"dreambooth-{CUSTOMER}-{SUBJECT}/") and "manifest.jsonl" in rows[str(gen.id)]["outputs"]
    assert len(list(tmp_path.glob("sched-*/images/*.png"))) == 2
    shown = subprocess.run(
        [sys.executable, "-m", "atelier.cli", "runs", "--flow", "subject-finetune", "--limit", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0 and f"retrain-{CUSTOMER}-{SUBJECT}" in shown.stdout and "no-op" in shown.stdout, (
        shown.stdout + shown.stderr
    )
