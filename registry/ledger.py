"""The promotion ledger: an append-only, hash-chained table of every alias move and refusal.

Each row stores the hash of the row before it and its own hash over all its fields, so an edited,
inserted or deleted row breaks the chain. A chain rewritten from the edit onwards is caught by the
anchors: the newest row of each model is also written, as `seq:hash`, on the registered model in
MLflow (`atelier.ledger.head`), a store the ledger's database users cannot write.

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

from sqlalchemy import Integer, String, Text, create_engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

GENESIS = "0" * 64
HASHED_FIELDS = ("seq", "model", "version", "action", "from_alias", "to_alias", "replaced_version", "actor", "reason",
                 "gate", "metrics", "flow_run_id", "created_at", "prev_hash")


class Base(DeclarativeBase):
    pass


class LedgerRow(Base):
    __tablename__ = "promotion_ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True, nullable=False)
    model: Mapped[str] = mapped_column(String(255), index=True, nullable=False)
    version: Mapped[str] = mapped_column(String(32), nullable=False)
    action: Mapped[str] = mapped_column(String(16), nullable=False)  # promote | rollback | refuse
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

    def fields(self) -> dict:
        return {f: getattr(self, f) for f in HASHED_FIELDS}

    def compute_hash(self) -> str:
        blob = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"), default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def as_dict(self) -> dict:
        return {**self.fields(), "row_hash": self.row_hash}


@dataclass(frozen=True)
class Problem:
    seq: int | None
    kind: str  # edited | broken_link | sequence_gap | anchor_mismatch
    detail: str


def migrate(url: str) -> None:
    """Bring the ledger schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


class Ledger:
    def __init__(self, url: str, upgrade: bool = True) -> None:
        self.url = url
        if upgrade:
            migrate(url)
        self.engine = create_engine(url, future=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine) as session:
            yield session

    def append(self, *, model: str, version: str, action: str, actor: str, reason: str, gate: dict | None = None,
               metrics: dict | None = None, from_alias: str | None = None, to_alias: str | None = None,
               replaced_version: str | None = None, flow_run_id: str | None = None, before_commit=None,
               attempts: int = 5) -> LedgerRow:
        """Append one row. `before_commit(row)` runs inside the transaction (move the alias there):
        if it raises, nothing is written. Concurrent writers collide on the unique seq/prev_hash and retry."""
        for attempt in range(attempts):
            with self.session() as s:
                last = s.scalars(select(LedgerRow).order_by(LedgerRow.seq.desc()).limit(1)).first()
                row = LedgerRow(
                    seq=(last.seq + 1) if last else 1, model=model, version=str(version), action=action,
                    from_alias=from_alias, to_alias=to_alias, replaced_version=replaced_version, actor=actor,
                    reason=reason, gate=json.dumps(gate or {}, sort_keys=True), metrics=json.dumps(metrics or {}, sort_keys=True),
                    flow_run_id=flow_run_id, created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                    prev_hash=last.row_hash if last else GENESIS,
                )
                row.row_hash = row.compute_hash()
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
                return row
        raise RuntimeError("unreachable")

    def rows(self, model: str | None = None) -> list[LedgerRow]:
        with self.session() as s:
            query = select(LedgerRow).order_by(LedgerRow.seq)
            if model:
                query = query.where(LedgerRow.model == model)
            rows = list(s.scalars(query))
            for r in rows:
                s.expunge(r)
            return rows

    def verify(self, anchors: dict[str, str] | None = None) -> list[Problem]:
        """Check every link and hash; with `anchors` (model -> 'seq:hash'), check each model's newest row."""
        problems: list[Problem] = []
        rows = self.rows()
        prev_hash, prev_seq = GENESIS, 0
        for row in rows:
            if row.seq != prev_seq + 1:
                problems.append(Problem(row.seq, "sequence_gap", f"row {row.seq} follows row {prev_seq}: rows are missing or were inserted"))
            if row.prev_hash != prev_hash:
                problems.append(Problem(row.seq, "broken_link", f"row {row.seq} does not link to the row before it: a row was deleted, inserted or edited"))
            if row.compute_hash() != row.row_hash:
                problems.append(Problem(row.seq, "edited", f"row {row.seq} ({row.model} v{row.version} {row.action}) does not match its hash: it was edited"))
            prev_hash, prev_seq = row.row_hash, row.seq
        newest = {}
        for row in rows:
            newest[row.model] = f"{row.seq}:{row.row_hash}"
        for model, anchor in (anchors or {}).items():
            if newest.get(model) != anchor:
                problems.append(Problem(None, "anchor_mismatch",
                                        f"{model}: the registry's anchor {anchor[:20]}... is not the ledger's newest row "
                                        f"({(newest.get(model) or 'none')[:20]}...): rows were deleted or the chain rewritten"))
        return problems
