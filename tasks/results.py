"""Prefect task results as JSON that can name only a short list of types: never a pickle.

Prefect's default serializer is cloudpickle, and its JSON serializer imports whatever class a stored
result names (`"__class__": "some.module.Thing"`). Results live in a shared store (S3 on the stack), so
either would run code that somebody wrote there. This serializer writes the same JSON as Prefect's, and
on reading accepts only plain JSON, the standard value types below and classes of Atelier's own
packages; anything else is refused with the name it carried. `PREFECT_RESULTS_DEFAULT_SERIALIZER=
atelier-json` (set by the settings) makes it the default; importing this module registers it.

A stored result record also names the serializer to read it with (its metadata), and Prefect obeys
it: a planted record saying `pickle`, or JSON with another `jsonlib` or `object_decoder`, would run
code. So `guard_result_records()` (called on import) makes Prefect refuse any record whose serializer
is not exactly this one, before anything in it is decoded. The store itself is writable only by the
platform's identity on the stack; this is the second lock.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from prefect.serializers import JSONSerializer, prefect_json_object_decoder

from atelier.errors import AtelierError

# What a stored result may name: our own packages and value types with no behaviour on construction.
ALLOWED_MODULES = ("atelier.", "models.", "registry.", "tasks.", "flows.")
ALLOWED_CLASSES = frozenset({
    "pathlib.Path", "pathlib.PosixPath", "pathlib.PurePosixPath", "datetime.datetime", "datetime.date",
    "datetime.timedelta", "uuid.UUID", "decimal.Decimal", "builtins.set", "builtins.frozenset", "builtins.tuple",
    "builtins.bytes", "builtins.complex",
})


class UnsafeResult(AtelierError):
    """A stored task result that Atelier did not write (a type or serializer outside the allowlist):
    tampering with the result store. Exit code 5, like a tampered ledger."""

    exit_code = 5

    def __init__(self, problem: str) -> None:
        super().__init__("stored task result", problem, "check who can write to the result store (PREFECT_RESULTS / "
                         "the prefect-results/ prefix); remove the object and rerun with --refresh to recompute it")
        # Prefect treats an unreadable cached result as a cache miss and recomputes: say why, loudly
        logging.getLogger("atelier.results").warning("refused a stored task result: %s", self)


def _allowed(qualified: str) -> bool:
    return qualified in ALLOWED_CLASSES or qualified.startswith(ALLOWED_MODULES)


def safe_object_hook(obj: dict[str, Any]) -> Any:
    for key in ("__class__", "__exc_type__"):
        name = obj.get(key)
        if isinstance(name, str) and not _allowed(name):
            raise UnsafeResult(f"names {name!r}, a type Atelier never writes; refused before loading it")
    return prefect_json_object_decoder(obj)


class AtelierJSONSerializer(JSONSerializer):
    """`type: atelier-json`: Prefect's JSON encoding, an allowlisted decoding."""

    type: Literal["atelier-json"] = "atelier-json"

    def loads(self, blob: bytes) -> Any:
        return json.loads(blob.decode(), object_hook=safe_object_hook)


def _check_serializer(spec: Any, where: str) -> None:
    expected = AtelierJSONSerializer()
    ok = (isinstance(spec, dict) and spec.get("type") == expected.type
          and spec.get("jsonlib", expected.jsonlib) == expected.jsonlib
          and spec.get("object_decoder", expected.object_decoder) == expected.object_decoder
          and spec.get("object_encoder", expected.object_encoder) == expected.object_encoder
          and not spec.get("loads_kwargs") and not spec.get("dumps_kwargs"))
    if not ok:
        kind = spec.get("type") if isinstance(spec, dict) else type(spec).__name__
        raise UnsafeResult(f"{where} asks for serializer {kind!r} with settings Atelier never writes; refused before decoding it")


def guard_result_records() -> None:
    """Check the serializer a stored record names before Prefect decodes anything with it."""
    from prefect._internal.result_records import ResultRecord

    if getattr(ResultRecord, "_atelier_guarded", False):
        return
    deserialize = ResultRecord.deserialize.__func__
    from_parts = ResultRecord.deserialize_from_result_and_metadata.__func__

    def guarded_deserialize(cls, data: bytes, backup_serializer=None):
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if isinstance(record, dict) and ("metadata" in record or "serializer" in record):
            spec = (record.get("metadata") or {}).get("serializer", record.get("serializer"))
            _check_serializer(spec, "record")
        elif backup_serializer is not None:
            _check_serializer(backup_serializer.model_dump(), "record")
        return deserialize(cls, data, backup_serializer)

    def guarded_from_parts(cls, result: bytes, metadata: bytes):
        try:
            spec = json.loads(metadata).get("serializer")
        except (ValueError, AttributeError):
            spec = None
        _check_serializer(spec, "metadata")
        return from_parts(cls, result, metadata)

    ResultRecord.deserialize = classmethod(guarded_deserialize)
    ResultRecord.deserialize_from_result_and_metadata = classmethod(guarded_from_parts)
    ResultRecord._atelier_guarded = True


guard_result_records()
