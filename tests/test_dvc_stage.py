"""The dvc.yaml class_priors stage makes the same images as the flow's content-addressed cache."""

import os
import subprocess
import sys

import pytest
import yaml

from atelier.hashing import file_hashes
from models.dreambooth.base import model_hash
from models.dreambooth.priors import PriorSpec, ensure_class_priors

pytestmark = pytest.mark.slow


def test_dvc_repro_matches_the_flow_cache(workspace, tmp_path):
    """As `make demo` does it (reproduce_stage, the stage's `atelier priors` reading the flow's cache):
    afterwards `dvc status` is clean and git has nothing uncommitted."""
    from atelier.workspace import reproduce_stage

    ws = workspace.workspace
    reproduce_stage(workspace, "class_priors", "class priors (test)")
    params = yaml.safe_load((ws / "params.yaml").read_text())["class_priors"]["toy"]
    spec = PriorSpec(model_hash(workspace.tiny_model_dir), params["prompt"], params["count"], params["resolution"],
                     params["seed"], params["sampler"], params["steps"], params["guidance"])
    cached = ensure_class_priors(tmp_path, spec, workspace.tiny_model_dir)
    staged = {k: v for k, v in file_hashes(ws / "data" / "class-priors" / "toy").items() if k.endswith(".png")}
    assert staged and staged == {k: v for k, v in file_hashes(cached.path).items() if k.endswith(".png")}
    assert (ws / "dvc.lock").is_file()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "class_priors@toy"], cwd=ws, capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"})
    assert status.returncode == 0 and ("up to date" in status.stdout.lower() or not status.stdout.strip()), status.stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "dvc.lock", "data/class-priors"], cwd=ws, capture_output=True, text=True)
    assert dirty.stdout.strip() == "", dirty.stdout


def test_a_stage_the_workspace_does_not_have_is_a_clear_error(workspace):
    """A subject missing from subjects.yaml (or a workspace made before the finetune stage) is exit 2
    naming the fix, not a DVC traceback."""
    from atelier.errors import ConfigError
    from atelier.workspace import commit_stage, reproduce_stage

    for call in (commit_stage, reproduce_stage):
        with pytest.raises(ConfigError, match="subjects.yaml"):
            call(workspace, "finetune@nobody.none", "test")
    with pytest.raises(ConfigError, match="predates"):
        reproduce_stage(workspace, "no_such_stage", "test")
