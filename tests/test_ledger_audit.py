"""The ledger as the truth about aliases, against a real MLflow registry (SQLite): a kill -9 at every step
of a promotion leaves nothing unexplained, deleting rows (the newest, the only one of a model, all of
them) is caught by the chain's anchor, aliases moved with the MLflow client are reported and restored,
and a refused version loses `candidate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from mlflow import MlflowClient
from sqlalchemy import text

from atelier.kernel.settings import GateRules
from atelier.registry.audit import alias_drift, reconcile, restore, verify_all
from atelier.registry.ledger import Ledger
from atelier.registry.promotion import current_alias, promote, record_candidate

GOOD = {
    "steps": 60,
    "loss_finite": True,
    "final_loss": 0.5,
    "first_loss": 1.0,
    "sample_count": 4,
    "min_sample_std": 0.2,
    "blank_samples": 0,
    "distinct_share": 1.0,
}
BAD = {**GOOD, "final_loss": 99.0}
NAME = "dreambooth-acme-robot"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    client.create_registered_model(NAME, tags={"atelier.kind": "dreambooth", "atelier.customer": "acme"})
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    return client, ledger, uri, tmp_path


def _version(client, ledger, summary=GOOD) -> str:
    mv = client.create_model_version(NAME, "file:///nowhere", tags={"atelier.eval.summary": json.dumps(summary)})
    record_candidate(client, ledger, NAME, str(mv.version), actor="ops")
    return str(mv.version)


def _promote(client, ledger, version):
    return promote(client, ledger, NAME, version, actor="ops", reason="test", rules=GateRules())


def _problems(client, ledger) -> list[str]:
    return [p.kind for p in verify_all(client, ledger)[1]]


def test_promotions_refusals_and_candidates_verify_clean_and_a_refused_version_loses_candidate(registry):
    client, ledger, _, _ = registry
    assert _promote(client, ledger, _version(client, ledger)).passed
    bad = _version(client, ledger, BAD)
    assert current_alias(client, NAME, "candidate") == bad
    refused = _promote(client, ledger, bad)
    assert not refused.passed and current_alias(client, NAME) == "1"
    assert current_alias(client, NAME, "candidate") is None  # refused: nobody's candidate any more
    assert "atelier.refused" in client.get_model_version(NAME, bad).tags
    assert [r.action for r in ledger.rows()] == ["candidate", "intent", "promote", "candidate", "refuse"]
    assert _problems(client, ledger) == []
    # promoting it again, and the champion again, decides nothing new: the ledger is unchanged
    again = _promote(client, ledger, bad)
    assert not again.passed and again.reasons == refused.reasons and again.row.seq == refused.row.seq
    assert _promote(client, ledger, "1").passed and len(ledger.rows()) == 5
    # the same version against another champion is a new decision, and is written
    third = _version(client, ledger)
    assert _promote(client, ledger, third).passed
    assert not _promote(client, ledger, bad).passed and [r.action for r in ledger.rows()][-1] == "refuse"
    assert ledger.rows()[-1].replaced_version == third


@pytest.mark.parametrize("delete", ["newest row", "the model's only row", "every row"])
def test_deleted_rows_are_caught_by_the_chain_anchor(registry, delete):
    client, ledger, _, _ = registry
    if delete == "the model's only row":
        client.create_registered_model("ocr", tags={"atelier.kind": "ocr"})
        mv = client.create_model_version("ocr", "file:///nowhere")
        _promote(client, ledger, _version(client, ledger))
        record_candidate(client, ledger, "ocr", str(mv.version), actor="ops")  # the newest row, ocr's only one
        statement = "DELETE FROM promotion_ledger WHERE model = 'ocr'"
    else:
        _promote(client, ledger, _version(client, ledger))
        statement = {
            "newest row": "DELETE FROM promotion_ledger WHERE seq = (SELECT max(seq) FROM promotion_ledger)",
            "every row": "DELETE FROM promotion_ledger",
        }[delete]
    assert _problems(client, ledger) == []
    with ledger.engine.begin() as conn:
        conn.execute(text(statement))
    assert "anchor_mismatch" in _problems(client, ledger)
    from atelier.registry.ledger import LedgerTampered

    with pytest.raises(LedgerTampered, match="does not match its anchor"):  # and nothing is written over the gap
        _promote(client, ledger, "1")


def test_alias_moves_through_the_mlflow_client_are_reported_and_restored(registry):
    client, ledger, _, _ = registry
    v1 = _version(client, ledger)
    _promote(client, ledger, v1)
    v2 = _version(client, ledger, BAD)
    _promote(client, ledger, v2)  # refused
    client.set_registered_model_alias(NAME, "champion", v2)  # the UI's alias editor, around the gate
    drift = alias_drift(client, ledger)
    assert len(drift) == 1 and f"{NAME}@champion is version {v2} in MLflow, but the ledger says version {v1}" in drift[0].detail
    assert "atelier audit --restore" in drift[0].detail
    assert restore(client, ledger, "auditor") == [f"{NAME}@champion -> {v1}"]
    assert current_alias(client, NAME) == v1 and _problems(client, ledger) == []
    client.delete_registered_model_alias(NAME, "champion")  # deleting it is drift too
    assert _problems(client, ledger) == ["alias_drift"]
    client.set_registered_model_alias(NAME, "candidate", v1)  # and so is a candidate the ledger never set
    assert _problems(client, ledger) == ["alias_drift", "alias_drift"]


CRASH = """
import os, sys
from mlflow import MlflowClient
import atelier.registry.ledger_anchor as anchor
from atelier.kernel.settings import GateRules
from atelier.registry.ledger import Ledger
from atelier.registry.promotion import promote

step = sys.argv[1]
client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
real_set_alias, real_append, real_commit = client.set_registered_model_alias, anchor.Ledger.append, anchor.AnchorStore.commit

def set_alias(name, alias, version):
    if step == "before alias move":
        os._exit(137)
    real_set_alias(name, alias, version)
    if step == "after alias move":
        os._exit(137)

def append(self, **row):
    written = real_append(self, **row)
    if step == "after confirm row, before anchor" and row["action"] == "promote":
        os._exit(137)
    return written

client.set_registered_model_alias = set_alias
anchor.Ledger.append = append
promote(client, Ledger(os.environ["LEDGER"]), "dreambooth-acme-robot", sys.argv[2], actor="ops", reason="r", rules=GateRules())
"""


@pytest.mark.parametrize(
    "step,champion", [("before alias move", "1"), ("after alias move", "2"), ("after confirm row, before anchor", "2")]
)
def test_a_kill_at_each_promotion_step_leaves_the_ledger_explaining_the_champion(registry, step, champion):
    client, ledger, uri, tmp = registry
    _promote(client, ledger, _version(client, ledger))
    v2 = _version(client, ledger)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH), step, v2],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "LEDGER": str(ledger.url)},
    )
    assert done.returncode == 137, done.stderr[-2000:]
    assert current_alias(client, NAME) == champion
    settled, problems = verify_all(client, ledger)  # the next run settles what the kill left, either way
    assert problems == []
    rows = ledger.rows(NAME)
    if step == "before alias move":
        assert rows[-1].action == "abandon" and "before moving the alias" in rows[-1].reason
    elif step == "after alias move":
        assert rows[-1].action == "promote" and rows[-1].reason.startswith("confirmed by reconciliation")
    else:
        assert settled == [] and rows[-1].action == "promote"
    assert reconcile(client, ledger) == []  # settled once


def test_a_ledger_written_before_signatures_is_adopted_with_a_row_that_says_so(registry):
    """Rows from before signatures are refused by a signed ledger (exit 5: not signed) until `audit --adopt`
    signs them, once their chain verifies, and appends an `adopt` row; after that every row verifies."""
    from atelier.registry.ledger import Ledger, LedgerTampered
    from atelier.registry.ledger_anchor import AnchorStore, require_intact
    from atelier.registry.ledger_keys import HeadWitness, load_key

    client, old, _, tmp_path = registry
    _promote(client, old, _version(client, old))
    signed = Ledger(old.url, key=load_key(tmp_path / "keys"), witness=HeadWitness(tmp_path / "keys"))
    anchor = AnchorStore(client).read()
    assert {p.kind for p in signed.verify(anchor.head, anchor.pending)} == {"unsigned"}
    with pytest.raises(LedgerTampered):
        require_intact(AnchorStore(client), signed)
    head = AnchorStore(client).adopt(signed, actor="ops")
    rows = signed.rows()
    assert head == f"{rows[-1].seq}:{rows[-1].row_hash}" and rows[-1].action == "adopt" and "signed" in rows[-1].reason
    anchor = AnchorStore(client).read()
    assert signed.verify(anchor.head, anchor.pending) == []
    _promote(client, signed, _version(client, signed))  # and the ledger takes new rows again


def test_a_worse_challenger_stays_candidate_and_a_close_one_becomes_champion(registry):
    """Champion/challenger: v2's final loss is 60% over the champion's (the issue's 1.03 against 0.79 is 30%):
    refused, with the comparison in its gate and ledger row; v3 within 10% is promoted. The first version has
    no champion to beat."""
    client, ledger, _, _ = registry
    v1 = _version(client, ledger)
    assert _promote(client, ledger, v1).passed
    v2 = _version(client, ledger, {**GOOD, "final_loss": 0.8})
    refused = _promote(client, ledger, v2)
    assert not refused.passed and any("champion's (v1)" in r for r in refused.reasons)
    assert current_alias(client, NAME) == v1
    row = ledger.rows(NAME)[-1]
    assert row.action == "refuse" and "gate.challenger.final_loss" in row.gate
    v3 = _version(client, ledger, {**GOOD, "final_loss": 0.54})
    assert _promote(client, ledger, v3).passed and current_alias(client, NAME) == v3


def test_a_rollback_of_a_rollback_never_brings_back_the_rolled_back_version(registry):
    from atelier.kernel.errors import NotFound
    from atelier.registry.promotion import rollback

    client, ledger, _, _ = registry
    v1, v2 = _version(client, ledger), None
    _promote(client, ledger, v1)
    v2 = _version(client, ledger)
    _promote(client, ledger, v2)
    assert rollback(client, ledger, NAME, actor="ops", reason="colour drift", rules=GateRules()).version == v1
    with pytest.raises(NotFound, match="--to"):  # v2 was rolled back: not a rollback target
        rollback(client, ledger, NAME, actor="ops", reason="again", rules=GateRules())
    assert current_alias(client, NAME) == v1
    assert rollback(client, ledger, NAME, actor="ops", reason="fixed upstream", rules=GateRules(), to=v2).version == v2
    rows = ledger.rows(NAME)
    assert _promote(client, ledger, v2).row.seq == rows[-1].seq and len(ledger.rows(NAME)) == len(rows)  # already champion: no rows


def test_a_damaged_version_never_becomes_champion(registry):
    """promote and rollback refuse (exit 5) a version marked damaged, and one whose stored files no longer
    match its signed manifest's list; the champion and the ledger stay as they were."""
    from atelier.registry.model_files import DAMAGED_TAG, MANIFEST, MANIFEST_TAG, ModelTampered, manifest_hash, manifest_of
    from atelier.registry.promotion import rollback

    client, ledger, _, tmp_path = registry
    assert _promote(client, ledger, _version(client, ledger)).passed
    # v2: a version with stored files and a signed manifest, as registration makes them
    folder = tmp_path / "model"
    (folder / "artifacts").mkdir(parents=True)
    (folder / "MLmodel").write_text("flavors: {}\n")
    (folder / "artifacts" / "unet.bin").write_bytes(b"weights")
    manifest = manifest_of(folder)
    experiment = client.create_experiment("atelier-acme", artifact_location=str(tmp_path / "store"))
    run = client.create_run(experiment).info.run_id
    client.log_artifacts(run, str(folder), "model")
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    client.log_artifact(run, str(tmp_path / MANIFEST))
    mv = client.create_model_version(
        NAME,
        f"{client.get_run(run).info.artifact_uri}/model",
        run_id=run,
        tags={"atelier.eval.summary": json.dumps(GOOD), MANIFEST_TAG: manifest_hash(manifest)},
    )
    record_candidate(client, ledger, NAME, str(mv.version), actor="ops", manifest_sha256=manifest_hash(manifest))
    assert _promote(client, ledger, str(mv.version)).passed  # whole: it is promoted
    assert _problems(client, ledger) == []
    stored = next((tmp_path / "store").rglob("unet.bin"))
    stored.unlink()  # someone deleted the weights of the champion, v2, from the artifact store
    assert _problems(client, ledger) == ["damaged_champion"]  # `ledger verify` says so (exit 5)
    assert _promote(client, ledger, _version(client, ledger)).passed  # v3 replaces it
    assert _problems(client, ledger) == []
    rows = len(ledger.rows())

    for attempt in (
        lambda: _promote(client, ledger, str(mv.version)),
        lambda: rollback(client, ledger, NAME, actor="ops", reason="test", rules=GateRules()),
    ):
        with pytest.raises(ModelTampered, match="no longer stored \\(first: artifacts/unet.bin\\)") as err:
            attempt()
        assert err.value.exit_code == 5
    assert current_alias(client, NAME) == "3" and len(ledger.rows()) == rows

    client.set_model_version_tag(NAME, "1", DAMAGED_TAG, "1 stored file(s) missing")  # marked by a rerun that found it broken
    with pytest.raises(ModelTampered, match="is marked damaged"):
        rollback(client, ledger, NAME, actor="ops", reason="test", rules=GateRules(), to="1")
    assert current_alias(client, NAME) == "3" and len(ledger.rows()) == rows
