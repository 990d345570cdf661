"""The resident trainer: subject after subject in one process, each trained as a fresh process would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atelier.cli.demo_data import draw_robot
from atelier.kernel.errors import ConfigError
from atelier.models.dreambooth.base import model_hash
from atelier.models.dreambooth.priors import PriorSpec, ensure_class_priors
from atelier.models.dreambooth.service import ResidentTrainer, TrainerRefused, TrainerUnavailable, ping, token_path, train_resident
from atelier.models.dreambooth.trainer import TrainerSession, TrainInputs, train

STEPS = {"max_train_steps": 6, "checkpointing_steps": 4, "validation_steps": 100}


@pytest.fixture(scope="module")
def priors(tiny_model, tmp_path_factory):
    spec = PriorSpec(model_hash(tiny_model), "a photo of toy", 4, 64, 0, "dpmsolver++", 4, 5.0)
    return ensure_class_priors(tmp_path_factory.mktemp("priors"), spec, tiny_model).path


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("subjects")
    return [_photos(root / name, 4, seed)[0].parent for name, seed in (("a", 11), ("b", 22))]


def _photos(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        draw_robot(seed + i).save(folder / f"{i:02d}.png")
    return sorted(folder.iterdir())


def _inputs(tiny_model, folder, work, priors):
    return TrainInputs(tiny_model, folder, "toy", work, work / "pipeline", priors)


def _unet(path):
    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def test_a_kept_session_trains_each_subject_as_a_fresh_process_would(tiny_model, subjects, priors, tmp_path, tiny_config):
    cfg = tiny_config.model_copy(update=STEPS)
    other = cfg.model_copy(update={"seed": 7, "max_train_steps": 5, "lr_scheduler": "linear"})  # per-run fields may differ
    fresh_b = train(other, _inputs(tiny_model, subjects[1], tmp_path / "fresh-b", priors))
    fresh_a = train(cfg, _inputs(tiny_model, subjects[0], tmp_path / "fresh-a", priors))

    session = TrainerSession(cfg, tiny_model, keep=True)
    try:
        a = session.run(cfg, _inputs(tiny_model, subjects[0], tmp_path / "kept-a", priors))
        assert session.reusable_for(other, tiny_model)
        b = session.run(other, _inputs(tiny_model, subjects[1], tmp_path / "kept-b", priors))
        again = session.run(cfg, _inputs(tiny_model, subjects[0], tmp_path / "kept-a2", priors))
        assert not session.reusable_for(cfg.model_copy(update={"learning_rate": 1e-3}), tiny_model)  # shapes the optimizer
    finally:
        session.close()
    assert a.losses == fresh_a.losses and again.losses == fresh_a.losses  # the second subject started from the base weights
    assert b.losses == fresh_b.losses and b.timings["session_reused"] == 1.0
    ua, ub = _unet(fresh_b.output_dir), _unet(b.output_dir)
    assert all(torch.equal(ua[k], ub[k]) for k in ua)


def _serve(sock: Path, runs: Path, latents: Path) -> tuple[ResidentTrainer, threading.Thread]:
    trainer = ResidentTrainer(sock, runs, latents, log=lambda _line: None)
    thread = threading.Thread(target=trainer.serve, daemon=True)
    thread.start()
    for _ in range(100):
        if token_path(sock).is_file() and sock.exists():
            break
        time.sleep(0.05)
    return trainer, thread


def _stop(sock: Path, thread: threading.Thread) -> None:
    """serve() ends on its own only at max_jobs; here the daemon thread dies with the test process, and
    the socket is closed by removing it (no later test connects)."""
    sock.unlink(missing_ok=True)


def test_host_weights_are_reused_only_after_the_last_writer_is_done_with_them(tiny_model):
    """The end-of-run host buffers are allocated once per session, and a run's copy waits for the previous
    run's writer: a slow writer still sees its own run's weights, never the next run's."""
    from transformers import CLIPTextModel

    from atelier.models.dreambooth.handoff import HostWeights, Pending

    text = CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder")
    weights = HostWeights()
    first = weights.stage({"text_encoder": text})["text_encoder"]
    buffers = dict(weights.buffers)
    before = {k: v.clone() for k, v in text.state_dict().items()}
    seen: dict[str, torch.Tensor] = {}

    def slow_write() -> None:
        time.sleep(0.5)
        seen.update({k: v.clone() for k, v in first().state_dict().items()})

    weights.reader = Pending(slow_write)
    with torch.no_grad():
        for p in text.parameters():
            p.add_(1.0)  # the next subject trained on
    second = weights.stage({"text_encoder": text})["text_encoder"]()
    assert seen.keys() == before.keys() and all(torch.equal(seen[k], before[k]) for k in before)
    assert all(weights.buffers[k] is buffers[k] for k in buffers)  # the same host memory, run after run
    assert all(torch.equal(v, text.state_dict()[k]) for k, v in second.state_dict().items())


def test_the_socket_serves_jobs_confines_paths_and_wants_its_token(tiny_model, subjects, priors, tmp_path, tiny_config):
    sock, runs = tmp_path / "t" / "trainer.sock", tmp_path / "runs"
    cfg = tiny_config.model_copy(update=STEPS)
    with pytest.raises(TrainerUnavailable, match="not running"):
        ping(sock)
    with pytest.raises(ConfigError, match="too long for a Unix socket"):
        ResidentTrainer(tmp_path / ("x" * 100) / "trainer.sock", runs, tmp_path).serve()
    trainer, thread = _serve(sock, runs, tmp_path / "latents")
    try:
        assert oct(sock.stat().st_mode & 0o777) == "0o600" and oct(token_path(sock).stat().st_mode & 0o777) == "0o600"
        assert ping(sock)["session"] is False
        events: list[str] = []
        first = train_resident(sock, cfg, _inputs(tiny_model, subjects[0], runs / "a", priors), on_start=lambda e: events.append(e))
        second = train_resident(sock, cfg, _inputs(tiny_model, subjects[1], runs / "b", priors), on_step=lambda s, t: events.append(s))
        assert first.finished and (first.output_dir / "model_index.json").is_file()
        assert events[0]["session_reused"] is False and events[1:] == list(range(1, 7))
        assert second.timings["session_reused"] == 1.0
        fresh = train(cfg, _inputs(tiny_model, subjects[1], tmp_path / "fresh", priors))
        assert second.losses == fresh.losses
        # written in the background from a host copy: the same pipeline, file for file and tensor for tensor
        files = sorted(str(p.relative_to(fresh.output_dir)) for p in fresh.output_dir.rglob("*"))
        assert sorted(str(p.relative_to(second.output_dir)) for p in second.output_dir.rglob("*")) == files
        for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
            a, b = load_file(str(fresh.output_dir / part)), load_file(str(second.output_dir / part))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (runs / "b" / "training.json").is_file() and second.timings["save"] > 0
        # a job may write only under the runs folder it was started with
        with pytest.raises(TrainerRefused, match="outside the runs folder"):
            train_resident(sock, cfg, _inputs(tiny_model, subjects[0], tmp_path / "elsewhere", priors))
        with pytest.raises(TrainerRefused, match="outside the runs folder"):
            train_resident(sock, cfg, _inputs(tiny_model, subjects[0], runs / ".." / "escape", priors))
        # a client without the token is refused; garbage is answered, not fatal
        for payload in (b'{"token": "wrong", "ping": true}\n', b"not json\n", b"[1, 2]\n"):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                s.sendall(payload)
                reply = json.loads(s.makefile("rb").readline())
                assert reply["event"] == "error", reply
        assert ping(sock)["jobs"] == 2  # still serving
    finally:
        _stop(sock, thread)


@pytest.mark.slow
def test_the_flow_trains_in_the_resident_trainer_when_its_socket_is_set(prefect_harness, workspace, tmp_path, monkeypatch):
    from atelier.flows.subject_finetune import subject_finetune
    from atelier.kernel.workspace import add_subject

    add_subject(workspace, "resident", "robot", "toy", _photos(tmp_path / "photos", 5, 77))
    sock = tmp_path / "trainer.sock"
    monkeypatch.setenv("ATELIER_TRAINER_SOCKET", str(sock))
    with pytest.raises(TrainerUnavailable, match="atelier trainer serve"):  # not started yet: a clear, retryable error
        subject_finetune("resident", "robot")
    trainer, thread = _serve(sock, workspace.runs_dir, workspace.priors_cache / "latents")
    try:
        result = subject_finetune("resident", "robot")
    finally:
        _stop(sock, thread)
    assert trainer.jobs == 1 and result["version"] and result["steps"] > 0
    record = json.loads((workspace.runs_dir / "resident" / result["training_key"] / "training.json").read_text())
    assert record["steps"] == result["steps"]


def test_the_cli_serves_reports_status_and_stops_on_sigterm(workspace, tmp_path):
    sock = tmp_path / "cli.sock"
    env = {**os.environ, "ATELIER_TRAINER_SOCKET": str(sock)}
    atelier = [sys.executable, "-m", "atelier.cli"]
    triton = workspace.compile_cache / "triton"
    shutil.rmtree(triton, ignore_errors=True)
    proc = subprocess.Popen(
        [*atelier, "trainer", "serve", "--compile"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for _ in range(300):
            if token_path(sock).is_file():
                break
            time.sleep(0.1)
        status = subprocess.run([*atelier, "trainer", "status"], env=env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and f"pid {proc.pid}, 0 job(s) run, no base model loaded yet" in status.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped after 0 job(s)" in out
    assert triton.is_dir()  # the captured step's Triton kernel is kept in the workspace, not in a container's home
    assert torch.cuda.is_available() or "--compile applies on a GPU only" in out  # without a GPU: said, not silently ignored
    assert not sock.exists() and not token_path(sock).exists()
    gone = subprocess.run([*atelier, "trainer", "status"], env=env, capture_output=True, text=True, timeout=120)
    assert gone.returncode == 6 and "atelier trainer serve" in gone.stderr and "Traceback" not in gone.stderr
