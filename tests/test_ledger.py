"""The promotion ledger on SQLite and on PostgreSQL (127.0.0.1:5432): append-only, hash-chained,
and every kind of tampering detected."""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import create_engine, text

from atelier.registry.ledger import Ledger
from atelier.registry.ledger_keys import HeadWitness, load_key

PG_ADMIN = os.environ.get("ATELIER_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path):
    keys = dict(key=load_key(tmp_path / "keys"), witness=HeadWitness(tmp_path / "keys"))
    if request.param == "sqlite":
        yield Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", **keys)
        return
    name = f"atelier_ledger_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN}: {exc.__class__.__name__}")
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    led = Ledger(url, **keys)
    yield led
    led.engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def _fill(ledger: Ledger, n: int = 4):
    rows = []
    for i in range(n):
        rows.append(
            ledger.append(
                model="m",
                version=str(i + 1),
                action="promote",
                actor="ops",
                reason=f"r{i}",
                gate={"passed": True},
                metrics={"loss": 0.5},
                to_alias="champion",
                replaced_version=str(i) if i else None,
            )
        )
    return rows


def _sql(ledger: Ledger, statement: str, **params) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(text(statement), params)


def test_rows_chain_and_verify_clean(ledger):
    rows = _fill(ledger)
    assert [r.seq for r in rows] == [1, 2, 3, 4]
    assert all(b.prev_hash == a.row_hash for a, b in zip(rows, rows[1:]))
    assert ledger.verify(f"4:{rows[-1].row_hash}") == []


def test_edited_row_is_detected(ledger):
    _fill(ledger)
    _sql(ledger, "UPDATE promotion_ledger SET reason = 'nothing to see' WHERE seq = 2")
    kinds = {(p.seq, p.kind) for p in ledger.verify(anchored=False)}
    assert (2, "edited") in kinds


def test_deleted_middle_row_is_detected(ledger):
    _fill(ledger)
    _sql(ledger, "DELETE FROM promotion_ledger WHERE seq = 2")
    kinds = {p.kind for p in ledger.verify(anchored=False)}
    assert {"sequence_gap", "broken_link"} <= kinds


def test_inserted_row_is_detected(ledger):
    rows = _fill(ledger, 2)
    _sql(ledger, "UPDATE promotion_ledger SET seq = seq + 10 WHERE seq = 2")
    forged = {**rows[0].as_dict(), "seq": 2, "version": "99", "reason": "forged", "prev_hash": "e" * 64, "row_hash": "f" * 64}
    cols = ", ".join(forged)
    _sql(ledger, f"INSERT INTO promotion_ledger ({cols}) VALUES ({', '.join(':' + c for c in forged)})", **forged)
    problems = ledger.verify(anchored=False)
    assert any(p.seq == 2 and p.kind == "edited" for p in problems)
    assert any(p.kind in ("broken_link", "sequence_gap") for p in problems)


def test_deleted_newest_row_and_rewritten_chain_are_caught_by_the_anchor(ledger):
    rows = _fill(ledger)
    anchor = f"4:{rows[-1].row_hash}"
    _sql(ledger, "DELETE FROM promotion_ledger WHERE seq = 4")
    assert ledger.verify(anchored=False) == []  # the chain alone cannot see a truncated tail
    assert [p.kind for p in ledger.verify(anchor)] == ["anchor_mismatch"]
    _sql(ledger, "DELETE FROM promotion_ledger")
    assert [p.kind for p in ledger.verify(anchor)] == ["anchor_mismatch"]  # every row gone: still caught
    assert [p.kind for p in Ledger(ledger.url).verify(None)] == []  # an empty, never-anchored ledger is fine


def test_rows_without_any_anchor_are_reported(ledger):
    _fill(ledger, 2)
    assert [p.kind for p in ledger.verify(None)] == ["unanchored"]


def test_failed_side_effect_writes_nothing(ledger):
    _fill(ledger, 1)

    def alias_move_fails(row):
        raise RuntimeError("registry down")

    with pytest.raises(RuntimeError):
        ledger.append(model="m", version="9", action="promote", actor="ops", reason="x", before_commit=alias_move_fails)
    assert [r.seq for r in ledger.rows()] == [1]
    assert ledger.verify(anchored=False) == []


def test_a_rewritten_row_with_a_recomputed_hash_is_caught_by_its_signature(ledger):
    """The audit's attack: rewrite a row's actor and reason and recompute its sha256 (and the chain after it)."""
    rows = _fill(ledger, 3)
    row = ledger.rows()[1]
    row.actor, row.reason = "someone else", "nothing to see"
    new_hash = row.compute_hash()
    _sql(ledger, "UPDATE promotion_ledger SET actor = :a, reason = :r, row_hash = :h WHERE seq = 2", a=row.actor, r=row.reason, h=new_hash)
    _sql(ledger, "UPDATE promotion_ledger SET prev_hash = :h WHERE seq = 3", h=new_hash)
    third = ledger.rows()[2]
    _sql(ledger, "UPDATE promotion_ledger SET row_hash = :h WHERE seq = 3", h=third.compute_hash())
    kinds = {(p.seq, p.kind) for p in ledger.verify(f"3:{rows[-1].row_hash}")}
    assert (2, "forged") in kinds and (3, "forged") in kinds
    assert not any(kind in ("edited", "broken_link") for _, kind in kinds)  # the hashes do match: only the key tells


def test_deleting_the_newest_rows_and_replaying_an_older_anchor_is_caught_by_the_witness(ledger):
    rows = _fill(ledger, 4)
    _sql(ledger, "DELETE FROM promotion_ledger WHERE seq > 2")
    older_anchor = f"2:{rows[1].row_hash}"  # signed rows, a consistent chain, an anchor that names its end
    problems = ledger.verify(older_anchor)
    assert [p.kind for p in problems] == ["anchor_mismatch"] and "deleted from its end" in problems[0].detail


def test_a_row_signed_with_another_key_or_unsigned_is_refused(ledger, tmp_path):
    _fill(ledger, 2)
    other = load_key(tmp_path / "other-keys")
    row = ledger.rows()[1]
    _sql(ledger, "UPDATE promotion_ledger SET signature = :s WHERE seq = 2", s=other.sign(row.row_hash))
    assert [(p.seq, p.kind) for p in ledger.verify(anchored=False)] == [(2, "forged")]
    _sql(ledger, "UPDATE promotion_ledger SET signature = NULL WHERE seq = 2")
    assert [(p.seq, p.kind) for p in ledger.verify(anchored=False)] == [(2, "unsigned")]
    assert ledger.sign_unsigned() == 1 and ledger.verify(anchored=False) == []


def test_keys_are_private_and_the_verify_key_cannot_sign(tmp_path):
    from atelier.kernel.errors import ConfigError

    key = load_key(tmp_path / "k")
    assert oct((tmp_path / "k" / "ledger-signing.pem").stat().st_mode & 0o777) == "0o600"
    auditor = tmp_path / "auditor"
    auditor.mkdir()
    (auditor / "ledger-verify.pem").write_bytes(key.verify_pem)
    public = load_key(auditor, create=False)
    assert public.verifies("ab" * 32, key.sign("ab" * 32))
    with pytest.raises(ConfigError, match="signing key"):
        public.sign("ab" * 32)
    (tmp_path / "k" / "ledger-signing.pem").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_key(tmp_path / "k")
