"""The workspace: a git + DVC repository that holds customers' data, plus the embedded local stores.

workspace/
  data/subjects/<customer>/<subject>/      photos (DVC-tracked; the .dvc file is in git)
  data/subjects/<customer>/<subject>.yaml  subject metadata (class noun), in git
  data/class-priors/                       outputs of the dvc.yaml class_priors stage
  dvc.yaml, params.yaml                     the DVC pipeline (copied from Atelier's source root)
  .atelier/                                 embedded stores (git-ignored): MLflow, Prefect, caches
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import yaml

from atelier.kernel.errors import DiskError, InvalidIdentifier, NotFound, WorkspaceError
from atelier.kernel.gitinfo import SOURCE_ROOT
from atelier.kernel.hashing import file_hashes
from atelier.kernel.pipeline import PARAMS_FILE, SUBJECTS_FILE, list_subject, unlist_subject, write_launcher
from atelier.kernel.settings import Settings
from atelier.kernel.storage import atomic_dir, check_customer, check_slug, file_lock, write_json_atomic, write_text_atomic

MARKER = Path(".atelier") / "workspace.json"
JOURNAL = Path(".atelier") / "changing.json"  # the change in progress (subject add), for _recover
RWLOCK = Path(".dvc") / "tmp" / "rwlock"  # DVC's table of read and write locks, rewritten in place by DVC
RWLOCK_GUARD = Path(".dvc") / "tmp" / "rwlock.lock"  # the lock DVC holds while it rewrites that table
TEMPLATES = ("dvc.yaml", "params.yaml", "subjects.yaml")


@dataclass(frozen=True)
class SubjectSnapshot:
    customer: str
    subject: str
    class_noun: str
    rev: str  # git commit of the workspace whose .dvc file pins the images
    dvc_md5: str  # DVC's content hash of the image directory
    path: Path  # local copy of the images at `rev`
    files: dict[str, str]  # file name -> sha256


_DISK_FULL = ("No space left on device", "Out of diskspace", "Read-only file system", "Disk quota exceeded")


def _run(args: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr or exc.stdout).strip()[-400:]
        if any(marker in said for marker in _DISK_FULL):  # git's words for a full or read-only disk: exit 6, not bad input
            raise DiskError(
                f"the disk under {cwd}", f"is full or read-only ({' '.join(args[:2])}: {said})", "free space, then rerun"
            ) from None
        raise WorkspaceError(" ".join(args[:3]), f"failed: {said}", f"check the workspace at {cwd}") from None
    return done.stdout.strip()


def git(ws: Path, *args: str) -> str:
    return _run(["git", *args], ws)


def is_workspace(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def require_workspace(settings: Settings) -> Path:
    if not is_workspace(settings.workspace):
        raise WorkspaceError(
            str(settings.workspace),
            "is not an initialised Atelier workspace",
            "run `atelier init` (or set ATELIER_WORKSPACE to an existing workspace)",
        )
    return settings.workspace


def init_workspace(settings: Settings) -> list[str]:
    """Create (or complete) the workspace; safe to run again. Returns what it did."""
    from dvc.repo import Repo

    ws = settings.workspace
    done: list[str] = []
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / ".git").exists():
        git(ws, "init", "-q", "-b", "main")
        done.append("git repository")
    if not _git_config(ws, "user.email"):
        git(ws, "config", "user.email", "atelier@localhost")
        git(ws, "config", "user.name", "Atelier")
    if not (ws / ".dvc").exists():
        Repo.init(str(ws))
        done.append("DVC repository")
    if settings.dvc_remote is None:
        Path(settings.resolved_dvc_remote).mkdir(parents=True, exist_ok=True)
    desired = dvc_remote_config(settings)
    moved_from = None
    with Repo(str(ws)) as repo:
        with repo.config.edit() as conf:
            current = {k: conf["remote"].get("workspace", {}).get(k) for k in ("url", "endpointurl")}
            if conf["core"].get("remote") != "workspace" or current != {"endpointurl": None, **desired}:
                moved_from = current["url"]
                conf["remote"]["workspace"] = desired
                conf["core"]["remote"] = "workspace"
                conf["core"]["autostage"] = True
                done.append(f"DVC remote {desired['url']}")
    if moved_from and moved_from != desired["url"]:  # settings moved the remote (`atelier up`): copy every version there
        with contextlib.chdir(ws), Repo(str(ws)) as repo:
            pushed = repo.push(all_commits=True)
        done.append(f"{pushed} file(s) copied from {moved_from} to the new remote")
    for name in TEMPLATES:
        if not (ws / name).exists():
            shutil.copyfile(SOURCE_ROOT / name, ws / name)
            done.append(name)
    ignore = ws / ".gitignore"
    if ".atelier/" not in (ignore.read_text() if ignore.exists() else ""):
        with open(ignore, "a") as fh:
            fh.write(".atelier/\n")
    for sub in ("data/subjects", "data/class-priors"):
        (ws / sub).mkdir(parents=True, exist_ok=True)
    write_json_atomic(ws / MARKER, {"version": 1})
    write_launcher(ws)
    git(ws, "add", ".gitignore", ".dvc", *[n for n in (".dvcignore", *TEMPLATES) if (ws / n).exists()])
    if git(ws, "diff", "--cached", "--name-only"):
        git(ws, "commit", "-q", "-m", "atelier init")
    return done


def dvc_remote_config(settings: Settings) -> dict[str, str]:
    """The workspace's DVC remote as settings want it: an S3 URL carries the S3 endpoint (SeaweedFS, moto)."""
    url = settings.resolved_dvc_remote
    config = {"url": url}
    if url.startswith("s3://") and settings.s3_endpoint_url:
        config["endpointurl"] = settings.s3_endpoint_url
    return config


def push_to_remote(settings: Settings, repo) -> None:
    """Push to the workspace remote, after checking that it is the one the settings name."""
    configured = repo.config["remote"].get("workspace", {}).get("url")
    if configured != settings.resolved_dvc_remote:
        raise WorkspaceError(
            f"DVC remote of {settings.workspace}",
            f"is {configured}, the settings name {settings.resolved_dvc_remote}",
            "run `atelier init` to move the workspace to the remote of the settings (it copies the data)",
        )
    repo.push()


def _git_config(ws: Path, key: str) -> str:
    done = subprocess.run(["git", "config", key], cwd=ws, capture_output=True, text=True)
    return done.stdout.strip()


def check_class_noun(class_noun: str) -> str:
    """What the subject is ("dog", "red backpack"): it goes into every prompt, so it must say something."""
    if not class_noun.strip() or len(class_noun) > 64 or not class_noun.isprintable() or any(c in class_noun for c in "{}"):
        raise InvalidIdentifier(
            f"class noun {class_noun!r}",
            "is empty, over 64 characters, or holds control characters or braces",
            "name what the subject is in a few words, e.g. --class dog or --class 'red backpack'",
        )
    return class_noun.strip()


@contextlib.contextmanager
def changing_workspace(settings: Settings, on_wait: Callable[[], None] | None = None) -> Iterator[Path]:
    """One command at a time changes the workspace's git index, subjects.yaml and DVC files; a second
    waits its turn (`on_wait` says so). A `dvc` command run by hand that holds DVC's own lock is a
    clear WorkspaceError, not a crash."""
    from dvc.lock import LockError

    ws = require_workspace(settings)
    with file_lock(ws / ".atelier" / "workspace.lock", on_wait):
        _recover(ws)
        write_launcher(ws)
        try:
            yield ws
        except LockError as exc:
            raise WorkspaceError(
                f"workspace {ws}",
                f"DVC is locked by another command ({exc})",
                "wait for the other `dvc` or `atelier` command to finish, then run this one again",
            ) from None


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _recover(ws: Path) -> None:
    """Finish what a killed command left (under the workspace lock): DVC's files torn by a kill are put back
    (its lock table cleared, dvc.lock and .dvc files as HEAD has them), and a subject add that did not reach
    its commit is undone, so its files are neither listed as a subject nor committed by the next command."""
    if not _has_head(ws):
        raise WorkspaceError(
            f"workspace {ws}",
            "has no commit yet: the `atelier init` that made it was interrupted before its first commit",
            "run `atelier init` again: it finishes what it started and keeps what is there",
        )
    _clear_torn_rwlock(ws)
    _restore_torn_dvc_files(ws)
    try:
        change = json.loads((ws / JOURNAL).read_text())
    except FileNotFoundError:
        return
    except json.JSONDecodeError:
        change = None  # cut off while it was written: the change had not started
    if change is not None and git(ws, "rev-parse", "HEAD") == change["head"]:
        _undo_subject_change(ws, change["rel"], change["tracked"])
        _note(f"undid {change['what']}, which was interrupted before its commit (nothing of it was kept)")
    (ws / JOURNAL).unlink(missing_ok=True)


def _has_head(ws: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=ws, capture_output=True).returncode == 0


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
        if _in_head(ws, rel):
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


def _settle(settings: Settings) -> None:
    """Readers of the subject list first let a killed change be undone (waiting for a live one to finish)."""
    ws = settings.workspace
    if (ws / JOURNAL).exists() or _rwlock_torn(ws):
        with file_lock(ws / ".atelier" / "workspace.lock"):
            _recover(ws)


@contextlib.contextmanager
def _journaled(ws: Path, what: str, rel: str, tracked: bool) -> Iterator[None]:
    """A change to one subject's files, all or nothing: a journal is written first, so a kill -9 inside the
    block is undone by the next command (_recover); an error undoes it at once (on a full disk the undo may
    fail too: the journal then stays for the next command)."""
    write_json_atomic(ws / JOURNAL, {"what": what, "rel": rel, "tracked": tracked, "head": git(ws, "rev-parse", "HEAD")})
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


def _in_head(ws: Path, path: str) -> bool:
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
    committed = [p for p in [*own, SUBJECTS_FILE, PARAMS_FILE, "dvc.yaml"] if _in_head(ws, p)]
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


def add_subject(
    settings: Settings,
    customer: str,
    subject: str,
    class_noun: str,
    photos: list[Path],
    replace: bool = False,
    on_wait: Callable[[], None] | None = None,
) -> str:
    """Copy validated photos into data/subjects/, track them with DVC, push, commit. Returns the rev.
    Concurrent adds run one after the other (`on_wait` is told when this one waits)."""
    with changing_workspace(settings, on_wait):
        return _add_subject(settings, customer, subject, class_noun, photos, replace)


def _add_subject(settings: Settings, customer: str, subject: str, class_noun: str, photos: list[Path], replace: bool) -> str:
    from dvc.logger import set_loggers_level
    from dvc.repo import Repo

    ws = require_workspace(settings)
    check_customer(customer)
    check_slug(subject, "subject")
    class_noun = check_class_noun(class_noun)
    dest = settings.subject_dir(customer, subject)
    rel = dest.relative_to(ws).as_posix()
    tracked = dest.with_suffix(".dvc").is_file()
    if tracked and not replace:
        raise WorkspaceError(
            f"subject {customer}/{subject}",
            "already exists",
            "pass --replace to swap in a new photo set (the old one stays in git/DVC history)",
        )
    names = [p.name for p in photos]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise WorkspaceError(", ".join(dupes), "more than one photo has this file name", "rename the photos so each name is unique")
    with _journaled(ws, f"subject add {customer}/{subject}", rel, tracked):
        with atomic_dir(dest, replace=True) as tmp:
            for photo in photos:
                shutil.copy2(photo, tmp / photo.name)
        write_text_atomic(dest.with_suffix(".yaml"), yaml.safe_dump({"class_noun": class_noun, "customer": customer, "subject": subject}))
        # DVC resolves stage paths from the cwd; it logs an error per file ("failed to transfer ...") before
        # it raises, and Atelier's one line names the cause
        with contextlib.chdir(ws), Repo(str(ws)) as repo, set_loggers_level(logging.CRITICAL):
            repo.add(rel)
            push_to_remote(settings, repo)
        paths = [f"{rel}.dvc", f"{rel}.yaml", str(Path(rel).parent / ".gitignore"), *list_subject(ws, customer, subject, class_noun)]
        git(ws, "add", *paths)
        # only these paths: whatever else someone staged is not swept into the subject's commit
        git(ws, "commit", "-q", "-m", f"subject {customer}/{subject}: {len(photos)} photos, class {class_noun}", "--", *paths)
    return subject_revision(settings, customer, subject)


def remove_subject(settings: Settings, customer: str, subject: str, on_wait: Callable[[], None] | None = None) -> str:
    """Take a subject's photos out of the workspace in one commit (they stay in git and DVC history, so
    every registered version's lineage still reaches them). Returns the commit."""
    check_customer(customer)
    check_slug(subject, "subject")
    with changing_workspace(settings, on_wait) as ws:
        dest = settings.subject_dir(customer, subject)
        rel = dest.relative_to(ws).as_posix()
        if not _in_head(ws, f"{rel}.dvc"):
            raise NotFound(
                f"subject {customer}/{subject}",
                f"is not in the workspace (known: {', '.join(list_subjects(settings)) or 'none'})",
                "check the names with `atelier subject list`",
            )
        with _journaled(ws, f"subject remove {customer}/{subject}", rel, True):
            paths = [f"{rel}.dvc", f"{rel}.yaml"]
            git(ws, "rm", "-q", "--cached", "--ignore-unmatch", "--", *paths)
            listed = unlist_subject(ws, customer, subject)
            if listed:
                git(ws, "add", *listed)
            for path in paths:
                (ws / path).unlink(missing_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            git(ws, "commit", "-q", "-m", f"subject {customer}/{subject}: removed (its photos stay in history)", "--", *paths, *listed)
        return git(ws, "rev-parse", "HEAD")


def subject_revision(settings: Settings, customer: str, subject: str) -> str:
    ws = require_workspace(settings)
    _settle(settings)
    rel = settings.subject_dir(customer, subject).relative_to(ws).as_posix()
    rev = git(ws, "log", "-n", "1", "--format=%H", "--", f"{rel}.dvc")
    if not rev:
        known = ", ".join(list_subjects(settings)) or "none yet"
        raise NotFound(
            f"subject {customer}/{subject}",
            f"is not in the workspace (known: {known})",
            f"add it first: atelier subject add {customer} {subject} --class NOUN PHOTOS...",
        )
    return rev


def check_revision(settings: Settings, customer: str, subject: str, rev: str) -> str:
    """`rev` as a full commit id where the subject's photos are pinned; an unknown revision, or one from
    before the subject was added, is a NotFound naming the revisions there are (exit 2, before any run)."""
    ws = require_workspace(settings)
    rel = settings.subject_dir(customer, subject).relative_to(ws).as_posix()
    problem = "is not a commit of the workspace"
    try:
        commit = git(ws, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        problem = "is from before the subject's photos were added"
        git(ws, "cat-file", "-e", f"{commit}:{rel}.dvc")
        return commit
    except WorkspaceError:
        known = git(ws, "log", "-n", "5", "--format=%h", "--", f"{rel}.dvc").split() or ["none"]
        raise NotFound(
            f"revision {rev!r} of subject {customer}/{subject}",
            problem,
            f"pass one of the subject's revisions ({', '.join(known)}: `git -C {ws} log -- {rel}.dvc`), or leave --rev out",
        ) from None


def list_subjects(settings: Settings) -> list[str]:
    _settle(settings)
    root = settings.workspace / "data" / "subjects"
    return sorted(f"{p.parent.name}/{p.stem}" for p in root.glob("*/*.dvc")) if root.is_dir() else []


def checkout_subject(settings: Settings, customer: str, subject: str, rev: str | None, dest: Path) -> SubjectSnapshot:
    """Materialise the subject's photos as they were at `rev` (default: the newest) into `dest`."""
    from dvc.api import DVCFileSystem

    ws = require_workspace(settings)
    check_customer(customer)
    check_slug(subject, "subject")
    rev = rev or subject_revision(settings, customer, subject)
    rel = settings.subject_dir(customer, subject).relative_to(ws).as_posix()
    fs = DVCFileSystem(str(ws), rev=rev)
    if not fs.exists(rel):
        raise NotFound(
            f"subject {customer}/{subject} at {rev[:12]}", "has no photos at that revision", "pass a revision after `atelier subject add`"
        )
    meta = yaml.safe_load(fs.read_text(f"{rel}.yaml"))
    dvc_md5 = yaml.safe_load(fs.read_text(f"{rel}.dvc"))["outs"][0]["md5"]
    with atomic_dir(Path(dest), replace=True) as tmp:
        fs.get(rel, str(tmp / "images"), recursive=True)
        for item in (tmp / "images").iterdir():
            os.replace(item, tmp / item.name)
        (tmp / "images").rmdir()
    return SubjectSnapshot(customer, subject, meta["class_noun"], rev, dvc_md5, Path(dest), file_hashes(Path(dest)))
