"""Running git in the workspace: its output, or a clear error (a full or read-only disk is a DiskError, exit 6)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from atelier.kernel.errors import DiskError, WorkspaceError

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
