"""The dvc.yaml class_priors stage makes the same images as the flow's content-addressed cache."""

import contextlib
import os
import subprocess
import sys

import pytest
import yaml

from atelier.kernel.hashing import file_hashes
from atelier.models.dreambooth.base import model_hash
from atelier.models.dreambooth.priors import PriorSpec, ensure_class_priors

pytestmark = pytest.mark.slow


def test_dvc_repro_matches_the_flow_cache(workspace, tmp_path):
    """As `make demo` does it (reproduce_stage, the stage's `atelier priors` reading the flow's cache):
    afterwards `dvc status` is clean and git has nothing uncommitted."""
    from atelier.kernel.stages import reproduce_stage

    ws = workspace.workspace
    reproduce_stage(workspace, "class_priors", "class priors (test)")
    params = yaml.safe_load((ws / "params.yaml").read_text())["class_priors"]["toy"]
    spec = PriorSpec(
        model_hash(workspace.tiny_model_dir),
        params["prompt"],
        params["count"],
        params["resolution"],
        params["seed"],
        params["sampler"],
        params["steps"],
        params["guidance"],
    )
    cached = ensure_class_priors(tmp_path, spec, workspace.tiny_model_dir, params["batch_size"])
    staged = {k: v for k, v in file_hashes(ws / "data" / "class-priors" / "toy").items() if k.endswith(".png")}
    assert staged and staged == {k: v for k, v in file_hashes(cached.path).items() if k.endswith(".png")}
    assert (ws / "dvc.lock").is_file()
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "class_priors@toy"],
        cwd=ws,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"},
    )
    assert status.returncode == 0 and ("up to date" in status.stdout.lower() or not status.stdout.strip()), status.stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "dvc.lock", "data/class-priors"], cwd=ws, capture_output=True, text=True)
    assert dirty.stdout.strip() == "", dirty.stdout


def test_a_stage_the_workspace_does_not_have_is_a_clear_error(workspace):
    """A subject missing from subjects.yaml (or a workspace made before the finetune stage) is exit 2
    naming the fix, not a DVC traceback."""
    from atelier.kernel.errors import ConfigError
    from atelier.kernel.stages import commit_stage, reproduce_stage

    for call in (commit_stage, reproduce_stage):
        with pytest.raises(ConfigError, match="subjects.yaml"):
            call(workspace, "finetune@nobody.none", "test")
    with pytest.raises(ConfigError, match="predates"):
        reproduce_stage(workspace, "no_such_stage", "test")


def test_a_new_class_gets_its_own_priors_stage_and_dvc_runs_without_an_activated_venv(workspace, tmp_path):
    """`subject add` of a new class noun adds its priors entry; the subject's fine-tune depends on that
    class's priors only (a new class changes no other subject's stage); `dvc repro` run as
    `.venv/bin/dvc` with a PATH that has no venv runs the stage's `atelier` all the same."""
    from dvc.repo import Repo

    from atelier.cli.demo_data import write_demo_photos
    from atelier.kernel.workspace import add_subject

    ws = workspace.workspace
    add_subject(workspace, "dvcco", "bag", "Red backpack", write_demo_photos(tmp_path / "bag", count=4))
    params = yaml.safe_load((ws / "params.yaml").read_text())["class_priors"]
    assert params["red-backpack"]["prompt"] == "a photo of Red backpack"
    assert {k: v for k, v in params["red-backpack"].items() if k != "prompt"} == {k: v for k, v in params["toy"].items() if k != "prompt"}
    assert (ws / "params.yaml").read_text().startswith("# Parameters of dvc.yaml's stages")  # comments kept
    assert yaml.safe_load((ws / "subjects.yaml").read_text())["subjects"]["dvcco.bag"]["class_priors"] == "red-backpack"
    with contextlib.chdir(ws), Repo(str(ws)) as repo:  # DVC names stages relative to the cwd
        stages = {s.addressing: s for s in repo.index.stages}
    deps = {d.def_path for d in stages["finetune@dvcco.bag"].deps}
    assert deps == {"data/subjects/dvcco/bag", "data/class-priors/red-backpack"}
    assert "class_priors@red-backpack" in stages

    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "dvc"), "repro", "class_priors@red-backpack"],
        cwd=ws,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(list((ws / "data" / "class-priors" / "red-backpack").glob("*.png"))) == params["red-backpack"]["count"]
