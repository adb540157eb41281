"""JSON as the format needs it: deterministic to write, unforgiving to read, and fast to read.

Python's ``json`` accepts ``NaN``/``Infinity`` and silently keeps the last of duplicate keys; both
would let two readers disagree about one manifest, so both are refused here.

Why msgspec, and how duplicates are still refused at C speed: a manifest of 50,000 tensors is
~16 MB of JSON, and the old parser (``json.loads`` with a Python ``object_pairs_hook`` called for
every object) ran at ~3 MB/s. ``msgspec.json.decode`` is a maintained C parser that already refuses
what the format refuses: ``NaN``/``Infinity`` tokens, numbers that overflow a double (``1e400``),
invalid UTF-8 (in keys and values, without a separate decode pass), lone-surrogate escapes,
trailing data, over-long integers; nesting deeper than the interpreter's limit raises
``RecursionError`` (wrapped below). What it does not refuse, like every fast parser we measured
(orjson too, which also turns big integers into floats), is a duplicate key: it keeps the last.

The duplicate check is exact and runs at memchr speed. In valid JSON a ``:`` byte is either the
separator after a key or a literal character inside a string (no number, literal or whitespace
holds one, and msgspec never escapes one when it writes). Re-encoding the decoded value writes
every key it kept and every string it kept once, so when no string of the input spells a colon as
an escape (``\\u003a``; such rare inputs take the slow, hook-checked path), the input and the
re-encoding hold the same number of ``:`` bytes exactly when nothing was dropped. A duplicate drops
its earlier key (one separator) and that value's strings, so the re-encoding holds fewer. The
re-encoding is another C pass (~0.5 GB/s here); two byte counts are near free.

The garbage collector is paused while a document is decoded: the parser allocates hundreds of
thousands of acyclic containers, and each batch of 700 allocations otherwise triggers a collection
that walks the young ones again (measured: 1.5x the parse time on a 16 MB manifest).
"""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec


class StrictJSONError(ValueError):
    """The text is not the strict JSON the format requires."""


_COLON = b":"
_ESCAPE_PREFIX = b"\\u003"  # then "a" or "A": an escaped colon, or another character we pass over
_gc_lock = threading.Lock()
_gc_paused = 0  # parses in flight that asked for the pause; the last one out restores the collector
_gc_was_enabled = False


def _reject_constant(name: str) -> Any:
    raise StrictJSONError(f"non-standard JSON constant {name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJSONError(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def _pause_gc() -> None:
    global _gc_paused, _gc_was_enabled
    with _gc_lock:
        if _gc_paused == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_paused += 1


def _resume_gc() -> None:
    global _gc_paused
    with _gc_lock:
        _gc_paused -= 1
        if _gc_paused == 0 and _gc_was_enabled:
            gc.enable()


@contextmanager
def gc_paused() -> Iterator[None]:
    """The collector paused while a parsed document is turned into many small objects (a manifest's
    or header's entries): they are acyclic, and collections triggered by their allocation would walk
    the whole decoded document again and again. Nested and concurrent uses restore it once."""
    _pause_gc()
    try:
        yield
    finally:
        _resume_gc()


def _slow_checked(data: bytes) -> Any:
    """The hook-checked parse, for the rare document that escapes a colon (see the module docstring);
    the fast parse has already proven it valid UTF-8 JSON, so this only finds the duplicate."""
    return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def loads(data: bytes | str) -> Any:
    """Parses UTF-8 JSON only (never UTF-16/32 guessed from raw bytes), refusing duplicate keys at any
    depth, ``NaN``/``Infinity`` and non-finite numbers, with :class:`StrictJSONError` for every
    refusal, nesting too deep included."""
    _pause_gc()
    try:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        value = msgspec.json.decode(raw)
        colons = raw.count(_COLON)
        if colons:  # no colon, no object: nothing can be duplicated
            if _ESCAPE_PREFIX in raw:
                _slow_checked(raw)
            elif msgspec.json.encode(value).count(_COLON) != colons:
                _slow_checked(raw)  # names the duplicate key
                raise StrictJSONError("duplicate key in a JSON object")
        return value
    except StrictJSONError:
        raise
    except RecursionError as exc:
        raise StrictJSONError("JSON nested too deeply") from exc
    except (msgspec.MsgspecError, ValueError, UnicodeError, TypeError, OverflowError) as exc:
        raise StrictJSONError(str(exc)[:200]) from exc
    finally:
        _resume_gc()


def dumps(obj: Any, *, indent: int | None = None) -> bytes:
    """UTF-8 JSON with no NaN tokens; ``indent`` for files people read."""
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, indent=indent, separators=separators).encode()
