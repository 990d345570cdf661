"""Who `atelier up`'s servers run as (cli/stack_user.py), on its own: fast, no server started."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from atelier.cli import stack_user
from atelier.kernel.settings import load_settings

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the service user is made and used only when `atelier up` runs as root")


@pytest.fixture
def open_dir():
    """A folder every user can reach (pytest's own temp folders are private to root)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(dir="/tmp"))
    yield path
    shutil.rmtree(path)


def test_a_private_folder_on_the_way_is_named_and_a_readable_path_passes(open_dir):
    tmp_path = open_dir
    private = tmp_path / "private"
    (private / "venv").mkdir(parents=True)
    (private / "venv" / "python").write_text("")
    os.chmod(tmp_path, 0o755)
    os.chmod(private, 0o700)
    os.chmod(private / "venv" / "python", 0o755)
    other = os.getuid() + 4242
    assert stack_user.unreadable_by(private / "venv" / "python", other, other) == private
    os.chmod(private, 0o711)  # passable without listing is enough on the way
    assert stack_user.unreadable_by(private / "venv" / "python", other, other) is None
    os.chmod(private / "venv" / "python", 0o700)  # the file itself must be readable
    assert stack_user.unreadable_by(private / "venv" / "python", other, other) == private / "venv" / "python"
    # its owner reads it by the owner's bits
    assert stack_user.unreadable_by(private / "venv" / "python", os.getuid(), os.getgid()) is None


@root_only
def test_servers_run_as_the_service_user_where_it_can_read_what_they_run(tmp_path, open_dir):
    settings = load_settings(workspace=tmp_path / "ws")
    account = stack_user.service_account(settings, [Path("/usr/bin/env")], create=True)
    entry = pwd.getpwnam("atelier")
    assert (account.user, account.uid, account.gid) == ("atelier", entry.pw_uid, entry.pw_gid)
    assert entry.pw_shell.endswith("nologin") and entry.pw_uid != 0
    assert account.home.parent == stack_user.SERVICE_HOMES and account.home.name.startswith("atelier-")
    assert account.popen_args() == {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    assert account.environment()["HOME"] == str(account.home)  # nothing of its processes lands in root's home

    private = open_dir / "opt"
    private.mkdir(mode=0o700)
    os.chmod(open_dir, 0o755)
    (private / "python").write_text("")
    fallback = stack_user.service_account(settings, [private / "python"])
    assert fallback.user is None and fallback.uid == 0
    assert f"user atelier cannot read {private} on the way to {private / 'python'}" in fallback.describe()

    nobody = load_settings(workspace=tmp_path / "ws", stack={"service_user": ""})
    assert stack_user.service_account(nobody, [Path("/usr/bin/env")], create=True).user is None


@root_only
def test_state_kept_under_the_workspace_moves_to_the_service_users_folder_once(tmp_path, monkeypatch):
    monkeypatch.setattr(stack_user, "SERVICE_HOMES", tmp_path / "homes")
    settings = load_settings(workspace=tmp_path / "ws")
    old = stack_user.stack_dir(settings) / "s3" / "data"
    old.mkdir(parents=True)
    (old / "1.dat").write_bytes(b"a tenant's weights")
    os.chmod(old / "1.dat", 0o644)  # as SeaweedFS left some files
    account = stack_user.service_account(settings, create=True)
    home = stack_user.prepare_home(settings, account)
    moved = home / "s3" / "data" / "1.dat"
    assert moved.read_bytes() == b"a tenant's weights" and not old.exists()
    assert (moved.stat().st_uid, moved.stat().st_mode & 0o777) == (account.uid, 0o600)
    assert (home.stat().st_uid, home.stat().st_mode & 0o777) == (account.uid, 0o700)
    # a second start moves nothing and keeps what is there
    stack_user.prepare_home(settings, account)
    assert moved.read_bytes() == b"a tenant's weights"
