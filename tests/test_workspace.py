"""Workspace: git + DVC tracking of subject photos, checkout at a revision, clear errors."""

import pytest

from atelier.kernel.errors import NotFound, WorkspaceError
from atelier.kernel.hashing import sha256_file
from atelier.kernel.settings import Settings
from atelier.kernel.workspace import add_subject, checkout_subject, init_workspace, list_subjects, subject_revision


@pytest.fixture
def ws(tmp_path):
    s = Settings(workspace=tmp_path / "ws")
    init_workspace(s)
    return s


def test_init_is_idempotent(ws):
    assert init_workspace(ws) == []
    assert (ws.workspace / ".dvc").is_dir() and (ws.workspace / "dvc.yaml").is_file()


def test_add_then_checkout_at_each_revision(ws, photos, tmp_path):
    rev1 = add_subject(ws, "acme", "robot", "toy", photos[:4])
    assert list_subjects(ws) == ["acme/robot"]
    assert (ws.workspace / "data/subjects/acme/robot.dvc").is_file()
    rev2 = add_subject(ws, "acme", "robot", "toy", photos[1:], replace=True)
    assert rev1 != rev2 and subject_revision(ws, "acme", "robot") == rev2
    old = checkout_subject(ws, "acme", "robot", rev1, tmp_path / "old")
    new = checkout_subject(ws, "acme", "robot", None, tmp_path / "new")
    assert sorted(old.files) == sorted(p.name for p in photos[:4])
    assert sorted(new.files) == sorted(p.name for p in photos[1:])
    assert old.files[photos[0].name] == sha256_file(photos[0])
    assert old.class_noun == "toy" and old.dvc_md5 != new.dvc_md5
    # the photos are in the DVC remote, so they come back even when the working copy is gone
    import shutil

    shutil.rmtree(ws.workspace / ".dvc" / "cache")
    again = checkout_subject(ws, "acme", "robot", rev1, tmp_path / "again")
    assert again.files == old.files


def test_existing_subject_needs_replace(ws, photos):
    add_subject(ws, "acme", "robot", "toy", photos)
    with pytest.raises(WorkspaceError, match="--replace"):
        add_subject(ws, "acme", "robot", "toy", photos)


def test_unknown_subject_says_how_to_add_it(ws):
    with pytest.raises(NotFound) as err:
        subject_revision(ws, "nobody", "nothing")
    assert "atelier subject add nobody nothing" in str(err.value)


def test_duplicate_names_refused_and_nothing_left_behind(ws, photos, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / photos[0].name).write_bytes(photos[1].read_bytes())
    with pytest.raises(WorkspaceError, match="file name"):
        add_subject(ws, "acme", "dupes", "toy", [photos[0], other / photos[0].name])
    assert not (ws.workspace / "data/subjects/acme/dupes").exists()


def test_uninitialised_workspace(tmp_path):
    with pytest.raises(WorkspaceError, match="atelier init"):
        subject_revision(Settings(workspace=tmp_path / "none"), "a", "b")


def test_concurrent_subject_adds_wait_their_turn_and_both_land(ws, photos):
    import threading

    from atelier.kernel.storage import file_lock

    waited, results, errors = [], {}, []

    def add(name):
        try:
            results[name] = add_subject(ws, "acme", name, "toy", photos[:4], on_wait=lambda: waited.append(name))
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)

    with file_lock(ws.workspace / ".atelier" / "workspace.lock"):  # a command already changing the workspace
        threads = [threading.Thread(target=add, args=(name,)) for name in ("one", "two")]
        for t in threads:
            t.start()
        for _ in range(100):
            if len(waited) == 2:
                break
            threading.Event().wait(0.05)
        assert sorted(waited) == ["one", "two"] and not results
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert list_subjects(ws) == ["acme/one", "acme/two"]
    assert results["one"] == subject_revision(ws, "acme", "one") and results["two"] == subject_revision(ws, "acme", "two")


def test_a_dvc_command_holding_dvcs_lock_is_a_clear_error_not_a_crash(ws, photos):
    import zc.lockfile

    lock = zc.lockfile.LockFile(str(ws.workspace / ".dvc" / "tmp" / "lock"))
    try:
        with pytest.raises(WorkspaceError, match="DVC is locked by another command") as err:
            add_subject(ws, "acme", "robot", "toy", photos[:4])
        assert "run this one again" in err.value.fix
    finally:
        lock.close()
    assert list_subjects(ws) == []  # nothing half-added
    add_subject(ws, "acme", "robot", "toy", photos[:4])


@pytest.mark.slow
def test_a_subject_add_killed_at_any_point_is_undone_and_never_committed_by_the_next(ws, photos, capsys):
    """kill -9 of `atelier subject add` at points spread over its run: the next command undoes what it left
    (or finds it complete), commits only its own files, and the killed subject can be added again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from atelier.kernel.workspace import git

    env = {**os.environ, "ATELIER_WORKSPACE": str(ws.workspace)}
    argv = [sys.executable, "-m", "atelier.cli", "subject", "add", "acme"]
    t0 = time.perf_counter()
    subprocess.run([*argv, "timing", "--class", "toy", *map(str, photos[:4])], env=env, check=True, capture_output=True)
    whole = time.perf_counter() - t0
    outcomes = []
    for i, share in enumerate((0.45, 0.55, 0.65, 0.75, 0.85, 0.95)):
        proc = subprocess.Popen(
            [*argv, f"killed{i}", "--class", "toy", *map(str, photos[:4])], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(whole * share)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        capsys.readouterr()
        add_subject(ws, "acme", f"next{i}", "toy", photos[:4])
        said = capsys.readouterr().err
        committed = git(ws.workspace, "show", "--name-only", "--format=", "HEAD").split()
        assert not [p for p in committed if "killed" in p], committed
        assert git(ws.workspace, "diff", "--cached", "--name-only") == ""
        assert not [p for p in git(ws.workspace, "status", "--porcelain").splitlines() if "killed" in p]
        if f"acme/killed{i}" in list_subjects(ws):
            outcomes.append("complete")
            subject_revision(ws, "acme", f"killed{i}")
        else:
            outcomes.append("undone")
            assert f"killed{i}" not in said or f"undid subject add acme/killed{i}, which was interrupted" in said
            assert not (ws.workspace / "data" / "subjects" / "acme" / f"killed{i}").exists()
            add_subject(ws, "acme", f"killed{i}", "toy", photos[:4])  # no --replace needed
    assert "undone" in outcomes, outcomes  # the kills did land inside the change


@pytest.mark.parametrize("torn", [b"", b'{"write": {"data/subjects/acme/x": {"pid": 4', b"\xff\xfe"])
def test_dvcs_lock_table_torn_by_a_kill_is_cleared_by_the_next_command(ws, photos, capsys, torn):
    """A kill -9 while DVC rewrites .dvc/tmp/rwlock leaves it empty or cut off; DVC alone then fails every later
    command ("JSON structure is corrupted"). The next atelier command clears it and its change lands."""
    add_subject(ws, "acme", "first", "toy", photos[:4])
    rwlock = ws.workspace / ".dvc" / "tmp" / "rwlock"
    rwlock.write_bytes(torn)
    capsys.readouterr()
    assert list_subjects(ws) == ["acme/first"]  # a reader settles it too
    assert "cleared DVC's lock table" in capsys.readouterr().err
    rwlock.write_bytes(torn)
    add_subject(ws, "acme", "second", "toy", photos[:4])
    assert list_subjects(ws) == ["acme/first", "acme/second"]
    assert subject_revision(ws, "acme", "second")
    import json

    assert not any(json.loads(rwlock.read_text()).values())  # DVC wrote a fresh table, no lock left in it


def test_dvc_files_torn_by_a_kill_are_put_back_by_the_next_command(ws, photos, capsys):
    """DVC writes dvc.lock and .dvc files in place: a kill -9 mid-write leaves them cut off, and DVC then refuses
    the pipeline. The next command puts a committed one back as HEAD has it and removes one no commit had;
    a file DVC reads, committed or not, is left alone."""
    from atelier.kernel.workspace import git

    rev = add_subject(ws, "acme", "first", "toy", photos[:4])
    subject_dvc = ws.workspace / "data" / "subjects" / "acme" / "first.dvc"
    whole = subject_dvc.read_text()
    subject_dvc.write_text(whole[: len(whole) // 2])  # cut off inside its outs
    documents = ws.workspace / "data" / "documents"
    documents.mkdir(parents=True, exist_ok=True)
    (documents / "calibration.dvc").write_bytes(b"outs:\n- md5: 0f")  # new, never committed, cut off
    kept = documents / "evaluation.dvc"
    kept.write_text(whole.replace("first", "evaluation"))  # new and whole: someone's `dvc add`, not ours to judge
    (ws.workspace / "dvc.lock").write_text("schema: '2.0'\nstages:\n  documents:\n    cmd: [")
    capsys.readouterr()
    add_subject(ws, "acme", "second", "toy", photos[:4])
    said = capsys.readouterr().err
    assert "put back data/subjects/acme/first.dvc as the last commit has it" in said
    assert "removed data/documents/calibration.dvc" in said and "removed dvc.lock" in said
    assert subject_dvc.read_text() == whole and subject_revision(ws, "acme", "first") == rev
    assert not (documents / "calibration.dvc").exists() and not (ws.workspace / "dvc.lock").exists()
    assert kept.is_file() and "evaluation.dvc" not in said
    assert set(git(ws.workspace, "show", "--name-only", "--format=", "HEAD").split()) >= {"data/subjects/acme/second.dvc"}
    assert not [p for p in git(ws.workspace, "show", "--name-only", "--format=", "HEAD").split() if "first" in p or "documents" in p]


def test_a_workspace_whose_init_was_killed_before_its_commit_says_to_run_init_again(ws, photos):
    import subprocess

    subprocess.run(["git", "update-ref", "-d", "HEAD"], cwd=ws.workspace, check=True)  # as if killed before the commit
    with pytest.raises(WorkspaceError, match="interrupted before its first commit") as err:
        add_subject(ws, "acme", "first", "toy", photos[:4])
    assert "run `atelier init` again" in err.value.fix
    assert init_workspace(ws) == []  # finishes it: the first commit
    add_subject(ws, "acme", "first", "toy", photos[:4])
    assert list_subjects(ws) == ["acme/first"]


def test_gits_index_lock_left_by_a_kill_is_removed_but_a_live_gits_is_kept(ws, photos, capsys):
    import subprocess

    lock = ws.workspace / ".git" / "index.lock"
    lock.write_bytes(b"")  # what a git add or commit killed mid-way leaves
    capsys.readouterr()
    add_subject(ws, "acme", "first", "toy", photos[:4])
    assert "removed .git/index.lock" in capsys.readouterr().err
    assert list_subjects(ws) == ["acme/first"] and not lock.exists()
    lock.write_bytes(b"")
    live = subprocess.Popen(["git", "hash-object", "--stdin"], cwd=ws.workspace, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:  # someone's own git at work in the workspace: its lock stays, and the refusal names it
        with pytest.raises(WorkspaceError, match=f"pid {live.pid}.*holds .git/index.lock"):
            add_subject(ws, "acme", "second", "toy", photos[:4])
        assert lock.exists() and list_subjects(ws) == ["acme/first"]
    finally:
        live.communicate(b"")
    lock.unlink()
    add_subject(ws, "acme", "second", "toy", photos[:4])
    assert list_subjects(ws) == ["acme/first", "acme/second"]


def test_a_well_formed_dvc_lock_table_is_left_to_dvc(ws, photos, capsys):
    """A table that parses is DVC's to judge (it drops the entries of dead processes itself): not cleared."""
    import json
    import os

    add_subject(ws, "acme", "first", "toy", photos[:4])
    rwlock = ws.workspace / ".dvc" / "tmp" / "rwlock"
    live = {"read": {}, "write": {"data/subjects/acme/other": {"pid": os.getpid(), "cmd": "dvc add"}}}
    rwlock.write_text(json.dumps(live))
    capsys.readouterr()
    add_subject(ws, "acme", "second", "toy", photos[:4])
    assert "cleared DVC's lock table" not in capsys.readouterr().err
    assert json.loads(rwlock.read_text()) == live


def test_subject_remove_takes_it_out_in_one_commit_and_keeps_its_history(ws, photos):
    from atelier.kernel.workspace import git, remove_subject

    rev = add_subject(ws, "acme", "robot", "toy", photos[:4])
    add_subject(ws, "acme", "other", "toy", photos[:4])
    removed = remove_subject(ws, "acme", "robot")
    assert list_subjects(ws) == ["acme/other"]
    assert "acme.robot" not in (ws.workspace / "subjects.yaml").read_text() and "acme.other" in (ws.workspace / "subjects.yaml").read_text()
    assert git(ws.workspace, "status", "--porcelain", "--untracked-files=no") == ""
    assert set(git(ws.workspace, "show", "--name-only", "--format=", removed).split()) == {
        "data/subjects/acme/robot.dvc",
        "data/subjects/acme/robot.yaml",
        "subjects.yaml",
    }
    snapshot = checkout_subject(ws, "acme", "robot", rev, ws.workspace.parent / "back")  # the history still has it
    assert len(snapshot.files) == 4
    with pytest.raises(NotFound, match="acme/robot"):
        remove_subject(ws, "acme", "robot")
    add_subject(ws, "acme", "robot", "toy", photos[:4])  # and it can come back, no --replace needed
