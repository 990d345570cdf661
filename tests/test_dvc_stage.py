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
    ws = workspace.workspace
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", "class_priors@toy"], cwd=ws, capture_output=True,
                          text=True, timeout=600, env={**os.environ})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    params = yaml.safe_load((ws / "params.yaml").read_text())["class_priors"]["toy"]
    spec = PriorSpec(model_hash(workspace.tiny_model_dir), params["prompt"], params["count"], params["resolution"],
                     params["seed"], params["sampler"], params["steps"], params["guidance"])
    cached = ensure_class_priors(tmp_path, spec, workspace.tiny_model_dir)
    staged = {k: v for k, v in file_hashes(ws / "data" / "class-priors" / "toy").items() if k.endswith(".png")}
    assert staged and staged == {k: v for k, v in file_hashes(cached.path).items() if k.endswith(".png")}
    assert (ws / "dvc.lock").is_file()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "class_priors@toy"], cwd=ws, capture_output=True, text=True)
    assert "up to date" in status.stdout.lower() or status.stdout.strip() == "" or "unchanged" in status.stdout.lower()
