"""Safe names and atomic writes: nothing already stored is lost or half-written."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from atelier.kernel.errors import InvalidIdentifier

SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_slug(value: str, what: str) -> str:
    """Customer and subject ids: lower-case letters, digits, '-' and '_', no separators or dots."""
    if not SLUG.fullmatch(value or ""):
        raise InvalidIdentifier(
            f"{what} {value!r}",
            "is not a valid id",
            "use 1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit (no '/', '.', spaces)",
        )
    return value


# Names the platform uses for itself: its MLflow users and experiments (`atelier-ops`, `atelier-ledger`), its S3
# identities (`atelier-platform`), and words an operator would read as the platform's. A customer with one of them
# would collide with (or pass for) a platform object: `ledger`'s experiment would be `atelier-ledger`, the anchor's.
RESERVED_CUSTOMERS = frozenset(
    {
        "admin",
        "administrator",
        "root",
        "ledger",
        "platform",
        "system",
        "ops",
        "operator",
        "default",
        "mlflow",
        "prefect",
        "worker",
        "seaweedfs",
        "s3",
        "dvc",
        "anonymous",
        "guest",
        "public",
        "everyone",
        "all",
        "none",
        "null",
    }
)
RESERVED_PREFIXES = ("atelier",)


def check_customer(value: str) -> str:
    """A customer id: a slug (check_slug) that is not one of the platform's own names."""
    check_slug(value, "customer")
    if value in RESERVED_CUSTOMERS or value.startswith(RESERVED_PREFIXES):
        raise InvalidIdentifier(
            f"customer {value!r}",
            "is a name the platform reserves for itself (its users, experiments and keys are named this way)",
            f"choose another customer id, e.g. {value.removeprefix('atelier').strip('-_') or 'acme'}-co",
        )
    return value


def write_bytes_atomic(path: Path, data: bytes, mode: int | None = None) -> Path:
    """Write to a temporary sibling, then rename. With `mode` (e.g. 0o600 for secrets) the file has
    that mode from its creation on, so no reader ever sees it with wider permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # created 0600
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        else:  # mkstemp's 0600 would make ordinary files private: use the umask like open() does
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_secret_file(path: Path, text: str) -> Path:
    """A file only its owner reads (0600): stack secrets, server configs that hold passwords."""
    return write_bytes_atomic(path, text.encode("utf-8"), mode=0o600)


def write_json_atomic(path: Path, value: Any) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def _sweep_dead_temporaries(final: Path) -> None:
    """Temporary siblings of `final` left by a process that was killed (its pid is in the name)."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        match = re.match(r"^\d+", stale.name[len(f".{final.name}.tmp-") :])
        if match is None:
            continue
        try:
            os.kill(int(match.group()), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


@contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it becomes `final` in one rename.

    On error the temporary directory is removed and `final` is untouched. With `replace`, an
    existing `final` is swapped out only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_temporaries(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} already exists")
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def output_folder(path: Path, option: str = "--out") -> Path:
    """A folder a command will write into, checked before any work: an existing file (or a file where a
    parent folder should be) is refused, never replaced by a folder or written through."""
    from atelier.kernel.errors import ConfigError

    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                raise ConfigError(f"{option} {path}", f"{part} is a file, not a folder", "name a folder (new or existing) for the output")
            break
    return path


@contextmanager
def file_lock(path: Path, on_wait=None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block. The kernel drops it when
    the process ends, so a kill -9 never leaves a stale lock. `on_wait()` is called once if another
    process holds it, before this one waits its turn."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def printable(text: str) -> str:
    """`text` safe to print or write as UTF-8: a file name's bytes that are not UTF-8 (held by Python as
    surrogates) come out escaped, `\\xff`, instead of failing with UnicodeEncodeError."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
