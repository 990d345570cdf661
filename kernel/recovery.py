"""What a killed command left in the workspace, undone or finished by the next one (under the workspace
lock): a subject change journaled before it starts and undone when it did not reach its commit, and the
files git and DVC rewrite in place put back when a kill tore them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import yaml

from atelier.kernel.errors import WorkspaceError
from atelier.kernel.gitcmd import git
from atelier.kernel.pipeline import PARAMS_FILE, SUBJECTS_FILE
from atelier.kernel.settings import Settings
from atelier.kernel.storage import file_lock, write_json_atomic

JOURNAL = Path(".atelier") / "changing.json"  # the change in progress (subject add), for recover
RWLOCK = Path(".dvc") / "tmp" / "rwlock"  # DVC's table of read and write locks, rewritten in place by DVC
RWLOCK_GUARD = Path(".dvc") / "tmp" / "rwlock.lock"  # the lock DVC holds while it rewrites that table


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def recover(ws: Path) -> None:
    """Finish what a killed command left (under the workspace lock): git's and DVC's files torn by a kill are
    put back (git's stale index lock removed, DVC's lock table cleared, dvc.lock and .dvc files as HEAD has
    them), and a subject add that did not reach its commit is undone, so its files are neither listed as a
    subject nor committed by the next command."""
    head = _head(ws)
    if head is None:
        raise WorkspaceError(
            f"workspace {ws}",
            "has no commit yet: the `atelier init` that made it was interrupted before its first commit",
            "run `atelier init` again: it finishes what it started and keeps what is there",
        )
    _clear_stale_git_lock(ws)
    _clear_torn_rwlock(ws)
    _restore_torn_dvc_files(ws)
    try:
        change = json.loads((ws / JOURNAL).read_text())
    except FileNotFoundError:
        return
    except json.JSONDecodeError:
        change = None  # cut off while it was written: the change had not started
    if change is not None and head == change["head"]:
        _undo_subject_change(ws, change["rel"], change["tracked"])
        _note(f"undid {change['what']}, which was interrupted before its commit (nothing of it was kept)")
    (ws / JOURNAL).unlink(missing_ok=True)


def _clear_stale_git_lock(ws: Path) -> None:
    """A `git add` or `git commit` killed mid-way leaves .git/index.lock, and git then refuses every later change
    ("Another git process seems to be running"). Under the workspace lock no Atelier command runs git here, so the
    lock is stale unless a git process of someone's own (a commit waiting on its editor) works in the workspace,
    which is a clear error rather than DVC's or git's refusal."""
    lock = ws / ".git" / "index.lock"
    if not lock.exists():
        return
    import psutil

    root = str(ws.resolve())
    for proc in psutil.process_iter(["name", "cwd"]):
        cwd = proc.info.get("cwd") or ""
        if (proc.info.get("name") or "").startswith("git") and (cwd == root or cwd.startswith(root + os.sep)):
            raise WorkspaceError(
                f"workspace {ws}",
                f"a git command of its own (pid {proc.pid}) is at work in it and holds .git/index.lock",
                "let that git command finish (a commit waiting on its editor: close the editor), then run this one again",
            )
    lock.unlink(missing_ok=True)
    _note("removed .git/index.lock, which a killed git command left behind (no git process works in the workspace)")


def _head(ws: Path) -> str | None:
    """The commit HEAD names, or None before the workspace's first commit."""
    try:
        return git(ws, "rev-parse", "-q", "--verify", "HEAD")
    except WorkspaceError:
        return None


def _rwlock_torn(ws: Path) -> bool:
    try:
        json.loads((ws / RWLOCK).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (ValueError, UnicodeDecodeError):
        return True
    return False


def _clear_torn_rwlock(ws: Path) -> None:
    """DVC rewrites its table of read and write locks (.dvc/tmp/rwlock) in place: a kill -9 during that write
    leaves it empty or cut off, and every later DVC command then fails on it ("JSON structure is
    corrupted"). The table names only the running processes' locks, and a torn one names none it can be
    trusted for, so it is removed (an absent table is DVC's "no locks"), under DVC's own guard of it."""
    if not _rwlock_torn(ws):
        return
    from dvc.lock import make_lock

    guard = make_lock(str(ws / RWLOCK_GUARD), tmp_dir=str((ws / RWLOCK).parent), hardlink_lock=False)
    with guard:
        if _rwlock_torn(ws):
            (ws / RWLOCK).unlink(missing_ok=True)
            _note(f"cleared DVC's lock table {RWLOCK}, which a killed command left cut off in mid-write")


def _restore_torn_dvc_files(ws: Path) -> None:
    """DVC writes dvc.lock and .dvc files in place (open, truncate, write): a kill -9 during `dvc commit`,
    `dvc repro` or `dvc add` can leave one cut off, and DVC then refuses the whole pipeline ("YAML file
    structure is corrupted" or a format error). Only a file that differs from HEAD can be torn, so git's
    status names the candidates; one that DVC's own schema refuses is put back as HEAD has it (a stage whose
    lock was lost is then seen as changed and run or committed again), or removed when HEAD has none."""
    files = ("dvc.lock", ":(glob)**/*.dvc")
    changed = (
        git(ws, "diff", "--name-only", "HEAD", "--", *files) + "\n" + git(ws, "ls-files", "--others", "--exclude-standard", "--", *files)
    )
    for rel in filter(None, changed.splitlines()):
        if _dvc_file_reads(ws / rel):  # whole, or deleted
            continue
        if in_head(ws, rel):
            git(ws, "checkout", "HEAD", "--", rel)
            _note(f"put back {rel} as the last commit has it: a killed command left it cut off in mid-write")
        else:
            git(ws, "rm", "-q", "--cached", "--ignore-unmatch", "--", rel)
            (ws / rel).unlink(missing_ok=True)
            _note(f"removed {rel}, which a killed command left cut off in mid-write (no commit had it)")


def _dvc_file_reads(path: Path) -> bool:
    """Whether DVC would read the file: YAML that its schema for a lock file or a .dvc file accepts, each
    output and dependency naming its path (which DVC's loader needs and the .dvc schema leaves optional)."""
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA, COMPILED_SINGLE_STAGE_SCHEMA
    from voluptuous import Invalid

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        (COMPILED_LOCKFILE_SCHEMA if path.name == "dvc.lock" else COMPILED_SINGLE_STAGE_SCHEMA)(data)
    except FileNotFoundError:
        return True
    except (yaml.YAMLError, UnicodeDecodeError, Invalid):
        return False
    if not isinstance(data, dict) or not data:
        return False
    stages = (data.get("stages") or {}) if path.name == "dvc.lock" else {"": data}
    entries = [e for stage in stages.values() for key in ("outs", "deps") for e in (stage.get(key) or [])]
    return all(isinstance(e.get("path"), str) and e["path"] for e in entries)


def settle(settings: Settings) -> None:
    """Readers of the subject list first let a killed change be undone (waiting for a live one to finish)."""
    ws = settings.workspace
    if (ws / JOURNAL).exists() or _rwlock_torn(ws):
        with file_lock(ws / ".atelier" / "workspace.lock"):
            recover(ws)


@contextlib.contextmanager
def journaled(ws: Path, what: str, rel: str, tracked: bool) -> Iterator[None]:
    """A change to one subject's files, all or nothing: a journal is written first, so a kill -9 inside the
    block is undone by the next command (recover); an error undoes it at once (on a full disk the undo may
    fail too: the journal then stays for the next command)."""
    write_json_atomic(ws / JOURNAL, {"what": what, "rel": rel, "tracked": tracked, "head": _head(ws)})
    try:
        yield
    except BaseException:
        try:
            _undo_subject_change(ws, rel, tracked)
            (ws / JOURNAL).unlink(missing_ok=True)
        except Exception:  # noqa: BLE001 (the error being raised is the one to report)
            pass
        raise
    (ws / JOURNAL).unlink(missing_ok=True)


def in_head(ws: Path, path: str) -> bool:
    try:
        git(ws, "cat-file", "-e", f"HEAD:{path}")
        return True
    except WorkspaceError:
        return False


def _undo_subject_change(ws: Path, rel: str, tracked: bool) -> None:
    """The subject's files and the pipeline files as HEAD has them, in the index and on disk: nothing of the
    change stays staged for the next commit."""
    from dvc.repo import Repo

    own = [f"{rel}.dvc", f"{rel}.yaml", (Path(rel).parent / ".gitignore").as_posix()]
    committed = [p for p in [*own, SUBJECTS_FILE, PARAMS_FILE, "dvc.yaml"] if in_head(ws, p)]
    if committed:
        git(ws, "checkout", "HEAD", "--", *committed)
    for path in own:
        if path not in committed:  # new with this change: not staged, not on disk
            git(ws, "rm", "-q", "--cached", "--ignore-unmatch", "--", path)
            (ws / path).unlink(missing_ok=True)
    if tracked:  # the committed photos, from DVC's cache
        with contextlib.chdir(ws), Repo(str(ws)) as repo:
            repo.checkout(rel, force=True)
    else:
        shutil.rmtree(ws / rel, ignore_errors=True)
