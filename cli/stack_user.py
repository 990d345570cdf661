"""Who `atelier up`'s servers run as, and where they keep their state.

Run by an ordinary user, the servers run as that user, their state under `.atelier/stack/`. Run as root,
they do not: `atelier up` creates a system user (`stack.service_user`, default `atelier`: no login
shell, no home of its own) and starts SeaweedFS, the Prefect server and the MLflow server as that user,
with their state under `/var/lib/atelier/stacks/<prefix>-<id>/` (0700, owned by it). A server that is
broken into then holds that user's rights: its own data, not root's files, the workspace or the
operator's secrets (the stack's secrets.json, records and logs stay root's, 0600, under `.atelier/stack/`).

The worker stays the operator's: its flow runs commit to the workspace (git, DVC), which is the
operator's, and it holds only the worker's MLflow identity.

A server runs as the service user when that user can read what the server runs: SeaweedFS is one Go
binary in the environment's bin/; the Prefect and MLflow servers need the Python interpreter, the
virtual environment and this checkout. When a folder on the way is private (an interpreter under
/root/.pyenv, say), that server runs as root and `atelier up` says which folder and how to fix it,
rather than failing to start. `ATELIER_STACK__SERVICE_USER=''` keeps every server root's."""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from atelier.kernel.errors import ConfigError
from atelier.kernel.settings import Settings

SERVICE_HOMES = Path("/var/lib/atelier/stacks")


@dataclass(frozen=True)
class ServiceAccount:
    """The user the stack's servers run as. `user` None: the user running `atelier up` (not root, or
    root because the service user could not be used: `why`)."""

    user: str | None
    uid: int
    gid: int
    home: Path  # the servers' state: SeaweedFS's data and configuration, Prefect's home, MLflow's files
    why: str = ""

    def describe(self) -> str:
        if self.user is not None:
            return f"{self.user} (uid {self.uid})"
        name = pwd.getpwuid(self.uid).pw_name if _known_uid(self.uid) else str(self.uid)
        return f"{name}{f' ({self.why})' if self.why else ''}"

    def popen_args(self) -> dict:
        """subprocess.Popen's arguments that start a process as this account (none when it is us)."""
        if self.user is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def environment(self) -> dict[str, str]:
        """HOME and the user's name for its processes: nothing of theirs lands in root's home."""
        if self.user is None:
            return {}
        return {"HOME": str(self.home), "USER": self.user, "LOGNAME": self.user}


def _known_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def stack_dir(settings: Settings) -> Path:
    """The operator's stack folder, `.atelier/stack/`: records, logs, secrets (and, run by anyone but root,
    the servers' state)."""
    return settings.state_dir / "stack"


def _system_home(settings: Settings) -> Path:
    """The servers' state folder when they run as the service user: one per stack (its prefix and
    where its workspace is), so two workspaces on one machine never share data."""
    ident = hashlib.sha256(str(stack_dir(settings).resolve()).encode()).hexdigest()[:10]
    return SERVICE_HOMES / f"{settings.stack.database_prefix}-{ident}"


def _create_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    done = subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
    )
    try:
        return pwd.getpwnam(name)  # another `atelier up` may have created it meanwhile (useradd then exits 9)
    except KeyError:
        raise ConfigError(
            f"system user {name!r}",
            f"could not be created: {(done.stderr or done.stdout).strip() or 'useradd failed'}",
            f"create it (useradd --system {name}), or run the servers as root with ATELIER_STACK__SERVICE_USER=''",
        ) from None


def unreadable_by(path: Path, uid: int, gid: int) -> Path | None:
    """The first folder on the way to `path` (or `path` itself) that `uid` cannot pass or read, by mode
    bits; None when it can read `path`."""
    path = path.resolve()
    for part in [*reversed(path.parents), path]:
        st = part.stat()
        if st.st_uid == uid:
            bits = stat.S_IRUSR | (stat.S_IXUSR if stat.S_ISDIR(st.st_mode) else 0)
        elif st.st_gid == gid:
            bits = stat.S_IRGRP | (stat.S_IXGRP if stat.S_ISDIR(st.st_mode) else 0)
        else:
            bits = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else 0)
        needed = bits if part == path else bits & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        if st.st_mode & needed != needed:
            return part
    return None


def python_paths() -> list[Path]:
    """What a Python server reads to start: the interpreter, the environment's packages, this checkout."""
    import atelier

    return [Path(sys.executable), Path(sys.prefix), *(Path(p) for p in atelier.__path__)]


def service_account(settings: Settings, needs: Sequence[Path] = (), create: bool = False) -> ServiceAccount:
    """Who a server that reads `needs` to start runs as on this machine, now (with no `needs`: where
    the servers keep their state). `create`: make the system user if it is missing (only `atelier up`
    does; everything else just asks)."""
    if os.geteuid() != 0:
        return ServiceAccount(None, os.geteuid(), os.getegid(), stack_dir(settings))
    name = settings.stack.service_user
    if not name:
        return ServiceAccount(None, 0, 0, stack_dir(settings), "ATELIER_STACK__SERVICE_USER is empty")
    if create:
        entry = _create_system_user(name)
    else:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return ServiceAccount(None, 0, 0, stack_dir(settings), f"no user {name!r} yet")
    if entry.pw_uid == 0:
        raise ConfigError(
            f"ATELIER_STACK__SERVICE_USER={name}", "is root", "name an unprivileged user, or leave it unset (default atelier)"
        )
    home = _system_home(settings)
    for path in needs:
        blocked = unreadable_by(path, entry.pw_uid, entry.pw_gid) if path.exists() else None
        if blocked is not None:
            why = f"user {name} cannot read {blocked} on the way to {path}: install Python and Atelier where it can (e.g. under /opt)"
            return ServiceAccount(None, 0, 0, home, why)
    return ServiceAccount(name, entry.pw_uid, entry.pw_gid, home)


def hand_over(path: Path, account: ServiceAccount) -> None:
    """`path` (and, a folder, everything in it) private to `account`: folders 0700, files 0600, owned by it
    (volumes written by an earlier start with a wider umask, or files root just wrote, say)."""
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_symlink():
            continue
        os.chmod(item, 0o700 if item.is_dir() else 0o600)
        if account.user is not None:
            os.chown(item, account.uid, account.gid)


def prepare_home(settings: Settings, account: ServiceAccount) -> Path:
    """The servers' state folder, made and owned by `account`. State an earlier `atelier up` kept under
    `.atelier/stack/` (before the servers had a user of their own) moves there once: nothing is lost."""
    home = account.home
    if account.user is not None:
        home.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(home.parent, 0o711)  # passable, not listable by anyone but root
        home.mkdir(mode=0o700, exist_ok=True)
        for name in ("s3", "prefect-server"):
            old, new = stack_dir(settings) / name, home / name
            if old.is_dir() and not new.exists():
                old.rename(new) if old.stat().st_dev == home.stat().st_dev else _move(old, new)
        hand_over(home, account)
    else:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return home


def _move(old: Path, new: Path) -> None:
    import shutil

    tmp = new.with_name(new.name + ".moving")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(old, tmp, symlinks=True)
    tmp.rename(new)  # complete before the old copy goes
    shutil.rmtree(old)
