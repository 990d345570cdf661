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

import builtins
import contextvars
import datetime
import decimal
import json
import logging
import pathlib
import uuid
from typing import Any, Callable, Literal

from prefect.serializers import JSONSerializer

from atelier.kernel.errors import AtelierError

# What a stored result may name, looked up in this table and never imported by name: value types with no
# behaviour on construction, each rebuilt by a function of ours from plain JSON, and the project's own
# result data classes (`result_type`). Nothing else is constructed, called or imported.
_VALUE_TYPES: dict[str, Callable[[Any], Any]] = {
    **{
        f"pathlib.{name}": (lambda data, cls=getattr(pathlib, name): cls(str(data)))
        for name in ("Path", "PosixPath", "PurePath", "PurePosixPath")
    },
    # pydantic parses what Prefect's encoder (pydantic's) wrote: ISO 8601 times and durations, numbers as text
    **{
        f"{cls.__module__}.{cls.__qualname__}": (lambda data, cls=cls: _parse(cls, data))
        for cls in (datetime.datetime, datetime.date, datetime.timedelta, uuid.UUID, decimal.Decimal)
    },
    "builtins.set": lambda data: set(_plain_list(data)),
    "builtins.frozenset": lambda data: frozenset(_plain_list(data)),
    "builtins.tuple": lambda data: tuple(_plain_list(data)),
    "builtins.bytes": lambda data: _bytes(data),
    "builtins.complex": lambda data: complex(*_plain_list(data)) if isinstance(data, list) else complex(str(data)),
}
_RESULT_TYPES: dict[str, type] = {}


def result_type(cls: type) -> type:
    """Class decorator: a frozen data class a task may return, rebuilt from its stored fields."""
    import dataclasses

    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
        raise TypeError(f"{cls.__qualname__}: a task result type is a frozen dataclass")
    _RESULT_TYPES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def _parse(cls: type, data: Any) -> Any:
    from pydantic import TypeAdapter, ValidationError

    if not isinstance(data, (str, int, float)):
        raise ValueError(f"{type(data).__name__} is not a scalar")
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"]) from None


def _plain_list(data: Any) -> list:
    if not isinstance(data, list):
        raise UnsafeResult(f"holds {type(data).__name__} where a list was written")
    return data


def _bytes(data: Any) -> bytes:
    import base64

    if not isinstance(data, str):
        raise UnsafeResult(f"holds {type(data).__name__} where bytes were written")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        return data.encode()  # pydantic's encoder writes utf-8 text as is


class UnsafeResult(AtelierError):
    """A stored task result that Atelier did not write (a type or serializer outside the allowlist):
    tampering with the result store. Exit code 5, like a tampered ledger."""

    exit_code = 5

    def __init__(self, problem: str, record: str = "stored task result") -> None:
        super().__init__(
            record,
            problem,
            "check who can write to the result store (PREFECT_RESULTS / the prefect-results/ "
            "prefix); remove the object (or rerun with --refresh) to recompute it",
        )
        logging.getLogger("atelier.results").warning("refused a stored task result: %s", self)


def _exception(name: str, message: Any) -> BaseException:
    """A stored exception: a built-in exception or one of Atelier's errors, rebuilt with its message;
    any other type becomes a RuntimeError that names it (its class is never imported)."""
    text = str(message)
    builtin = getattr(builtins, name.removeprefix("builtins."), None) if name.startswith("builtins.") else None
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        return builtin(text)
    known = {f"{c.__module__}.{c.__qualname__}": c for c in _subclasses(AtelierError)}
    if name in known:
        error = known[name].__new__(known[name])  # its __init__ is not run: the stored message is all there is
        Exception.__init__(error, text)
        error.item, error.problem, error.fix = name, text, ""
        return error
    return RuntimeError(f"{name}: {text}")


def _subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found


def safe_object_hook(obj: dict[str, Any]) -> Any:
    """JSON object hook that rebuilds only the allowlisted types above."""
    if "__class__" in obj:
        name = obj["__class__"]
        if isinstance(name, str) and name in _VALUE_TYPES:
            try:
                return _VALUE_TYPES[name](obj.get("data"))
            except (TypeError, ValueError) as exc:
                raise UnsafeResult(f"holds a {name} that does not parse ({exc})") from None
        if isinstance(name, str) and name in _RESULT_TYPES:
            data = obj.get("data")
            if not isinstance(data, dict):
                raise UnsafeResult(f"holds a {name} without its fields")
            from pydantic import TypeAdapter, ValidationError

            try:  # the class is ours (registered); pydantic builds it field by field from its annotations
                return TypeAdapter(_RESULT_TYPES[name]).validate_python(data)
            except ValidationError as exc:
                raise UnsafeResult(f"holds a {name} whose fields do not match ({exc.errors()[0]['msg']})") from None
        raise UnsafeResult(f"names {name!r}, a type Atelier never writes; refused before loading it")
    if "__exc_type__" in obj:
        name = obj["__exc_type__"]
        if not isinstance(name, str):
            raise UnsafeResult("names an exception type that is not a name")
        return _exception(name, obj.get("message", ""))
    return obj


class AtelierJSONSerializer(JSONSerializer):
    """`type: atelier-json`: Prefect's JSON encoding, an allowlisted decoding."""

    type: Literal["atelier-json"] = "atelier-json"

    def loads(self, blob: bytes) -> Any:
        return json.loads(blob.decode(), object_hook=safe_object_hook)


def _check_serializer(spec: Any, where: str) -> None:
    expected = AtelierJSONSerializer()
    ok = (
        isinstance(spec, dict)
        and spec.get("type") == expected.type
        and spec.get("jsonlib", expected.jsonlib) == expected.jsonlib
        and spec.get("object_decoder", expected.object_decoder) == expected.object_decoder
        and spec.get("object_encoder", expected.object_encoder) == expected.object_encoder
        and not spec.get("loads_kwargs")
        and not spec.get("dumps_kwargs")
    )
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
            return _checked_deserialize(cls, data, backup_serializer)
        except UnsafeResult as refused:
            _REFUSED.set(refused)  # Prefect's existence check swallows errors: keep it for _raise_refused
            raise

    def _checked_deserialize(cls, data: bytes, backup_serializer=None):
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
    _refusals_are_errors()


_REFUSED: contextvars.ContextVar[UnsafeResult | None] = contextvars.ContextVar("atelier_refused_result", default=None)


def _refusals_are_errors() -> None:
    """Prefect's cache lookup (`ResultStore.exists`) reads a record and takes any error for "not cached",
    so a planted record would only be recomputed over, silently. A refused record stops the run instead:
    exit 5 naming the record's key, before anything in it is built."""
    from prefect.results import ResultStore

    exists, aexists = ResultStore._exists, ResultStore._aexists

    def _raise_refused(store: ResultStore, key: str, token) -> None:
        refused = _REFUSED.get()
        _REFUSED.reset(token)
        if refused is not None:
            where = getattr(store.result_storage, "basepath", None) or getattr(store.result_storage, "bucket_folder", None) or ""
            raise UnsafeResult(refused.problem, f"stored task result {str(where).rstrip('/') + '/' if where else ''}{key}")

    def checked_exists(self: ResultStore, key: str) -> bool:
        token = _REFUSED.set(None)
        found = exists(self, key)
        _raise_refused(self, key, token)
        return found

    async def checked_aexists(self: ResultStore, key: str) -> bool:
        token = _REFUSED.set(None)
        found = await aexists(self, key)
        _raise_refused(self, key, token)
        return found

    ResultStore._exists, ResultStore._aexists = checked_exists, checked_aexists


guard_result_records()
