"""Class priors are seeded, content-addressed and reused from the cache."""

from atelier.kernel.hashing import file_hashes
from atelier.models.dreambooth.base import model_hash
from atelier.models.dreambooth.priors import PriorSpec, ensure_class_priors, read_manifest


def _spec(tiny_model, **change):
    base = dict(
        base_model_hash=model_hash(tiny_model),
        class_prompt="a photo of toy",
        count=3,
        resolution=64,
        seed=0,
        sampler="dpmsolver++",
        steps=4,
        guidance_scale=5.0,
    )
    return PriorSpec(**{**base, **change})


def test_cache_hit_reuses_without_regenerating(tiny_model, tmp_path):
    first = ensure_class_priors(tmp_path, _spec(tiny_model), tiny_model)
    stamp = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    second = ensure_class_priors(tmp_path, _spec(tiny_model), tiny_model)
    assert not first.reused and second.reused and second.path == first.path
    assert {p.name: p.stat().st_mtime_ns for p in second.path.iterdir()} == stamp
    assert read_manifest(first.path)["key"] == first.key
    assert len(list(first.path.glob("*.png"))) == 3


def test_every_part_of_the_key_matters(tiny_model):
    keys = {_spec(tiny_model).key}
    for change in (
        {"seed": 1},
        {"count": 4},
        {"resolution": 32},
        {"class_prompt": "a photo of dog"},
        {"sampler": "ddim"},
        {"base_model_hash": "0" * 64},
    ):
        keys.add(_spec(tiny_model, **change).key)
    assert len(keys) == 7


def test_same_spec_gives_the_same_images_anywhere(tiny_model, tmp_path):
    """Made twice with the same batch size, in two caches: the same bytes (another batch size may round
    a pixel differently, which is why the flow and the DVC stage both use class_sampling.batch_size)."""
    a = ensure_class_priors(tmp_path / "a", _spec(tiny_model), tiny_model, batch_size=3)
    b = ensure_class_priors(tmp_path / "b", _spec(tiny_model), tiny_model, batch_size=3)
    assert file_hashes(a.path) == file_hashes(b.path)


def test_settings_the_sampler_cannot_run_are_refused_before_anything_is_made(tiny_model, tmp_path):
    """count or steps 0 made nothing or hung, a NaN guidance NaN images, resolution 17 and an unknown
    sampler crashed: each is a ConfigError naming the value (exit 2), and the command says so in a line."""
    import pytest
    from typer.testing import CliRunner

    from atelier.cli.main import app
    from atelier.kernel.errors import ConfigError

    for change, named in (
        ({"count": 0}, "count 0"),
        ({"count": -1}, "count -1"),
        ({"steps": 0}, "steps 0"),
        ({"resolution": 17}, "resolution 17"),
        ({"resolution": 0}, "resolution 0"),
        ({"guidance_scale": float("nan")}, "guidance nan"),
        ({"sampler": "lms"}, "sampler 'lms'"),
        ({"seed": 2**64}, "seed"),
        ({"class_prompt": " "}, "empty class prompt"),
    ):
        with pytest.raises(ConfigError, match=named):
            ensure_class_priors(tmp_path, _spec(tiny_model, **change), tiny_model)
    assert not any(tmp_path.iterdir())  # nothing was made
    done = CliRunner().invoke(
        app, ["priors", "--class-prompt", "a photo of toy", "--out", str(tmp_path / "o"), "--count", "0", "--steps", "0"]
    )
    assert done.exit_code == 2 and "count 0" in done.output and "steps 0" in done.output and not (tmp_path / "o").exists()


def test_ctrl_c_ends_the_command_within_seconds_with_exit_130_and_no_partial_output(workspace, tiny_model, tmp_path):
    """SIGINT while class priors are being made: exit 130 (the shell's convention), one line, no traceback,
    and the output folder, which is replaced atomically, is not left half-written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "priors"
    env = {**os.environ, "ATELIER_WORKSPACE": str(workspace.workspace), "ATELIER_PREFECT_SERVER": "temporary"}
    args = ["priors", "--class-prompt", "a photo of toy", "--out", str(out), "--count", "400", "--resolution", "64"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "atelier.cli", *args, "--steps", "8", "--base-model", str(tiny_model)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(12)  # past start-up, into the sampling
    assert proc.poll() is None, proc.communicate()
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert time.monotonic() - sent < 10
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()


def test_the_config_names_exactly_the_samplers_sampling_builds():
    """The class-prior check reads the sampler names from the config (no torch import before a refusal)."""
    from atelier.models.dreambooth.config import SAMPLER_NAMES
    from atelier.models.dreambooth.sampling import SAMPLERS

    assert set(SAMPLER_NAMES) == set(SAMPLERS)
