"""Which code made a thing: the git SHA of Atelier's checkout and whether it had local changes."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import atelier

SOURCE_ROOT = Path(atelier.__file__).resolve().parents[1]


@dataclass(frozen=True)
class CodeVersion:
    git_sha: str
    dirty: bool | None
    package_version: str


def _git(args: list[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


# an image has no .git: `make images` writes the commit it was built from here (docker/Dockerfile)
BUILT_FROM = SOURCE_ROOT / ".source-commit.json"


def code_version() -> CodeVersion:
    try:
        sha = _git(["rev-parse", "HEAD"], SOURCE_ROOT)
        dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], SOURCE_ROOT))
    except (subprocess.CalledProcessError, FileNotFoundError):
        try:
            built = json.loads(BUILT_FROM.read_text())
            return CodeVersion(str(built["git_sha"]), bool(built["dirty"]), atelier.__version__)
        except (OSError, ValueError, KeyError, TypeError):
            return CodeVersion("unknown", None, atelier.__version__)
    return CodeVersion(sha, dirty, atelier.__version__)
