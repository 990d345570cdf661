"""Bad input stops before it costs anything, and every failure is an exit code with one message: configs
that only look like numbers, files that only look like photos, a full or read-only disk, truncated
weights, a dropped ledger table, an unknown model. Each case failed on the code before this change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atelier.kernel.errors import ConfigError, DiskError, InvalidIdentifier, ModelFormatError
from atelier.models.dreambooth.config import load_train_config

ATELIER = str(Path(sys.executable).parent / "atelier")


def _cli(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ATELIER, *args], capture_output=True, text=True, timeout=300, input=stdin, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    "text,message",
    [
        ("max_train_steps: true\n", "max_train_steps must be a number, not true"),
        ("resolution: 17\n", "multiple of 8"),
        ("resolution: 8\n", "greater than or equal to 64"),
        ("max_train_steps: 0\n", "greater than or equal to 1"),
        ("learning_rate: 5e-6\nmax_train_steps: '60'\n", "max_train_steps must be a number"),
        ("- a\n- b\n", "must be a mapping"),
        ("1: 2\n", "must be a mapping"),
        # values that passed the schema and crashed the trainer 30 s into a run
        ("adam_beta1: .nan\n", "adam_beta1.*must be a finite number"),
        ("adam_beta2: 1.5\n", "adam_beta2.*less than 1"),
        ("adam_epsilon: -1e-8\n", "adam_epsilon.*greater than 0"),
        ("seed: 99999999999999999999999\n", "seed.*less than or equal to 4294967295"),
        ("learning_rate: .inf\n", "learning_rate.*must be a finite number"),
        ("instance_prompt: 'a {identifier {class_noun}'\n", "instance_prompt .* is not a template"),
        ("sample_prompts: ['a {identifier} {colour} {class_noun}']\n", r"names \{colour\}"),
        ("class_sampling: {sampler: turbo}\n", "class_sampling.sampler"),
        ("a: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ],
)
def test_config_preflight_refuses_what_would_train_wrong(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_train_config(path)


def test_every_problem_of_a_config_is_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("adam_beta1: 2\nseed: -1\nlearnig_rate: 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    text = str(err.value)
    assert "3 problem(s)" in text and all(k in text for k in ("adam_beta1", "'seed'", "learnig_rate")) and "spelling" in text


def test_a_binary_file_as_config_is_named(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_train_config(path)


def test_yaml_floats_without_a_dot_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 5e-6\nresolution: 64\n")
    assert load_train_config(path).learning_rate == 5e-6


def test_one_definition_of_a_photo_by_content(tmp_path):
    from atelier.models.dreambooth.images import load_rgb
    from atelier.models.photos import list_photos

    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (300, 300), "red").save(folder / "no-extension", format="JPEG")
    Image.new("RGB", (300, 300), "blue").save(folder / "b.png")
    (folder / "manifest.json").write_text("{}")
    Image.new("RGB", (300, 300), "green").save(folder / ".hidden.jpg")
    assert [p.name for p in list_photos(folder)] == ["b.png", "no-extension"]
    # a 16-bit grey PNG keeps its tones (PIL's own conversion clips it to white)
    ramp = (np.linspace(0, 65535, 300 * 300).reshape(300, 300)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "deep.png")
    assert Image.open(folder / "deep.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(folder / "deep.png"), dtype=np.float64)
    assert 100 < rgb.mean() < 155 and rgb.min() < 5 and rgb.max() > 250


def test_subject_add_refuses_hidden_names_empty_class_and_names_the_subject(workspace, photos, tmp_path):
    hidden = tmp_path / ".c.jpg"
    shutil.copy(photos[0], hidden)
    done = _cli("subject", "add", "acme", "hid", str(hidden), *map(str, photos[1:]), "--class", "toy")
    assert done.returncode == 2 and "starts with '.'" in done.stderr and "Traceback" not in done.stderr
    done = _cli("subject", "add", "acme", "noclass", *map(str, photos), "--class", "  ")
    assert done.returncode == 2 and "class noun" in done.stderr and "Traceback" not in done.stderr
    done = _cli("subject", "add", "acme", "few", *map(str, photos[:2]), "--class", "toy")
    assert done.returncode == 2 and "acme/few fails count" in done.stderr and "/tmp" not in done.stderr.split("fails count")[0]
    with pytest.raises(InvalidIdentifier):
        from atelier.kernel.workspace import check_class_noun

        check_class_noun("{identifier}")


def test_truncated_base_model_weights_are_refused_before_training(tiny_model, tmp_path):
    from atelier.models.dreambooth.base import check_sd_directory

    broken = tmp_path / "sd"
    shutil.copytree(tiny_model, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        check_sd_directory(broken)


def test_unknown_model_and_missing_alias_exit_2_saying_what_exists(workspace):
    done = _cli("generate", "dreambooth-acme-nosuch@champion", "--prompt", "x")
    assert done.returncode == 2 and "is not in the registry" in done.stderr and "Traceback" not in done.stderr
    done = _cli("generate", "no-at-or-slash", "--prompt", "x")
    assert done.returncode == 2 and "NAME@ALIAS" in done.stderr


def test_a_dropped_ledger_table_is_tampering_exit_5(tmp_path):
    from sqlalchemy import text

    from atelier.registry.ledger import Ledger, LedgerTampered

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    with ledger.engine.begin() as conn:
        conn.execute(text("DROP TABLE promotion_ledger"))
    with pytest.raises(LedgerTampered, match="has no promotion_ledger table") as err:
        ledger.rows()
    assert err.value.exit_code == 5


def _mount(*args: str) -> bool:
    return shutil.which("mount") is not None and os.geteuid() == 0 and subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_a_read_only_workspace_is_exit_6_before_anything_starts(tmp_path):
    ws = tmp_path / "ws"
    (ws / ".atelier").mkdir(parents=True)
    (ws / ".atelier" / "workspace.json").write_text("{}")
    if not _mount("--bind", str(ws), str(ws)) or not _mount("-o", "remount,bind,ro", str(ws)):
        pytest.skip("cannot make a read-only bind mount here (needs root and mount)")
    try:
        done = _cli("finetune", "acme", "robot", env={"ATELIER_WORKSPACE": str(ws)})
    finally:
        subprocess.run(["umount", str(ws)], check=False)
    assert done.returncode == 6, done.stderr
    assert str(ws) in done.stderr and ("is read-only" in done.stderr or "cannot be written" in done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_a_full_disk_during_a_checkpoint_is_exit_6_and_leaves_no_partial_checkpoint(tiny_model, photos, tmp_path, tiny_config):
    from atelier.models.dreambooth.base import model_hash
    from atelier.models.dreambooth.priors import PriorSpec, ensure_class_priors
    from atelier.models.dreambooth.trainer import TrainInputs, train

    spec = PriorSpec(model_hash(tiny_model), "a photo of toy", 2, 64, 0, "dpmsolver++", 2, 5.0)
    priors = ensure_class_priors(tmp_path / "priors", spec, tiny_model).path
    small = tmp_path / "small"
    small.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount)")
    try:
        cfg = tiny_config.model_copy(update={"max_train_steps": 3, "checkpointing_steps": 1, "validation_steps": 100})
        with pytest.raises(DiskError, match="could not take checkpoint 1") as err:
            train(cfg, TrainInputs(tiny_model, photos[0].parent, "toy", small / "work", small / "work" / "pipeline", priors))
        assert err.value.exit_code == 6
        leftovers = [p.name for p in (small / "work" / "checkpoints").iterdir()] if (small / "work" / "checkpoints").is_dir() else []
        assert not [n for n in leftovers if n.startswith(".tmp")]
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_identical_weights_hash_the_same_in_two_workspaces(tiny_model, photos, tmp_path, tiny_config):
    """The saved pipeline's configs no longer embed the base model's absolute path."""
    from atelier.kernel.hashing import tree_hash
    from atelier.models.dreambooth.base import model_hash
    from atelier.models.dreambooth.priors import PriorSpec, ensure_class_priors
    from atelier.models.dreambooth.trainer import TrainInputs, train

    cfg = tiny_config.model_copy(update={"max_train_steps": 2, "checkpointing_steps": 100, "validation_steps": 100})
    hashes = []
    for where in ("one", "two"):
        base = tmp_path / where / "models" / "tiny-sd"
        shutil.copytree(tiny_model, base)
        spec = PriorSpec(model_hash(base), "a photo of toy", 2, 64, 0, "dpmsolver++", 2, 5.0)
        priors = ensure_class_priors(tmp_path / where / "priors", spec, base).path
        out = train(cfg, TrainInputs(base, photos[0].parent, "toy", tmp_path / where / "w", tmp_path / where / "w" / "pipeline", priors))
        assert str(tmp_path) not in json.dumps([p.read_text() for p in out.output_dir.rglob("*.json")])
        hashes.append(tree_hash(out.output_dir))
    assert hashes[0] == hashes[1]


def test_an_item_id_with_a_newline_is_an_invalid_line(tmp_path):
    from atelier.models.batch.manifest import parse_generation_manifest

    items, invalid = parse_generation_manifest(json.dumps({"id": "nl\n", "prompt": "x"}) + "\n" + json.dumps({"id": "ok", "prompt": "y"}))
    assert [i.id for i in items] == ["ok"] and len(invalid) == 1 and invalid[0].line == 1


def test_a_killed_writers_temporary_folder_is_swept_by_the_next_writer(tmp_path):
    from atelier.kernel.storage import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".priors.tmp-{dead}-abcd1234"
    stale.mkdir()
    (stale / "class-0000.png").write_bytes(b"half")
    alive = tmp_path / f".priors.tmp-{os.getpid()}-live0000"  # a writer still at work: kept
    alive.mkdir()
    with atomic_dir(tmp_path / "priors") as tmp:
        (tmp / "done").write_text("1")
    assert not stale.exists() and alive.exists() and (tmp_path / "priors" / "done").is_file()


def test_deploy_refuses_what_a_schedule_could_never_run_before_writing_anything(workspace, photos, tmp_path):
    """A subject that is not in the workspace, a missing config, two entries making one deployment, a
    name with a path in it, Latin-1 bytes, deep nesting: exit 2 naming the entry, before Prefect is asked."""
    from typer.testing import CliRunner

    from atelier.cli.main import app
    from atelier.kernel.workspace import add_subject

    add_subject(workspace, "deployco", "robot", "toy", photos)
    cases = {
        "retrain:\n  - {customer: deployco, subject: nosuch, cron: '0 3 * * *'}\n": "subject deployco/nosuch",
        "retrain:\n  - {customer: deployco, subject: robot, cron: '0 3 * * *', config: /nope.yaml}\n": "/nope.yaml: does not exist",
        "audit: {cron: '0 * * * *'}\nbatch_ocr:\n  - {name: scans, input: in, out: o, cron: '0 1 * * *'}\n"
        "  - {name: scans, input: in2, out: o2, cron: '0 2 * * *'}\n": "more than one entry makes the deployment ocr-scans",
        "batch_ocr:\n  - {name: ../x, input: in, out: o, cron: '0 1 * * *'}\n": "name '../x': is not a valid id",
        "audit: {cron: '0 * * * *'}\n# caf\xe9\n": "is not UTF-8",
        "a: " + "[" * 3000 + "]" * 3000 + "\n": "schedules",
    }
    for text, said in cases.items():
        path = tmp_path / "schedules.yaml"
        path.write_bytes(text.encode("latin-1"))
        done = CliRunner().invoke(app, ["deploy", "--file", str(path)])
        assert done.exit_code == 2 and said in done.output and "Traceback" not in done.output, (text[:80], done.output)


def test_a_pipe_or_a_device_given_as_a_photo_or_a_manifest_is_refused_at_once(workspace, photos, tmp_path):
    """They were read forever (a FIFO nobody writes, /dev/zero): exit 2 naming the path, within seconds."""
    import os

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    for odd in (fifo, Path("/dev/zero")):
        done = _cli("subject", "add", "acme", "odd", str(odd), *map(str, photos[1:]), "--class", "toy")
        assert done.returncode == 2 and f"photo {odd}: is not a regular file" in done.stderr, done.stderr[-2000:]
        done = _cli("batch-generate", "acme", "odd", "--manifest", str(odd), "--out", str(tmp_path / "o"))
        assert done.returncode == 2 and f"manifest {odd}: is not a regular file" in done.stderr, done.stderr[-2000:]


def test_a_subject_add_on_a_full_disk_is_exit_6_and_leaves_no_half_added_subject(tmp_path):
    from atelier.cli.demo_data import write_demo_photos

    small = tmp_path / "small"
    small.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=40m", "tmpfs", str(small)):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount)")
    env = {"ATELIER_WORKSPACE": str(small / "ws")}
    try:
        made = _cli("init", env=env)
        assert made.returncode == 0, made.stderr
        photos = write_demo_photos(tmp_path / "photos", count=5)
        free = shutil.disk_usage(small).free
        (small / "filler").write_bytes(b"\0" * (free - sum(p.stat().st_size for p in photos) - 64 * 1024))
        done = _cli("subject", "add", "acme", "robot", "--class", "toy", *map(str, photos), env=env)
        assert done.returncode == 6, done.stderr
        assert "is full" in done.stderr or "full or read-only" in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
        (small / "filler").unlink()
        listed = _cli("subject", "list", env=env)
        assert listed.returncode == 0 and "acme/robot" not in listed.stdout, listed.stdout + listed.stderr
        again = _cli("subject", "add", "acme", "robot", "--class", "toy", *map(str, photos), env=env)  # no --replace needed
        assert again.returncode == 0, again.stderr
        staged = subprocess.run(["git", "-C", str(small / "ws"), "status", "--porcelain"], capture_output=True, text=True).stdout
        assert "robot" not in staged
    finally:
        subprocess.run(["umount", str(small)], check=False)
