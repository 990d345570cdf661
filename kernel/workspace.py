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
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import yaml

from atelier.kernel.errors import InvalidIdentifier, NotFound, WorkspaceError
from atelier.kernel.gitcmd import git
from atelier.kernel.gitinfo import SOURCE_ROOT
from atelier.kernel.hashing import file_hashes
from atelier.kernel.pipeline import list_subject, unlist_subject, write_launcher
from atelier.kernel.recovery import in_head, journaled, recover, settle
from atelier.kernel.settings import Settings
from atelier.kernel.storage import atomic_dir, check_customer, check_slug, file_lock, write_json_atomic, write_text_atomic

MARKER = Path(".atelier") / "workspace.json"
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
        recover(ws)
        write_launcher(ws)
        try:
            yield ws
        except LockError as exc:
            raise WorkspaceError(
                f"workspace {ws}",
                f"DVC is locked by another command ({exc})",
                "wait for the other `dvc` or `atelier` command to finish, then run this one again",
            ) from None


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
    with journaled(ws, f"subject add {customer}/{subject}", rel, tracked):
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
        if not in_head(ws, f"{rel}.dvc"):
            raise NotFound(
                f"subject {customer}/{subject}",
                f"is not in the workspace (known: {', '.join(list_subjects(settings)) or 'none'})",
                "check the names with `atelier subject list`",
            )
        with journaled(ws, f"subject remove {customer}/{subject}", rel, True):
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
    settle(settings)
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
    settle(settings)
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
