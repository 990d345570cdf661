"""The DVC stages the workspace runs and commits: the finetune stage's lock (`commit_stage`, after the
flow ran it), `dvc repro` of a stage (`reproduce_stage`), and folders tracked outside a stage
(`track_folder`, the OCR document sets). Each change happens under the workspace lock."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import yaml

from atelier.kernel.errors import ConfigError
from atelier.kernel.gitinfo import SOURCE_ROOT
from atelier.kernel.pipeline import SUBJECTS_FILE
from atelier.kernel.settings import Settings
from atelier.kernel.workspace import TEMPLATES, changing_workspace, git, push_to_remote


def commit_stage(settings: Settings, stage: str, message: str) -> str:
    """`dvc commit STAGE`: record in dvc.lock the deps and outs of a stage whose command was run
    outside `dvc repro` (the demo runs the fine-tune flow itself), and commit dvc.lock."""
    from dvc.repo import Repo

    with changing_workspace(settings) as ws:
        _require_stage(ws, stage)
        with contextlib.chdir(ws), Repo(str(ws)) as repo:
            repo.commit(stage, force=True)
        return _commit_lock(ws, message)


def documents_dir(settings: Settings) -> Path:
    return settings.workspace / "data" / "documents"


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _require_stage(ws: Path, stage: str) -> None:
    """A workspace made before a stage (or a subject's entry in subjects.yaml) existed gets a clear error."""
    name, _, item = stage.partition("@")
    missing = name not in (yaml.safe_load((ws / "dvc.yaml").read_text()) or {}).get("stages", {})
    if not missing and name == "finetune":
        listed = (yaml.safe_load((ws / SUBJECTS_FILE).read_text()) or {}) if (ws / SUBJECTS_FILE).is_file() else {}
        missing = item not in (listed.get("subjects") or {})
    if missing:
        raise ConfigError(
            f"{ws / 'dvc.yaml'}",
            f"has no {stage!r} stage (the workspace predates it)",
            f"copy {', '.join(TEMPLATES)} from {SOURCE_ROOT} into the workspace, list the subject in "
            f"{SUBJECTS_FILE} (`atelier subject add --replace` does it) and commit them",
        )


def reproduce_stage(settings: Settings, stage: str, message: str) -> str:
    """`dvc repro STAGE` in the workspace, its outputs pushed to the remote and dvc.lock committed;
    returns the commit that pins them. A workspace made before the stage existed gets a clear error."""
    from dvc.repo import Repo

    with changing_workspace(settings) as ws:
        _require_stage(ws, stage)
        # a workspace made before .atelier/bin/atelier runs a bare `atelier ...`: the interpreter's own
        # bin directory goes first on PATH, so it is found in a virtual environment that is not activated
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        with contextlib.chdir(ws), _env(PATH=path), Repo(str(ws)) as repo:
            repo.reproduce(stage)
            push_to_remote(settings, repo)
        return _commit_lock(ws, message)


def _commit_lock(ws: Path, message: str) -> str:
    """Commit dvc.lock with what a stage left for git (its outputs' .gitignore files, the finetune
    records in models/, which are git-tracked outs); returns the commit that pins them."""
    git(
        ws,
        "add",
        "dvc.lock",
        *[
            p
            for p in ("data/documents/.gitignore", "data/class-priors/.gitignore", "data/.gitignore", ".gitignore", "models")
            if (ws / p).exists()
        ],
    )
    if git(ws, "diff", "--cached", "--name-only"):
        git(ws, "commit", "-q", "-m", message)
    return git(ws, "log", "-n", "1", "--format=%H", "--", "dvc.lock")


def track_folder(settings: Settings, folder: Path, message: str) -> str:
    """Track a data folder of the workspace with DVC (cache + remote) and commit its .dvc file; returns
    the commit. Used for document sets; subjects go through add_subject's checks."""
    from dvc.repo import Repo

    with changing_workspace(settings) as ws:
        rel = Path(folder).resolve().relative_to(ws.resolve()).as_posix()
        with contextlib.chdir(ws), Repo(str(ws)) as repo:
            repo.add(rel)
            push_to_remote(settings, repo)
        git(ws, "add", f"{rel}.dvc", str(Path(rel).parent / ".gitignore"))
        if git(ws, "status", "--porcelain", "--", f"{rel}.dvc"):
            git(ws, "commit", "-q", "-m", message)
        return git(ws, "log", "-n", "1", "--format=%H", "--", f"{rel}.dvc")
