"""The command line: help for every command, one-line errors with a fix and a non-zero exit."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from atelier.cli.main import app

runner = CliRunner()


def test_help_documents_every_command():
    out = runner.invoke(app, ["--help"]).output
    for command in ("init", "info", "subject", "finetune", "priors", "generate", "demo"):
        assert command in out
    assert "--base-model" in runner.invoke(app, ["finetune", "--help"]).output
    assert "--class" in runner.invoke(app, ["subject", "add", "--help"]).output


def test_help_speaks_in_metavars_not_python_types():
    """`--out PATH`, `--count INTEGER`, flags with no type, arguments in capitals; never `<bool>`,
    `<list[Path]>` or `{customer}` (cli/help_style.py over the pinned Typer)."""
    import re

    for command in ([], ["finetune"], ["ocr"], ["subject", "add"], ["priors"], ["promote"], ["batch-generate"]):
        out = runner.invoke(app, [*command, "--help"], terminal_width=200).output
        assert not re.search(r"<(bool|str|int|float|path|list\[)", out, re.I), out
        assert "{" not in out.splitlines()[1], out
    ocr = runner.invoke(app, ["ocr", "--help"], terminal_width=200).output
    assert "ocr [OPTIONS] PATHS..." in ocr and re.search(r"--out +PATH", ocr) and re.search(r"--lines +the images", ocr)
    assert re.search(r"--count +INTEGER", runner.invoke(app, ["priors", "--help"], terminal_width=200).output)
    assert "Missing argument 'CUSTOMER'" in runner.invoke(app, ["finetune"], terminal_width=200).output


def test_info_prints_the_locations(workspace):
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["MLflow tracking URI"].startswith("sqlite:///") and info["workspace"] == str(workspace.workspace)
    # the auth in force, not "none": the MLflow UI of `atelier ui` asks for atelier-ops and the password's file
    assert "atelier-ops" in info["MLflow user"] and "secrets.json" in info["MLflow user"] and "none" not in info["MLflow user"]


def test_subject_add_refuses_a_corrupt_photo_and_stores_nothing(workspace, photos, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"GIF89a garbage")
    result = runner.invoke(app, ["subject", "add", "acme", "cli-bad", "--class", "toy", *map(str, photos[:3]), str(bad)])
    assert result.exit_code == 2
    assert "broken.jpg" in result.output and "Fix:" in result.output
    assert not workspace.subject_dir("acme", "cli-bad").exists()


def test_subject_add_refuses_too_few_photos(workspace, photos):
    result = runner.invoke(app, ["subject", "add", "acme", "cli-few", "--class", "toy", *map(str, photos[:2])])
    assert result.exit_code == 2 and "count" in result.output


def test_subject_add_then_list(workspace, photos):
    result = runner.invoke(app, ["subject", "add", "acme", "cli-ok", "--class", "toy", *map(str, photos)])
    assert result.exit_code == 0, result.output
    assert "acme/cli-ok" in runner.invoke(app, ["subject", "list"]).output


@pytest.mark.parametrize("customer", ["../etc", "ACME", "a/b"])
def test_path_tricks_in_ids_are_refused(workspace, photos, customer):
    result = runner.invoke(app, ["subject", "add", customer, "x", "--class", "toy", *map(str, photos)])
    assert result.exit_code == 2 and "not a valid id" in result.output


def test_finetune_bad_config_key_exits_non_zero(workspace, tmp_path):
    """In a real process: exit code and a one-line error, no traceback."""
    config = tmp_path / "c.yaml"
    config.write_text("max_steps: 10\n")
    done = subprocess.run(
        [sys.executable, "-m", "atelier.cli", "finetune", "acme", "robot", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "max_steps" in done.stderr and "Traceback" not in done.stderr


def test_registry_commands_need_a_workspace_and_leave_no_stray_files(tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path / "none"))
    result = runner.invoke(app, ["ledger", "verify"])
    assert result.exit_code == 2 and "atelier init" in result.output
    assert not (tmp_path / "none").exists()


def _sweep_cases(tmp):
    photo_dir, missing = tmp / "none-here", tmp / "missing.png"
    manifest = tmp / "m.jsonl"
    manifest.write_text('{"id": "a", "prompt": "x", "seed": 1}\n')
    return {
        "generate: typo'd model": ["generate", "dreambooth-acme-robt@champion", "--prompt", "x"],
        "generate: typo'd version": ["generate", "dreambooth-acme-robot/999", "--prompt", "x"],
        "lineage: typo'd model": ["lineage", "dreambooth-acme-robt@champion"],
        "promote: typo'd model": ["promote", "dreambooth-acme-robt", "1", "--reason", "r"],
        "rollback: typo'd model": ["rollback", "dreambooth-acme-robt", "--reason", "r"],
        "finetune: typo'd customer": ["finetune", "acmee", "robot"],
        "finetune: typo'd subject": ["finetune", "acme", "robt"],
        "finetune: unknown --rev": ["finetune", "acme", "robot", "--rev", "deadbeef"],
        "customer add: a name the platform reserves": ["customer", "add", "ledger"],
        "finetune: missing config": ["finetune", "acme", "robot", "--config", str(tmp / "nope.yaml")],
        "finetune: missing base model": ["finetune", "acme", "robot", "--base-model", str(photo_dir)],
        "subject add: missing photo": ["subject", "add", "acme", "x", "--class", "toy", str(missing)],
        "subject add: empty folder": ["subject", "add", "acme", "x", "--class", "toy", str(tmp)],
        "batch-generate: typo'd customer": ["batch-generate", "acmee", "robot", "--manifest", str(manifest), "--out", str(tmp / "o")],
        "batch-generate: missing manifest": ["batch-generate", "acme", "robot", "--manifest", str(missing), "--out", str(tmp / "o")],
        "batch-ocr: missing folder": ["batch-ocr", str(photo_dir), "--out", str(tmp / "o2")],
        "ocr: missing path": ["ocr", str(missing)],
        "ocr: typo'd model": ["ocr", "--model", "ocrr@champion", str(manifest)],
        "lineage: path trick": ["lineage", "../../etc/passwd"],
    }


def test_no_command_answers_a_typo_with_a_traceback(workspace, tmp_path):
    """Every bad name or path: exit 2 and one short message naming the item, in a real process."""
    (tmp_path / "empty").mkdir()
    cases = _sweep_cases(tmp_path / "empty")
    from concurrent.futures import ThreadPoolExecutor

    def run(args):
        return subprocess.run([sys.executable, "-m", "atelier.cli", *args], capture_output=True, text=True, timeout=300)

    labels = list(cases)
    results = {labels[0]: run(cases[labels[0]])}  # alone first: it may create the stores the others then only read
    with ThreadPoolExecutor(max_workers=3) as pool:  # each case is a process that mostly waits on imports
        results.update(zip(labels[1:], pool.map(run, [cases[k] for k in labels[1:]])))
    failures = []
    for label, done in results.items():
        text = done.stdout + done.stderr
        if done.returncode != 2 or "Traceback" in text or len(text.strip().splitlines()) > 8:
            failures.append(f"{label}: exit {done.returncode}\n{text[-600:]}")
    assert not failures, "\n\n".join(failures)


def test_version_and_photo_folder(workspace, photos):
    from atelier.kernel.gitinfo import code_version

    out = runner.invoke(app, ["--version"]).output
    assert out.startswith("atelier ") and code_version().git_sha[:12] in out
    result = runner.invoke(app, ["subject", "add", "acme", "cli-folder", "--class", "toy", str(photos[0].parent)])
    assert result.exit_code == 0 and f"added {len(list(photos[0].parent.iterdir()))} photos" in result.output, result.output


@pytest.mark.parametrize(
    ("store", "content", "problem"),
    [
        ("mlflow.db", b"", "MLflow's registry database is empty (0 bytes)"),
        ("ledger.db", b"\x00" * 4096, "the promotion ledger is not a SQLite database"),
        ("prefect/prefect.db", None, "Prefect's run history is another program's database"),
        ("mlflow.db", b"SQLite format 3\x00" + b"\xff" * 4000, "MLflow's registry database cannot be read"),
    ],
)
def test_an_empty_or_foreign_database_is_exit_6_naming_it_and_never_recreated(tmp_path, monkeypatch, store, content, problem):
    import sqlite3

    path = tmp_path / "ws" / ".atelier" / store
    path.parent.mkdir(parents=True)
    if content is None:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE notes (x)")
    else:
        path.write_bytes(content)
    import os
    import time

    os.utime(path, (time.time() - 120, time.time() - 120))  # not one another command is creating right now
    before = path.read_bytes()
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path / "ws"))
    for command in (["ledger", "verify"], ["models"], ["runs"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 6, (command, result.output)
        assert f"error: {path}: {problem}" in result.output and "restore it from a backup" in result.output
        assert "Traceback" not in result.output
    assert path.read_bytes() == before  # left as it was, for whoever restores it


def test_a_store_another_command_is_creating_right_now_is_not_called_damaged(tmp_path):
    """Two commands at once on a new workspace: one's Prefect server creates prefect.db (0 bytes for a moment,
    then only alembic_version while it migrates) while the other checks the stores."""
    import sqlite3

    from atelier.kernel.settings import load_settings
    from atelier.kernel.stores import check_local_stores

    settings = load_settings(workspace=tmp_path / "ws")
    settings.prefect_home.mkdir(parents=True)
    (settings.prefect_home / "prefect.db").write_bytes(b"")
    check_local_stores(settings)  # just created: passes
    (settings.prefect_home / "prefect.db").unlink()
    with sqlite3.connect(settings.prefect_home / "prefect.db") as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
    check_local_stores(settings)  # mid-migration: passes
