"""The ledger's anchor in MLflow: the newest row of the whole chain, where the ledger's database users
cannot write (tags on the platform's `atelier-ledger` experiment; customers cannot even read it).

Every append goes through `append()`: the new row's `seq:hash` is written as *pending* before the
row's transaction commits, then becomes the *head* once it has. A crash between the two leaves a pending
anchor that names either the newest row (it committed) or no row (it did not); both are consistent, and
`settle()` tidies them. Deleting rows cannot be hidden: the head (or pending) anchor names a row that is
then missing, and `verify` says so, however many rows went.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient

from atelier.registry.ledger import Ledger, LedgerRow, LedgerTampered, head_of

EXPERIMENT = "atelier-ledger"
HEAD_TAG, PENDING_TAG = "atelier.ledger.head", "atelier.ledger.pending"


@dataclass(frozen=True)
class Anchor:
    head: str | None
    pending: str | None


class AnchorStore:
    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self._experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(EXPERIMENT)
            self._experiment_id = (
                found.experiment_id
                if found
                else self.client.create_experiment(
                    EXPERIMENT,
                    tags={
                        "atelier.kind": "ledger-anchor",
                        "mlflow.experimentKind": "custom_model_development",
                        "mlflow.note.content": "Platform-internal, not a training experiment: the anchor of Atelier's promotion "
                        "ledger (`atelier ledger verify`). It holds no runs; customers cannot read it. Do not edit.",
                    },
                )
            )
        return self._experiment_id

    def read(self) -> Anchor:
        tags = self.client.get_experiment(self.experiment_id).tags
        return Anchor(tags.get(HEAD_TAG) or None, tags.get(PENDING_TAG) or None)

    def set_pending(self, value: str) -> None:
        self.client.set_experiment_tag(self.experiment_id, PENDING_TAG, value)

    def commit(self, value: str) -> None:
        self.client.set_experiment_tag(self.experiment_id, HEAD_TAG, value)
        self.client.set_experiment_tag(self.experiment_id, PENDING_TAG, "")

    def adopt(self, ledger: Ledger, actor: str = "atelier audit --adopt") -> str | None:
        """Take over a ledger written before anchors or signatures existed, if its chain verifies: sign its
        unsigned rows, anchor it, and say so in a row of its own."""
        anchor = self.read()
        found = ledger.verify(anchored=False)
        chain = [p for p in found if p.kind != "unsigned"]
        unsigned = [p for p in found if p.kind == "unsigned"]
        if chain or (not unsigned and (anchor.head or anchor.pending)):
            return None
        if unsigned and anchor.head and anchor.head != head_of(ledger.rows()):
            return None  # an anchored ledger whose end moved: not a migration
        signed = ledger.sign_unsigned()
        newest = head_of(ledger.rows())
        if newest:
            self.commit(newest)
            row = append(
                self.client,
                ledger,
                model="atelier-ledger",
                version="0",
                action="adopt",
                actor=actor,
                gate={},
                metrics={},
                reason=f"adopted by `atelier audit --adopt`: {signed} rows written before signatures were signed and the "
                "ledger anchored; rows before this one were verified by their hash chain only",
            )
            newest = f"{row.seq}:{row.row_hash}"
        return newest

    def settle(self, ledger: Ledger) -> None:
        """After a crash between anchoring and committing: make the head the ledger's newest row when
        that row is the pending one, else drop the pending anchor (its row never committed)."""
        anchor = self.read()
        if anchor.pending is None:
            return
        newest = head_of(ledger.rows())
        if newest == anchor.pending:
            self.commit(newest)
        elif newest == anchor.head:
            self.client.set_experiment_tag(self.experiment_id, PENDING_TAG, "")


def require_intact(store: AnchorStore, ledger: Ledger) -> None:
    """Refuse to write onto a ledger whose newest row is not the anchored one: a new row would be
    anchored in turn and hide the deletion or rewrite before it."""
    anchor, rows = store.read(), ledger.rows()
    newest = head_of(rows)
    said = {a for a in (anchor.head, anchor.pending) if a}
    if (said and newest not in said) or (not said and rows) or ledger.verify(anchored=False) or ledger.witness_problems(rows):
        raise LedgerTampered(
            "promotion ledger",
            f"does not match its anchor in the registry (its newest row is "
            f"{newest.split(':')[0] if newest else 'none'}; the anchor says {', '.join(sorted(said)) or 'nothing'})",
            "run `atelier ledger verify` to see what changed; nothing is written onto it until the ledger is "
            "restored from a backup (or, for a ledger that predates anchors, `atelier audit --adopt`)",
        )


def append(client: MlflowClient, ledger: Ledger, before_commit=None, **row) -> LedgerRow:
    """Append one ledger row with its anchor; `before_commit(row)` runs inside the transaction."""
    store = AnchorStore(client)

    def anchor_then(row_: LedgerRow) -> None:
        store.set_pending(f"{row_.seq}:{row_.row_hash}")
        if before_commit is not None:
            before_commit(row_)

    with ledger.exclusive():  # concurrent promotions: the head anchor never goes backwards
        store.settle(ledger)
        require_intact(store, ledger)
        written = ledger.append(before_commit=anchor_then, **row)
        store.commit(f"{written.seq}:{written.row_hash}")
    return written
