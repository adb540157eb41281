"""What the CLI prints: untrusted text made inert for rich and the terminal, numbers that cannot fail.

Every command prints through rich, which reads ``[...]`` as markup (``[link=file:///...]`` makes an
OSC 8 hyperlink, ``[bold red]`` a colour) and ``:name:`` as an emoji code. So every value that
comes from a checkpoint, a run directory, the catalog or the registry goes through :func:`inert`
before it is placed in a markup string or a table cell: control and bidi characters are shown
escaped (:func:`ckptvault.visible.visible`) and markup brackets escaped. The consoles made by
:func:`console` never interpret emoji codes or highlight. The only escape sequences in the output
are then the colours the CLI itself writes in its own markup.

Warnings and log records the library emits while a command runs quote paths and file content
too; :func:`install_inert_diagnostics` (run before every command) makes them inert on stderr.

``--json`` output goes through :func:`json_text`: ASCII-only (every control, bidi and non-ASCII
character is a ``\\uXXXX`` escape), never colourised, and able to hold integers too long for
``str()`` (written as a string in scientific notation).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import datetime
from typing import Any, Final, TextIO

from rich.console import Console
from rich.markup import escape

from ..errors import CheckpointError
from ..visible import number_text, size_text, visible, visible_str

# What reading and showing one hostile checkpoint may raise besides CheckpointError: an unreadable
# file (OSError), values of the wrong type or size (ValueError, TypeError, OverflowError, KeyError),
# nesting too deep. A listing turns them into the row's error; ``show`` into one line and exit 1.
UNREADABLE: Final = (CheckpointError, OSError, ValueError, TypeError, OverflowError, KeyError, RecursionError)
_JSON_EXACT_BITS: Final = 14_000  # below the 4,300-digit str() limit


def console(*, stderr: bool = False) -> Console:
    """A console that interprets only the CLI's own markup: no emoji codes, no highlighting."""
    return Console(stderr=stderr, highlight=False, emoji=False)


def inert(value: Any, limit: int | None = None) -> str:
    """``value`` as text safe to embed in rich markup or a table cell (see the module docstring)."""
    return escape(visible(value, limit))


def error_text(exc: BaseException, *, with_type: bool = True) -> str:
    """An exception as one inert line: its messages quote paths and file content."""
    name = f"{type(exc).__name__}: " if with_type else ""
    return inert(f"{name}{message_of(exc)}")


def message_of(exc: BaseException) -> str:
    """``str(exc)``, or its type's name when even that fails (a message holding a huge integer)."""
    try:
        return str(exc)
    except ValueError:
        return type(exc).__name__


def human_bytes(n: Any) -> str:
    """``2.1 KiB`` for any size (:func:`ckptvault.visible.size_text`); anything else a catalog row
    may hold, inert."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return inert(n, 40)
    return size_text(n)


def metric_text(value: Any) -> str:
    """A metric cell: 6 significant digits for floats, any integer, other values inert."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return number_text(value)
    return inert(value, 40)


def timestamp(text: Any, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    """An ISO 8601 time as ``fmt``; anything else (a manifest may say "not a date") shown inert."""
    if isinstance(text, str):
        try:
            return datetime.fromisoformat(text).strftime(fmt)
        except ValueError:
            pass
    return inert(text, 64)


def _jsonable(value: Any) -> Any:
    """``value`` with every integer ``json`` cannot write (over 4,300 digits) as a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return number_text(value) if value.bit_length() > _JSON_EXACT_BITS else value
    if isinstance(value, dict):
        return {_json_key(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _json_key(key: Any) -> Any:
    """A key ``json`` can write: strings, numbers, booleans and None as they are, others as text."""
    if isinstance(key, int) and not isinstance(key, bool):
        return _jsonable(key)
    return key if key is None or isinstance(key, (str, float, bool)) else visible(key)


def json_text(value: Any) -> str:
    """Machine-readable JSON: ASCII-escaped (no raw control or bidi character), never colourised."""
    return json.dumps(_jsonable(value), indent=2, default=lambda v: visible(v), ensure_ascii=True)


def emit_json(value: Any) -> None:
    """Writes :func:`json_text` to stdout, bypassing rich (which would colour it on a terminal)."""
    sys.stdout.write(json_text(value) + "\n")


# -- warnings and log records ----------------------------------------------------------------------
def _lines(text: str) -> str:
    """Multi-line diagnostics keep their line breaks; each line is made visible."""
    return "\n".join(visible_str(line) for line in text.rstrip("\n").split("\n")) + "\n"


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    stream = file if file is not None else sys.stderr
    stream.write(_lines(warnings.formatwarning(message, category, filename, lineno, line)))


class _InertFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _lines(super().format(record)).rstrip("\n")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the ``sys.stderr`` of the moment (a test runner swaps it), not the one at creation."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def install_inert_diagnostics() -> None:
    """Warnings and the library's log records reach stderr inert (idempotent).

    Replaces ``warnings.showwarning``, and gives the ``ckptvault`` logger a stderr handler at
    WARNING (what Python's last-resort handler would print) whose lines are made visible, unless the
    program configured logging itself."""
    warnings.showwarning = _show_warning
    logger = logging.getLogger("ckptvault")
    if logger.handlers or logging.getLogger().handlers:
        return  # installed already, or the program decides where records go
    handler = _StderrHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_InertFormatter("%(levelname)s: %(name)s: %(message)s"))
    logger.addHandler(handler)
