"""JSON as the format needs it: deterministic to write, unforgiving to read.

Python's ``json`` accepts ``NaN``/``Infinity`` and silently keeps the last of duplicate keys; both
would let two readers disagree about one manifest, so both are refused here.
"""

from __future__ import annotations

import json
from typing import Any


class StrictJSONError(ValueError):
    """The text is not the strict JSON the format requires."""


def _reject_constant(name: str) -> Any:
    raise StrictJSONError(f"non-standard JSON constant {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJSONError(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def loads(data: bytes | str) -> Any:
    """Parses UTF-8 JSON only: ``json.loads`` would otherwise guess UTF-16/32 from raw bytes."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except StrictJSONError:
        raise
    except RecursionError as exc:
        raise StrictJSONError("JSON nested too deeply") from exc
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise StrictJSONError(str(exc)[:200]) from exc


def dumps(obj: Any, *, indent: int | None = None) -> bytes:
    """UTF-8 JSON with no NaN tokens; ``indent`` for files people read."""
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, indent=indent, separators=separators).encode()
