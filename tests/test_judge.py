"""The VLM judge: the HTTP backend against a local OpenAI-compatible server (serving the tiny local
GLM-4.1V with log-probabilities) and its injected faults; scoring, cache, failures; the gate."""

from __future__ import annotations

import io
import json
import math
import time

import pytest
from PIL import Image

from atelier.models.vlm.base import JudgeError, JudgeUnavailable
from atelier.models.vlm.http import HttpJudge
from atelier.models.vlm.scoring import Cache, Scorer, judge_images, p_yes, parse_caption
from tests.judge_server import Server, make_app
from tests.tiny_glm import build_tiny_glm4v

KEY = "sk-test-secret-123"


def png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from atelier.models.vlm.local import LocalJudge

    local = LocalJudge(build_tiny_glm4v(tmp_path_factory.mktemp("glm4v")))
    with Server(make_app(local)) as srv:
        yield srv


@pytest.fixture
def faults(server):
    server.app.state.faults.clear()
    server.app.state.seen.clear()
    yield server.app.state.faults
    server.app.state.faults.clear()


def judge(server, **kw) -> HttpJudge:
    return HttpJudge(server.url, "glm-4.5v", KEY, **{"timeout": 5.0, "backoff": 0.05, **kw})


def test_yes_probability_from_logprobs_or_text():
    assert p_yes({"yes": math.log(0.6), "no": math.log(0.2), "maybe": math.log(0.2)}, "") == pytest.approx(0.75)
    assert p_yes({" Yes": math.log(0.9), "No.": math.log(0.1)}, "") == pytest.approx(0.9)
    assert p_yes(None, "No, it does not.") == 0.0 and p_yes({"the": -0.1}, "Yes.") == 1.0
    assert p_yes(None, "It is hard to say") is None
    assert parse_caption('```json\n{"caption": "a toy", "objects": [{"label": "toy", "box": [1, 2, 3, 4]}, {"label": 5}]}\n```') == (
        {"caption": "a toy", "objects": [{"label": "toy", "box": [1, 2, 3, 4]}]},
        "",
    )
    assert parse_caption("I'm sorry, I can't do that")[1] == "refused" and parse_caption("{}")[1] == "no caption field"


def test_http_judge_serves_the_local_model_with_logprobs_and_counts_tokens(server, faults):
    j = judge(server)
    answer = j.ask([png("red"), png("blue")], "Does this image show a toy? Answer yes or no.")
    assert answer.first_token_logprobs and all(v <= 0 for v in answer.first_token_logprobs.values())
    assert j.usage.requests == 1 and j.usage.prompt_tokens == 10 + 128 and j.usage.completion_tokens == 3
    auth, n_images, _ = server.app.state.seen[-1]
    assert auth == f"Bearer {KEY}" and n_images == 2
    assert KEY not in repr(j.__dict__) and KEY not in j.name  # the key lives only in the HTTP client's headers


def test_429_with_retry_after_and_500_are_retried(server, faults):
    faults.extend(["429:1", "500", "yes:0.8"])
    j = judge(server)
    t = time.perf_counter()
    answer = j.ask([png("red")], "Does this image show a toy?")
    assert time.perf_counter() - t >= 1.0  # Retry-After honoured
    assert j.usage.retries == 2 and p_yes(answer.first_token_logprobs, answer.text) == pytest.approx(0.8)


def test_timeouts_then_unavailable_and_malformed_answers_are_errors(server, faults):
    faults.extend(["sleep:2", "sleep:2", "sleep:2"])
    with pytest.raises(JudgeUnavailable, match="did not answer after 2 retries.*Timeout"):
        judge(server, timeout=0.5, max_retries=2).ask([png("red")], "q")
    faults.clear()
    faults.append("malformed")
    with pytest.raises(JudgeError, match="without the chat-completions fields"):
        judge(server).ask([png("red")], "q")
    with pytest.raises(JudgeUnavailable):
        HttpJudge("http://127.0.0.1:9/v1", "m", timeout=0.5, max_retries=1, backoff=0.01).ask([png("red")], "q")


def test_refusals_and_bad_json_are_retried_once_then_counted_as_failures_never_passes(server, faults, tmp_path):
    faults.extend(
        ["refuse", "refuse", "text:not json", """text:{"caption": "a red square", "objects": []}""", "text:perhaps", "text:unclear"]
    )
    scorer = Scorer(judge(server), Cache(tmp_path))
    assert scorer.caption(png("red"), "a.png")["caption"] is None  # refused twice
    assert scorer.caption(png("blue"), "b.png")["caption"] == "a red square"  # bad JSON, then good on the stricter retry
    assert scorer.prompt_score(png("green"), "a toy", "c.png")["score"] is None  # neither yes nor no, twice
    assert [f["item"] for f in scorer.failures] == ["a.png", "c.png"] and scorer.failures[0]["problem"] == "refused"
    prompts = [p for _, _, p in server.app.state.seen]
    assert "JSON object only" in prompts[1] and "exactly one word" in prompts[5]


def test_judgments_are_cached_by_image_prompt_and_model(server, faults, tmp_path):
    faults.extend(["yes:0.9", "yes:0.2"])
    scorer = Scorer(judge(server), Cache(tmp_path))
    first = scorer.prompt_score(png("red"), "a toy")
    again = Scorer(judge(server), Cache(tmp_path)).prompt_score(png("red"), "a toy")  # a rerun: no request
    other = scorer.prompt_score(png("blue"), "a toy")
    assert first == again and first["score"] == pytest.approx(0.9) and other["score"] == pytest.approx(0.2)
    assert len(server.app.state.seen) == 2


def test_judge_images_summary_and_the_gate_checks(server, faults):
    from atelier.kernel.settings import JudgeGateRules
    from atelier.registry.gate import evaluate_judge

    # 2 samples (prompt + fidelity each), 1 class image (leak): scripted answers
    faults.extend(["yes:0.9", "yes:0.8", "yes:0.7", "yes:0.6", "yes:0.1"])
    rows, summary = judge_images(
        Scorer(judge(server, concurrency=1)),
        [("0.png", png("red"), "a toy"), ("1.png", png("blue"), "a toy")],
        [png("red")],
        [("c.png", png("grey"))],
        captions=False,
    )
    assert summary["prompt_score"] == pytest.approx(0.8) and summary["fidelity"] == pytest.approx(0.7)
    assert summary["prior_leak"] == pytest.approx(0.1) and summary["failures"] == 0 and summary["calibrated"]
    rules = JudgeGateRules()
    assert all(c.passed for c in evaluate_judge(summary, rules))
    low = evaluate_judge({**summary, "fidelity": 0.3}, rules)
    assert [c.name for c in low if not c.passed] == ["judge_fidelity"]
    assert all(c.passed for c in evaluate_judge({**summary, "fidelity": 0.3, "calibrated": False}, rules))  # recorded, not enforced
    down = evaluate_judge({"error": "glm-4.5v did not answer", "calibrated": False}, rules)
    assert not down[0].passed and "unavailable" in down[0].detail


@pytest.mark.slow
def test_flow_gate_promotes_above_threshold_refuses_below_and_when_the_judge_is_down(
    server, faults, prefect_harness, workspace, monkeypatch, tmp_path_factory
):
    from pathlib import Path

    from mlflow import MlflowClient

    from atelier.cli.demo_data import write_demo_photos
    from atelier.flows.subject_finetune import subject_finetune
    from atelier.kernel.workspace import add_subject
    from atelier.registry.ledger import open_ledger

    add_subject(workspace, "judgeco", "robot", "toy", write_demo_photos(tmp_path_factory.mktemp("p"), count=5))
    for key, value in {
        "ATELIER_JUDGE__BACKEND": "http",
        "ATELIER_JUDGE__BASE_URL": server.url,
        "ATELIER_JUDGE__API_KEY": KEY,
        "ATELIER_JUDGE__CAPTIONS": "false",
        "ATELIER_JUDGE__MAX_RETRIES": "1",
    }.items():
        monkeypatch.setenv(key, value)
    faults.extend(["yes:0.95"] * 200)  # every sample shows its prompt and the subject, every class image does not... see below
    high = subject_finetune("judgeco", "robot")
    client = MlflowClient(workspace.resolved_tracking_uri)
    mv = client.get_model_version(high["model"], high["version"])
    judged = json.loads(mv.tags["atelier.eval.judge"])
    # the scripted judge says yes to everything, class images included: prior leak 0.95 > 0.5
    assert not high["gate"]["passed"] and any("class images show the subject" in r for r in high["gate"]["reasons"])
    assert judged["requests"] > 0 and judged["calibrated"]
    run = client.get_run(mv.run_id)
    stored = json.dumps({**run.data.params, **run.data.tags}) + json.dumps(dict(mv.tags))
    assert KEY not in stored  # the API key never reaches MLflow
    table = json.loads(Path(client.download_artifacts(mv.run_id, "judge/judgments.json")).read_text())
    assert {"thumbnail", "prompt", "prompt_score", "fidelity", "prior_leak"} <= set(table["columns"])
    assert any(isinstance(cell, dict) and cell.get("type") == "image" for row in table["data"] for cell in row)

    faults.clear()
    monkeypatch.setenv("ATELIER_GATE__JUDGE__MAX_PRIOR_LEAK", "0.99")
    monkeypatch.setenv("ATELIER_JUDGE__BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    down = subject_finetune("judgeco", "robot")  # within the rules now, but nobody judges it: still refused
    assert not down["gate"]["passed"] and any("VLM judge unavailable" in r for r in down["gate"]["reasons"])

    monkeypatch.setenv("ATELIER_JUDGE__BASE_URL", server.url)
    faults.extend(["yes:0.95"] * 200)
    assert subject_finetune("judgeco", "robot")["gate"]["passed"]  # the same version, judged again, within the rules
    rows, asked = len(open_ledger(workspace).rows(high["model"])), len(server.app.state.seen)
    again = subject_finetune("judgeco", "robot")  # already the champion: nothing moves, so the ledger is unchanged
    assert again["gate"]["passed"] and len(open_ledger(workspace).rows(high["model"])) == rows
    assert len(server.app.state.seen) == asked  # and the judgement of that content stands: no request


def test_atelier_judge_prints_one_line_per_image(server, faults, tmp_path, monkeypatch):
    import subprocess
    import sys

    (tmp_path / "a.png").write_bytes(png("red"))
    env = {
        **__import__("os").environ,
        "ATELIER_JUDGE__BACKEND": "http",
        "ATELIER_JUDGE__BASE_URL": server.url,
        "ATELIER_JUDGE__API_KEY": KEY,
        "ATELIER_WORKSPACE": str(tmp_path / "nowhere"),
    }
    faults.extend(["yes:0.7", """text:{"caption": "a red square", "objects": [{"label": "square", "box": [0, 0, 1000, 1000]}]}"""])
    done = subprocess.run(
        [sys.executable, "-m", "atelier.cli", "judge", str(tmp_path / "a.png"), "--prompt", "a red square"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.splitlines()[0])
    assert row["prompt_score"] == pytest.approx(0.7) and row["caption"] == "a red square" and row["objects"][0]["label"] == "square"
    assert KEY not in done.stdout + done.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "atelier.cli", "judge", str(tmp_path / "b.png"), "--prompt", "x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and "b.png" in missing.stderr and "does not exist" in missing.stderr
    # a clip and a broken one: the clip goes as one video input, the broken one is named, the exit is 7 (partly done)
    from tests.video_clips import make_clip

    make_clip(tmp_path / "clip.mp4", [(0.5, 1.5, "HELLO", "en")], duration=2.0)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    faults.extend(["yes:0.8", """text:{"caption": "a word on a page", "objects": []}"""])
    clips = subprocess.run(
        [sys.executable, "-m", "atelier.cli", "judge", str(tmp_path / "clip.mp4"), str(tmp_path / "broken.mp4"), "--prompt", "a word"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert clips.returncode == 7 and "broken.mp4" in clips.stderr and "Traceback" not in clips.stderr, clips.stderr[-2000:]
    row = json.loads(clips.stdout.splitlines()[0])
    assert row["kind"] == "video" and row["prompt_score"] == pytest.approx(0.8) and row["caption"] == "a word on a page"


def test_ocr_cross_check_agreement_without_labels(server, faults, tmp_path):

    from atelier.models.ocr.engine import load_engine, shipped_engine_files
    from atelier.models.ocr.images import load_document
    from atelier.models.ocr.render import RenderSpec, missing_fonts, read_labels, render_set
    from atelier.models.vlm.scoring import ocr_agreement

    if missing_fonts():
        pytest.skip("needs Debian's fonts (make ocr-system-deps)")
    render_set(tmp_path / "docs", RenderSpec(lines_per_lang=0, pages_per_lang=1, seed=3, langs=("en", "zh")))
    engine = load_engine(*shipped_engine_files({"en": "ppocr", "zh": "ppocr"}), {}, threads=2)
    pages = []
    for r in read_labels(tmp_path / "docs"):
        reading = engine.read_page(load_document(tmp_path / "docs" / r["file"]), r["lang"])
        pages.append(
            {
                "name": r["file"],
                "png": (tmp_path / "docs" / r["file"]).read_bytes(),
                "lang": r["lang"],
                "label": r["text"],
                "ocr_text": reading.text,
            }
        )
    # the scripted judge reads the first page right and refuses the second twice
    faults.extend(["text:" + json.dumps({"text": pages[0]["label"]}), "refuse", "refuse"])
    rows, summary = ocr_agreement(Scorer(judge(server)), pages)
    assert rows[0]["judge_cer"] == 0.0 and rows[0]["agreement_cer"] < 0.2  # PP-OCR agrees with a judge that reads it right
    assert rows[1]["judge_text"] is None and "agreement_cer" not in rows[1]
    assert summary["failures"] == 1 and summary["agreement_cer"] == rows[0]["agreement_cer"]


@pytest.mark.slow
def test_ocr_cross_check_task_reads_the_set_pages(server, faults, prefect_harness, workspace, tmp_path, monkeypatch):

    from prefect import flow

    from atelier.models.ocr.engine import shipped_engine_files
    from atelier.models.ocr.render import RenderSpec, missing_fonts, render_set
    from atelier.tasks.judge import Judgment, ocr_cross_check
    from atelier.tasks.ocr import DocumentSet

    if missing_fonts():
        pytest.skip("needs Debian's fonts (make ocr-system-deps)")
    files, spec = shipped_engine_files({"en": "ppocr"})
    render_set(tmp_path / "ev", RenderSpec(lines_per_lang=1, pages_per_lang=1, seed=4, langs=("en",)))
    monkeypatch.setenv("ATELIER_JUDGE__BACKEND", "http")
    monkeypatch.setenv("ATELIER_JUDGE__BASE_URL", server.url)
    faults.append("text:" + json.dumps({"text": "anything"}))

    @flow
    def cross() -> Judgment:
        return ocr_cross_check(DocumentSet(str(tmp_path / "ev"), "rev", "sha"), {k: str(v) for k, v in files.items()}, spec)

    out = cross()
    assert out.summary["pages"] == 1 and out.summary["agreement_cer"] > 0.5 and out.rows[0]["judge_text"] == "anything"


def test_clip_and_dino_metrics_from_local_weights(tmp_path):
    from atelier.models.vlm.classic import ClassicMetrics
    from tests.tiny_glm import build_tiny_clip_and_dino

    clip_dir, dino_dir = build_tiny_clip_and_dino(tmp_path)
    metrics = ClassicMetrics(clip_dir, dino_dir)
    red, blue = png("red"), png("blue")
    same = metrics.score([(red, "a red square")], [red])
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-4) and same["dino"] == pytest.approx(1.0, abs=1e-4)  # identical images
    other = metrics.score([(blue, "a red square")], [red])
    assert other["clip_i"] < same["clip_i"] and -1.0 <= other["clip_t"] <= 1.0 and other["dino"] < 1.0
    with pytest.raises(Exception, match="not a CLIP model directory"):
        ClassicMetrics(tmp_path / "nothing")


def test_images_are_judged_in_parallel_up_to_the_concurrency_limit(server, faults):
    faults.extend(["sleep:1", "sleep:1", "sleep:1", "sleep:1"])
    samples = [(f"{i}.png", png(c), "a toy") for i, c in enumerate(("red", "blue", "green", "grey"))]
    t = time.perf_counter()
    rows, _ = judge_images(Scorer(judge(server, concurrency=4)), samples, [], [], captions=False)
    assert time.perf_counter() - t < 3.0  # four one-second answers at once, not one after another
    assert [r["image"] for r in rows] == ["0.png", "1.png", "2.png", "3.png"]  # input order kept
