"""The command line: help for every command, one-line errors with a fix and a non-zero exit."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_help_documents_every_command():
    out = runner.invoke(app, ["--help"]).output
    for command in ("init", "info", "subject", "finetune", "priors", "generate", "demo"):
        assert command in out
    assert "--base-model" in runner.invoke(app, ["finetune", "--help"]).output
    assert "--class" in runner.invoke(app, ["subject", "add", "--help"]).output


def test_info_prints_the_locations(workspace):
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["MLflow tracking URI"].startswith("sqlite:///") and info["workspace"] == str(workspace.workspace)


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
    done = subprocess.run([sys.executable, "-m", "cli", "finetune", "acme", "robot", "--config", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "max_steps" in done.stderr and "Traceback" not in done.stderr


def test_registry_commands_need_a_workspace_and_leave_no_stray_files(tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path / "none"))
    result = runner.invoke(app, ["ledger", "verify"])
    assert result.exit_code == 2 and "atelier init" in result.output
    assert not (tmp_path / "none").exists()
