"""Batch OCR: every image and video clip under an input Store -> one JSON result per file, exactly once
(a clip once per sampling: read again with another interval, it is another item)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

from atelier.kernel.objectstore import Store
from atelier.kernel.storage import printable
from atelier.models.batch.outputs import Progress, commit, split_done
from atelier.models.ocr.images import IMAGE_SUFFIXES
from atelier.models.video.frames import Sampling, is_video


def item_id(key: str) -> str:
    """A stable, path-safe id for an input key (keys may hold spaces, unicode, '/')."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def list_inputs(store: Store) -> list[str]:
    """The keys of images and video clips, by suffix."""
    return [k for k in store.list() if k.lower().endswith(IMAGE_SUFFIXES) or is_video(k)]


def input_id(key: str, sampling: Sampling) -> str:
    return item_id(f"{key}#{sampling.key()}") if is_video(key) else item_id(key)


def run_ocr(
    engine,
    inputs: Store,
    keys: list[str],
    out: Store,
    model: str,
    lang: str | None = None,
    kind: str = "page",
    chunk: int = 16,
    on_progress: Callable[[int, int], None] | None = None,
    sampling: Sampling | None = None,
) -> tuple[dict[str, dict], Progress]:
    """Read every key not already done; a bad image or clip gets a result with `error` (the batch goes on)."""
    from atelier.models.ocr.engine import read_documents
    from atelier.models.video.ocr import read_video

    sampling = sampling or Sampling()
    progress = Progress()
    ids = {input_id(k, sampling): k for k in keys}
    records, todo = split_done(out, list(ids), progress)
    with tempfile.TemporaryDirectory(prefix="atelier-ocr-") as tmp:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            locals_ = {i: Path(tmp) / f"{i}{Path(ids[i]).suffix.lower()}" for i in part}
            for i, local in locals_.items():
                local.write_bytes(inputs.read_bytes(ids[i]))
            stills = [i for i in part if not is_video(ids[i])]
            read = dict(zip(stills, read_documents(engine, [{"path": str(locals_[i]), "lang": lang, "kind": kind} for i in stills])))
            read.update({i: read_video(engine, locals_[i], sampling, lang) for i in part if is_video(ids[i])})
            for i in part:
                row = read[i]
                name = printable(ids[i])  # a file name that is not UTF-8 is kept escaped
                if row["error"]:  # the engine read a temporary copy: name the user's file instead
                    row["error"] = row["error"].replace(str(locals_[i]), f"{inputs.url}/{name}")
                result = {**row, "path": name, "lines": json.loads(row.get("lines", "[]")), "model": model}
                payload = json.dumps(result, ensure_ascii=False, sort_keys=True).encode()
                records[i] = commit(
                    out,
                    i,
                    f"results/{i}.json",
                    payload,
                    {"path": name, "model": model, "error": row["error"], "flagged": bool(row["flagged"])},
                )
                progress.written.append(i)
                if row["error"]:
                    progress.failed.append({"id": name, "error": row["error"]})
            for local in locals_.values():
                local.unlink(missing_ok=True)
            if on_progress:
                on_progress(len(records), len(ids))
    return records, progress
