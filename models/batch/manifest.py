"""Batch manifests: one JSON object per line. Bad lines are reported, never fatal to the batch; a file
with no valid line at all (not UTF-8, empty, a JSON list, every line wrong) is refused whole.

Generation manifest fields: `id` (required; letters, digits, '.', '_', '-'), `prompt` (required),
optional `seed` (default: derived from the id, so a rerun draws the same image), `guidance`, `steps`,
`size` (an int for square images or [width, height]), `negative_prompt`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

from atelier.kernel.errors import ConfigError

ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FIELDS = {"id", "prompt", "seed", "guidance", "steps", "size", "negative_prompt"}


@dataclass(frozen=True)
class GenItem:
    id: str
    prompt: str
    seed: int
    guidance: float | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None

    def params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("id",)}


@dataclass(frozen=True)
class Invalid:
    line: int  # 1-based line number in the manifest
    id: str | None
    error: str

    def to_dict(self) -> dict:
        return asdict(self)


def default_seed(item_id: str) -> int:
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:4], "big")


def _size(value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        w = h = value
    elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        w, h = value
    else:
        raise ValueError("`size` must be an integer or [width, height]")
    if not (8 <= w <= 2048 and 8 <= h <= 2048) or w % 8 or h % 8:
        raise ValueError(f"`size` {w}x{h} must be multiples of 8 between 8 and 2048")
    return w, h


def _number(obj: dict, key: str, kind, low, high):
    if key not in obj or obj[key] is None:
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ValueError(f"`{key}` must be a number{' (whole)' if kind is int else ''}, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"`{key}` {value} is outside {low}..{high}")
    return kind(value)


def parse_generation_manifest(text: str) -> tuple[list[GenItem], list[Invalid]]:
    items: list[GenItem] = []
    invalid: list[Invalid] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        item_id = None
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("is not a JSON object")
            item_id = obj.get("id") if isinstance(obj.get("id"), str) else None
            missing = [k for k in ("id", "prompt") if not obj.get(k)]
            if missing:
                raise ValueError(f"misses {', '.join('`' + k + '`' for k in missing)}")
            if not isinstance(obj["id"], str) or not ID.fullmatch(obj["id"]):
                raise ValueError(f"`id` {obj['id']!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
            if not isinstance(obj["prompt"], str):
                raise ValueError("`prompt` must be a string")
            unknown = sorted(set(obj) - FIELDS)
            if unknown:
                raise ValueError(f"has unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(FIELDS))})")
            if obj["id"] in seen:
                raise ValueError(f"repeats id {obj['id']!r} of line {seen[obj['id']]}")
            seed = _number(obj, "seed", int, 0, 2**63 - 1)
            width, height = _size(obj["size"]) if obj.get("size") is not None else (None, None)
            item = GenItem(
                obj["id"],
                obj["prompt"],
                default_seed(obj["id"]) if seed is None else seed,
                _number(obj, "guidance", float, 0.0, 50.0),
                _number(obj, "steps", int, 1, 500),
                width,
                height,
                obj.get("negative_prompt") if isinstance(obj.get("negative_prompt"), str) else None,
            )
        except json.JSONDecodeError as exc:
            invalid.append(Invalid(n, None, f"line {n} is not JSON ({exc.msg} at column {exc.colno})"))
            continue
        except RecursionError:
            invalid.append(Invalid(n, None, f"line {n} is nested too deeply to be an item"))
            continue
        except ValueError as exc:
            invalid.append(Invalid(n, item_id, f"line {n}{' (id ' + repr(item_id) + ')' if item_id else ''} {exc}"))
            continue
        seen[item.id] = n
        items.append(item)
    return items, invalid


def read_generation_manifest(data: bytes, where: str, require_items: bool = True) -> tuple[list[GenItem], list[Invalid]]:
    """The manifest's items from its bytes, or ConfigError (exit 2) naming `where` when nothing in it can
    run: bytes that are not UTF-8 (a Latin-1 export would turn every accent into U+FFFD), no line at all,
    or (with `require_items`) no valid line (a JSON list, a binary file). Bad lines among good ones are the
    batch's to report; the batch flow reads without `require_items` so that its report names every bad line."""
    fix = 'write one JSON object per line in UTF-8: {"id": "a1", "prompt": "a photo of sks dog"}'
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"manifest {where}", f"is not UTF-8 text (byte {exc.start})", f"save it as UTF-8; {fix}") from None
    items, invalid = parse_generation_manifest(text)
    if not items and not invalid:
        raise ConfigError(f"manifest {where}", "is empty", fix)
    if not items and require_items:
        shown = "; ".join(bad.error for bad in invalid[:3]) + (f"; and {len(invalid) - 3} more" if len(invalid) > 3 else "")
        raise ConfigError(f"manifest {where}", f"has no valid item: {shown}", fix)
    return items, invalid
