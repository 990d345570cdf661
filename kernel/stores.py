"""The embedded default's SQLite stores (MLflow's registry, the promotion ledger, Prefect's run history),
checked before a command uses them.

A library that opens an empty or foreign file either recreates it silently (an empty registry: "model
not in the registry", exit 0) or fails deep inside with "file is not a database" (exit 1, a bug as far
as the user can tell). Atelier never recreates a store that exists: an empty, foreign or unreadable one
is exit 6 naming the file and how to restore it, before anything runs."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from atelier.kernel.errors import DiskError
from atelier.kernel.settings import Settings

SQLITE_HEADER = b"SQLite format 3\x00"
FRESH_SECONDS = 30  # an empty file younger than this may be one another command is creating


class StoreDamaged(DiskError):
    """A store's file is empty, foreign or unreadable (exit 6, like the disk under it failing)."""


@dataclass(frozen=True)
class Store:
    what: str
    path: Path
    table: str  # a table the store always has once its owner created it
    fix: str


def sqlite_file(url: str) -> Path | None:
    """The file of a `sqlite:///PATH` URL; None for another database."""
    prefix = "sqlite:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


def local_stores(settings: Settings) -> list[Store]:
    """The stores of this workspace that are SQLite files (none of them on the stack's PostgreSQL)."""
    restore = "restore it from a backup of the workspace's .atelier folder (Atelier never recreates it"
    found = [
        (
            "MLflow's registry database",
            sqlite_file(settings.resolved_tracking_uri),
            "registered_models",
            f"{restore}: every registered model and run is in it)",
        ),
        (
            "the promotion ledger",
            sqlite_file(settings.resolved_ledger_url),
            "promotion_ledger",
            f"{restore}: it is the record of every promotion; `atelier ledger verify` checks the restored copy)",
        ),
        (
            "Prefect's run history",
            settings.prefect_home / "prefect.db",
            "flow_run",
            "restore it from a backup, or move it away to start an empty run history (models and the ledger are not in it)",
        ),
    ]
    return [Store(what, path, table, fix) for what, path, table, fix in found if path is not None]


def check_store(store: Store) -> None:
    path = store.path
    if not path.exists():
        return  # made on first use
    if not path.is_file():
        raise StoreDamaged(str(path), f"{store.what} is not a regular file", store.fix)
    with open(path, "rb") as handle:
        head = handle.read(len(SQLITE_HEADER))
    if not head:
        if time.time() - path.stat().st_mtime < FRESH_SECONDS:
            return  # another command is creating it this very moment (SQLite writes its header with the first table)
        raise StoreDamaged(str(path), f"{store.what} is empty (0 bytes): it was truncated", store.fix)
    if head != SQLITE_HEADER:
        raise StoreDamaged(str(path), f"{store.what} is not a SQLite database (it starts with {head[:8]!r})", store.fix)
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StoreDamaged(str(path), f"{store.what} cannot be read ({exc})", store.fix) from None
    if tables and not tables & {store.table, "alembic_version"}:  # a store being migrated has alembic_version first
        raise StoreDamaged(str(path), f"{store.what} is another program's database (it has no {store.table} table)", store.fix)
    if not tables and path.stat().st_size > 8192:
        raise StoreDamaged(str(path), f"{store.what} has lost its tables", store.fix)


def check_local_stores(settings: Settings) -> None:
    """Exit 6 naming the file for an empty, foreign or unreadable store of this workspace."""
    for store in local_stores(settings):
        check_store(store)
