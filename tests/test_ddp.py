"""DDP on the CPU (gloo): 2 processes with batch 1 train exactly as 1 process with batch 2, and a
run checkpointed by 2 processes resumes in 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from atelier.models.dreambooth.base import model_hash
from atelier.models.dreambooth.priors import PriorSpec, ensure_class_priors
from atelier.models.dreambooth.trainer import TrainInputs, latest_checkpoint, train
from atelier.tasks.dreambooth import TINY_CONFIG

pytestmark = pytest.mark.slow
STEPS = 4
COMMON = {"max_train_steps": STEPS, "validation_steps": 1000, "checkpointing_steps": 1000, "lr_scheduler": "linear"}


@pytest.fixture(scope="module")
def priors(tiny_model, tmp_path_factory):
    spec = PriorSpec(model_hash(tiny_model), "a photo of toy", 4, 64, 0, "dpmsolver++", 4, 5.0)
    return ensure_class_priors(tmp_path_factory.mktemp("priors"), spec, tiny_model).path


def _launch(tiny_model, photos, priors, work, result, processes, step_budget=None):
    # torchrun: accelerate picks up its environment and uses gloo on the CPU
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "-m",
        "atelier.models.dreambooth.launch",
        "--config",
        str(TINY_CONFIG),
        "--overrides",
        json.dumps({**COMMON, "train_batch_size": 1}),
        "--base",
        str(tiny_model),
        "--instance",
        str(photos[0].parent),
        "--class-dir",
        str(priors),
        "--class-noun",
        "toy",
        "--work",
        str(work),
        "--result",
        str(result),
    ]
    if step_budget:
        cmd += ["--step-budget", str(step_budget)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(result.read_text())


def _unet(path):
    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def _assert_same_weights(a, b, base, lr):
    """Equal up to float reduction order. Adam divides by sqrt(v): where a gradient is about the
    size of eps, summing it in another order moves the update by a fraction of lr. So: no weight
    differs by half a step per step, and the two runs differ 20x less than training moved them."""
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    moved = torch.cat([(a[k] - base[k]).abs().flatten() for k in a])
    assert diff.max() <= 0.5 * lr * STEPS, diff.max()
    assert diff.mean() < 0.05 * moved.mean(), (diff.mean(), moved.mean())


def test_two_processes_match_one_with_the_same_effective_batch(tiny_model, photos, priors, tmp_path, tiny_config):
    cfg = tiny_config.model_copy(update={**COMMON, "train_batch_size": 2})
    single = train(cfg, TrainInputs(tiny_model, photos[0].parent, "toy", tmp_path / "one", tmp_path / "one" / "pipeline", priors))
    ddp = _launch(tiny_model, photos, priors, tmp_path / "two", tmp_path / "two.json", 2)
    assert ddp["processes"] == 2 and ddp["finished"]
    assert ddp["losses"] == pytest.approx(single.losses, rel=1e-4)
    _assert_same_weights(_unet(single.output_dir), _unet(tmp_path / "two" / "pipeline"), _unet(tiny_model), cfg.learning_rate)


def test_checkpoint_of_two_processes_resumes_in_one(tiny_model, photos, priors, tmp_path, tiny_config):
    cfg = tiny_config.model_copy(update={**COMMON, "train_batch_size": 2})
    straight = train(cfg, TrainInputs(tiny_model, photos[0].parent, "toy", tmp_path / "ref", tmp_path / "ref" / "pipeline", priors))
    first = _launch(tiny_model, photos, priors, tmp_path / "mixed", tmp_path / "mixed.json", 2, step_budget=2)
    assert not first["finished"] and latest_checkpoint(tmp_path / "mixed").name == "checkpoint-0000002"
    assert [p.name for p in latest_checkpoint(tmp_path / "mixed").iterdir()] == ["state.pt"]  # written once, not per rank
    resumed = train(cfg, TrainInputs(tiny_model, photos[0].parent, "toy", tmp_path / "mixed", tmp_path / "mixed" / "pipeline", priors))
    assert resumed.resumed_from == 2 and resumed.finished
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-4)
    _assert_same_weights(_unet(straight.output_dir), _unet(resumed.output_dir), _unet(tiny_model), cfg.learning_rate)


def test_the_training_task_launches_accelerate_and_trains_as_one_process_with_the_whole_batch(
    tiny_model, photos, priors, tmp_path, tiny_config
):
    from atelier.models.dreambooth.launch import train_launched
    from atelier.tasks.data import Snapshot
    from atelier.tasks.dreambooth import training_key

    single = train(
        tiny_config.model_copy(update={**COMMON, "train_batch_size": 2}),
        TrainInputs(tiny_model, photos[0].parent, "toy", tmp_path / "one", tmp_path / "one" / "pipeline", priors),
    )
    lines: list[str] = []
    cfg = tiny_config.model_copy(update={**COMMON, "train_batch_size": 1})
    launched = train_launched(
        cfg, TrainInputs(tiny_model, photos[0].parent, "toy", tmp_path / "acc", tmp_path / "acc" / "pipeline", priors), 2, lines.append
    )
    assert launched.finished and launched.step == STEPS and launched.output_dir == tmp_path / "acc" / "pipeline"
    assert "trained 4 steps with 2 processes" in lines
    assert launched.losses == pytest.approx(single.losses, rel=1e-4)
    # two processes train with twice the batch: another training, another key
    snapshot = Snapshot("acme", "rex", "toy", "rev", "md5", "photos", {"a.png": "0"})
    assert training_key("b", snapshot, None, {}, 2) != training_key("b", snapshot, None, {}, 1) == training_key("b", snapshot, None, {})
