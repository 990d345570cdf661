"""The promotion ledger: an append-only, hash-chained table of every alias move and refusal.

Each row stores the hash of the row before it and its own hash over all its fields, so an edited,
inserted or deleted row breaks the chain, and a signature over that hash with the platform's key
(registry/ledger_keys.py), which the database does not hold: a row rewritten with a recomputed hash
no longer verifies. A truncated tail (the newest rows deleted, or every row) or a
chain rewritten from the edit onwards is caught by the anchor: the newest row of the whole chain, as
`seq:hash`, kept in MLflow (registry/promotion.py), a store the ledger's database users cannot write,
and in the platform's head witness file beside its signing key.

Actions: `candidate` (a version became candidate), `intent` (a champion move is about to happen),
`promote` / `rollback` / `restore` (the move happened: they confirm the intent), `abandon` (an intent
whose move never happened), `refuse` (the gate said no; the version loses candidate). `aliases()` is
what the ledger says each alias should be; `atelier ledger verify` compares it with MLflow.

SQLite by default, PostgreSQL in production; the schema is managed by Alembic (registry/migrations).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from sqlalchemy import Integer, String, Text, create_engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from atelier.kernel.errors import AtelierError
from atelier.kernel.settings import Settings
from atelier.kernel.storage import file_lock
from atelier.registry.ledger_keys import HeadWitness, LedgerKey

GENESIS = "0" * 64


class LedgerTampered(AtelierError):
    """The ledger does not match its anchor: nothing more is written onto it until someone looks."""

    exit_code = 5


HASHED_FIELDS = (
    "seq",
    "model",
    "version",
    "action",
    "from_alias",
    "to_alias",
    "replaced_version",
    "actor",
    "reason",
    "gate",
    "metrics",
    "flow_run_id",
    "created_at",
    "prev_hash",
)


class Base(DeclarativeBase):
    pass


class LedgerRow(Base):
    __tablename__ = "promotion_ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True, nullable=False)
    model: Mapped[str] = mapped_column(String(255), index=True, nullable=False)
    version: Mapped[str] = mapped_column(String(32), nullable=False)
    action: Mapped[str] = mapped_column(String(16), nullable=False)  # see CONFIRMS, and candidate | intent | abandon | refuse
    from_alias: Mapped[str | None] = mapped_column(String(64))
    to_alias: Mapped[str | None] = mapped_column(String(64))
    replaced_version: Mapped[str | None] = mapped_column(String(32))  # held to_alias before this row
    actor: Mapped[str] = mapped_column(String(255), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    gate: Mapped[str] = mapped_column(Text, nullable=False)  # JSON
    metrics: Mapped[str] = mapped_column(Text, nullable=False)  # JSON
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[str] = mapped_column(String(40), nullable=False)  # ISO 8601 UTC, hashed as text
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    row_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    signature: Mapped[str | None] = mapped_column(String(128))  # Ed25519 over row_hash (ledger_keys); not hashed itself

    def fields(self) -> dict:
        return {f: getattr(self, f) for f in HASHED_FIELDS}

    def compute_hash(self) -> str:
        blob = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"), default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def as_dict(self) -> dict:
        return {**self.fields(), "row_hash": self.row_hash}


# rows that confirm an intent: the champion alias now points at the row's version
CONFIRMS = ("promote", "rollback", "restore")


@dataclass(frozen=True)
class Problem:
    seq: int | None
    kind: str  # edited | forged | unsigned | broken_link | sequence_gap | anchor_mismatch | unanchored | alias_drift | damaged_champion
    detail: str


def head_of(rows: list[LedgerRow]) -> str | None:
    return f"{rows[-1].seq}:{rows[-1].row_hash}" if rows else None


@dataclass(frozen=True)
class Aliases:
    """What the ledger says a model's aliases are. `candidate_tracked` is False for a model whose
    candidate moves predate the ledger's `candidate` rows: its candidate alias is then not checked."""

    champion: str | None
    candidate: str | None
    candidate_tracked: bool


def aliases(rows: list[LedgerRow]) -> Aliases:
    """The aliases a model's rows (oldest first) put in place."""
    champion = candidate = None
    tracked = False
    for r in rows:
        if r.action in CONFIRMS and r.to_alias == "champion":
            champion = r.version
        elif r.action == "candidate" or (r.action == "restore" and r.to_alias == "candidate"):
            candidate, tracked = r.version, True
        elif r.action == "refuse" and candidate == r.version:
            candidate = None
        elif r.action == "restore" and r.to_alias is None:  # an alias that the ledger never put there, removed
            champion = None if r.from_alias == "champion" else champion
            candidate = None if r.from_alias == "candidate" else candidate
    return Aliases(champion, candidate, tracked)


def open_intents(rows: list[LedgerRow]) -> list[LedgerRow]:
    """Intents with no confirming or abandoning row after them (their process died mid-promotion)."""
    pending: dict[str, LedgerRow] = {}
    for r in rows:
        if r.action == "intent":
            pending[r.model] = r
        elif r.action in (*CONFIRMS, "abandon") and r.model in pending:
            del pending[r.model]
    return sorted(pending.values(), key=lambda r: r.seq)


def migrate(url: str) -> None:
    """Bring the ledger schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


class Ledger:
    """`key` signs new rows and verifies every row; `witness` records the newest row outside the database.
    Both come from the platform's keys folder (`open_ledger` in registry/ledger_keys.py's callers)."""

    def __init__(self, url: str, upgrade: bool = True, key: LedgerKey | None = None, witness: HeadWitness | None = None) -> None:
        self.url = url
        self.key = key
        self.witness = witness
        if upgrade:
            migrate(url)
        self.engine = create_engine(url, future=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine) as session:
            yield session

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """One writer at a time across processes, for a row and the anchor written after it
        (PostgreSQL: an advisory lock; SQLite: a lock file beside the database)."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT pg_advisory_lock(7410127)")  # any fixed key: the ledger's
                try:
                    yield
                finally:
                    conn.exec_driver_sql("SELECT pg_advisory_unlock(7410127)")
            return
        database = self.engine.url.database
        if not database or database == ":memory:":
            yield
            return
        with file_lock(Path(f"{database}.lock")):
            yield

    def append(
        self,
        *,
        model: str,
        version: str,
        action: str,
        actor: str,
        reason: str,
        gate: dict | None = None,
        metrics: dict | None = None,
        from_alias: str | None = None,
        to_alias: str | None = None,
        replaced_version: str | None = None,
        flow_run_id: str | None = None,
        before_commit=None,
        attempts: int = 5,
    ) -> LedgerRow:
        """Append one row. `before_commit(row)` runs inside the transaction (move the alias there):
        if it raises, nothing is written. Concurrent writers collide on the unique seq/prev_hash and retry."""
        for attempt in range(attempts):
            with self.session() as s, self._table_errors():
                last = s.scalars(select(LedgerRow).order_by(LedgerRow.seq.desc()).limit(1)).first()
                row = LedgerRow(
                    seq=(last.seq + 1) if last else 1,
                    model=model,
                    version=str(version),
                    action=action,
                    from_alias=from_alias,
                    to_alias=to_alias,
                    replaced_version=replaced_version,
                    actor=actor,
                    reason=reason,
                    gate=json.dumps(gate or {}, sort_keys=True),
                    metrics=json.dumps(metrics or {}, sort_keys=True),
                    flow_run_id=flow_run_id,
                    created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                    prev_hash=last.row_hash if last else GENESIS,
                )
                row.row_hash = row.compute_hash()
                row.signature = self.key.sign(row.row_hash) if self.key is not None else None
                s.add(row)
                try:
                    s.flush()
                except IntegrityError:
                    s.rollback()
                    if attempt == attempts - 1:
                        raise
                    continue
                if before_commit is not None:
                    before_commit(row)
                s.commit()
                s.refresh(row)
                s.expunge(row)
                if self.witness is not None:
                    self.witness.write(f"{row.seq}:{row.row_hash}")
                return row
        raise RuntimeError("unreachable")

    def rows(self, model: str | None = None) -> list[LedgerRow]:
        with self.session() as s, self._table_errors():
            query = select(LedgerRow).order_by(LedgerRow.seq)
            if model:
                query = query.where(LedgerRow.model == model)
            rows = list(s.scalars(query))
            for r in rows:
                s.expunge(r)
            return rows

    @contextmanager
    def _table_errors(self) -> Iterator[None]:
        """A ledger table that is gone is tampering (exit 5), not a crash."""
        from sqlalchemy.exc import OperationalError, ProgrammingError

        try:
            yield
        except (OperationalError, ProgrammingError) as exc:
            text = str(exc)
            if "no such table" in text or "does not exist" in text or "UndefinedTable" in text:
                from sqlalchemy.engine import make_url

                raise LedgerTampered(
                    f"promotion ledger at {make_url(self.url).render_as_string(hide_password=True)}",
                    "has no promotion_ledger table: it was dropped",
                    "restore the ledger database from a backup; nothing is promoted or verified until then",
                ) from None
            raise

    def verify(self, anchor: str | None = None, pending: str | None = None, anchored: bool = True) -> list[Problem]:
        """Check every link and hash, and the newest row against the registry's anchor (`seq:hash`;
        `pending` is the anchor of a row being written, which a crash may have left uncommitted or
        committed). `anchored=False` checks the chain alone."""
        problems: list[Problem] = []
        rows = self.rows()
        prev_hash, prev_seq = GENESIS, 0
        for row in rows:
            if row.seq != prev_seq + 1:
                problems.append(
                    Problem(row.seq, "sequence_gap", f"row {row.seq} follows row {prev_seq}: rows are missing or were inserted")
                )
            if row.prev_hash != prev_hash:
                problems.append(
                    Problem(
                        row.seq, "broken_link", f"row {row.seq} does not link to the row before it: a row was deleted, inserted or edited"
                    )
                )
            if row.compute_hash() != row.row_hash:
                problems.append(
                    Problem(
                        row.seq, "edited", f"row {row.seq} ({row.model} v{row.version} {row.action}) does not match its hash: it was edited"
                    )
                )
            elif self.key is not None and not self.key.verifies(row.row_hash, row.signature):
                problems.append(
                    Problem(
                        row.seq,
                        "forged" if row.signature else "unsigned",
                        f"row {row.seq} ({row.model} v{row.version} {row.action}) "
                        + (
                            "has a signature the platform's key did not make: it was rewritten (hash recomputed)"
                            if row.signature
                            else "is not signed: it was written outside Atelier, or predates "
                            "signatures (then `atelier audit --adopt` signs the old rows)"
                        ),
                    )
                )
            prev_hash, prev_seq = row.row_hash, row.seq
        if not anchored:
            return problems
        newest = head_of(rows)
        witnessed = self.witness_problems(rows)  # reported when the anchor did not already say it
        if anchor is None and pending is None:
            if rows:
                problems.append(
                    Problem(
                        None,
                        "unanchored",
                        f"the ledger holds {len(rows)} rows but the registry holds no anchor for it: "
                        "the anchor was removed, or this ledger was not written by this registry",
                    )
                )
        elif newest is None or newest not in {a for a in (anchor, pending) if a}:
            said = anchor or pending
            assert said is not None  # both None is the branch above
            said_seq = int(said.split(":")[0])
            what = (
                "rows were deleted from its end"
                if newest is None or said_seq > int(newest.split(":")[0])
                else "rows were added or the chain rewritten"
            )
            problems.append(
                Problem(
                    None,
                    "anchor_mismatch",
                    f"the registry's anchor says the ledger ends at row {said_seq} "
                    f"({said.split(':')[1][:12]}...), but it ends at "
                    f"{'no row at all' if newest is None else 'row ' + newest.split(':')[0]}: {what}",
                )
            )
        if not any(p.kind == "anchor_mismatch" for p in problems):
            problems += witnessed
        return problems

    def witness_problems(self, rows: list[LedgerRow]) -> list[Problem]:
        """The head witness names the newest row the platform wrote: that row must still be there, unchanged."""
        said = self.witness.read() if self.witness is not None else None
        if said is None:
            return []
        seq, _, digest = said.partition(":")
        held = next((r for r in rows if r.seq == int(seq)), None)
        if held is None:
            return [
                Problem(
                    None,
                    "anchor_mismatch",
                    f"the platform wrote row {seq} ({digest[:12]}...), but the ledger "
                    f"ends at {'row ' + str(rows[-1].seq) if rows else 'no row at all'}: "
                    "rows were deleted from its end",
                )
            ]
        if held.row_hash != digest:
            return [Problem(held.seq, "anchor_mismatch", f"row {seq} is not the row the platform wrote: the chain was rewritten")]
        return []

    def sign_unsigned(self) -> int:
        """Sign rows written before signatures (`audit --adopt`, after their chain verified); returns how many."""
        if self.key is None:
            return 0
        with self.session() as s, self._table_errors():
            unsigned = list(s.scalars(select(LedgerRow).where(LedgerRow.signature.is_(None)).order_by(LedgerRow.seq)))
            for row in unsigned:
                s.execute(update(LedgerRow).where(LedgerRow.id == row.id).values(signature=self.key.sign(row.row_hash)))
            s.commit()
        return len(unsigned)


def open_ledger(settings: Settings, upgrade: bool = True) -> Ledger:
    """The platform's ledger: its database, with the signing key and head witness from the keys folder."""
    from atelier.registry.ledger_keys import load_key

    folder = settings.resolved_ledger_keys
    url = settings.resolved_ledger_url
    return Ledger(url, upgrade=upgrade, key=load_key(folder), witness=HeadWitness(folder, url))
