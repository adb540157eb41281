"""Untrusted text made safe to show: every character that would act instead of print is spelled out.

Names, paths, metadata, metric names, tags, config, registry entries and validation problems come
from checkpoints and run directories, which are not trusted (see docs/security.md). Shown raw, an
ESC could clear a terminal, forge an OSC 8 hyperlink or recolour a verdict; a carriage return
could overwrite the line it is on; a bidi override (U+202E) could make ``evil.exe`` read as
``exe.live``; a lone surrogate (from JSON ``"\\ud800"`` or an undecodable file name) makes
printing itself fail. :func:`visible` replaces each such character with its Python escape
(``\\x1b``, ``\\r``, ``\\u202e``, ``\\ud800``), so the reader sees exactly what the data holds and
the output device receives only printable text. The CLI adds rich-markup escaping on top
(``cli/inert.py``); the HTML report adds ``html.escape``.

:func:`number_text` formats any number a manifest may hold, including integers with thousands of
digits, which ``str()`` refuses beyond 4,300 digits and ``float()`` beyond 1e308; :func:`size_text`
does the same for byte counts.

Only the standard library: the lowest layer, usable by every module that shows data.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any, Final

# Categories that act rather than print: controls (C0, DEL, C1), format characters (bidi
# overrides and isolates, zero-width characters, tag characters, BOM), surrogates, and the line
# and paragraph separators some terminals and editors treat as newlines.
_ACTING: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_SHORT: Final = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_EXACT_INT_BITS: Final = 200  # up to ~60 digits exactly; beyond, scientific notation
_MAX_DEPTH: Final = 32


def _escape(char: str) -> str:
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def visible_str(text: str) -> str:
    """``text`` with every control, format, surrogate and line-separator character escaped."""
    if text.isascii() and text.isprintable():
        return text  # the common case, in one C-speed test
    return "".join(_escape(c) if unicodedata.category(c) in _ACTING else c for c in text)


def number_text(value: int | float) -> str:
    """A number as text, whatever its size: exact integers up to ~60 digits, else ``1.23457e+4000``."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{value:.6g}" if isinstance(value, float) else str(value)
    bits = abs(value).bit_length()
    if bits <= _EXACT_INT_BITS:
        return str(value)
    # log10 from the top 64 bits and the count of the rest: no conversion of the whole number.
    shift = bits - 64
    exponent10 = math.log10(abs(value) >> shift) + shift * math.log10(2)
    exponent = math.floor(exponent10)
    mantissa = 10 ** (exponent10 - exponent)
    return f"{'-' if value < 0 else ''}{mantissa:.5f}e+{exponent}"


def size_text(n: int | float) -> str:
    """``2.1 KiB``: any byte count a manifest may declare, however large, without overflowing."""
    if isinstance(n, int) and abs(n).bit_length() > 60:
        return f"{number_text(n)} B"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def visible(value: Any, limit: int | None = None) -> str:
    """Any value as safe text: strings escaped (:func:`visible_str`), numbers by :func:`number_text`,
    containers like their repr with each member made safe. ``limit`` cuts the text (before escaping,
    so an escape is never cut in half) and marks the cut with an ellipsis."""
    text = value if isinstance(value, str) else _render(value, 0)
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    return visible_str(text)


def _render(value: Any, depth: int) -> str:
    """Like ``repr`` for containers and ``str`` otherwise, but never raising on a huge integer,
    and bounded in depth."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return number_text(value)
    if depth >= _MAX_DEPTH:
        return "…"
    if isinstance(value, dict):
        items = (f"{_member(k, depth)}: {_member(v, depth)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, (list, tuple, set, frozenset)):
        inner = ", ".join(_member(v, depth) for v in value)
        if isinstance(value, list):
            return f"[{inner}]"
        if isinstance(value, tuple):
            return f"({inner},)" if len(value) == 1 else f"({inner})"
        return "{" + inner + "}" if value else "set()"
    try:
        return str(value)
    except Exception:  # a value whose __str__ fails: say what it is instead of failing the display
        return f"<{type(value).__name__}>"


def _member(value: Any, depth: int) -> str:
    """A member of a container: strings quoted as repr would, the rest rendered one level down."""
    return repr(value) if isinstance(value, str) else _render(value, depth + 1)
