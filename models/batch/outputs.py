"""Exactly-once batch outputs in a Store (local folder or S3 prefix).

Per item, the payload (`images/<id>.png`, `results/<id>.json`) is written first, then its record
`items/<id>.json` naming the payload's sha256, the model version that made it and its parameters.
Both writes are atomic (temporary name + rename locally, a single PUT on S3). An item counts as done
only when its record exists and the payload's hash matches it, so a run killed at any point and
started again redoes exactly the items that were not finished; a payload without a record (killed
between the two writes) is simply rewritten. The output manifest (sorted by id) and the run report
are written last, from the records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from atelier.kernel.objectstore import Store

RECORDS = "items/"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Progress:
    done_before: list[str] = field(default_factory=list)  # verified records from an earlier (killed or finished) run
    redone: list[str] = field(default_factory=list)  # had a record whose payload no longer verifies
    written: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # {id, error}


def load_records(store: Store) -> dict[str, dict]:
    out = {}
    for key in store.list(RECORDS):
        if key.endswith(".json"):
            try:
                record = json.loads(store.read_bytes(key))
            except ValueError:
                continue  # an unreadable record is as good as none: the item is redone
            if isinstance(record, dict) and "id" in record:
                out[record["id"]] = record
    return out


def verified(store: Store, record: dict) -> bool:
    try:
        return sha256_bytes(store.read_bytes(record["file"])) == record["sha256"]
    except Exception:  # noqa: BLE001 - missing or unreadable payload: not done
        return False


def split_done(store: Store, ids: list[str], progress: Progress) -> tuple[dict[str, dict], list[str]]:
    """Records of the items already done (verified) and the ids still to do."""
    records = load_records(store)
    done, todo = {}, []
    for item_id in ids:
        record = records.get(item_id)
        if record is not None and verified(store, record):
            done[item_id] = record
            progress.done_before.append(item_id)
        else:
            if record is not None:
                progress.redone.append(item_id)
            todo.append(item_id)
    return done, todo


def commit(store: Store, item_id: str, payload_key: str, payload: bytes, record: dict) -> dict:
    store.write_bytes(payload_key, payload)
    full = {"id": item_id, "file": payload_key, "sha256": sha256_bytes(payload), **record}
    store.write_bytes(f"{RECORDS}{item_id}.json", json.dumps(full, sort_keys=True).encode())
    return full


def finish(store: Store, manifest_key: str, records: dict[str, dict], report: dict) -> None:
    lines = "".join(json.dumps(records[k], sort_keys=True, ensure_ascii=False) + "\n" for k in sorted(records))
    store.write_bytes(manifest_key, lines.encode())
    store.write_bytes("report.json", json.dumps(report, indent=1, sort_keys=True, ensure_ascii=False).encode())
