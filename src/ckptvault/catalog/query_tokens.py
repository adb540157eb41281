"""The find language's words: limits, :class:`QueryError`, keywords and the tokenizer.

Split out of ``ckptvault.catalog.query`` (the language is documented there): the filter parser
and the sort compiler both read text through this one tokenizer and fail through this one error,
so a message and its column look the same whichever part of the language refused the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, NoReturn

from ckptvault.errors import CheckpointError

MAX_TEXT_LENGTH: Final = 4096
MAX_DEPTH: Final = 64
MAX_COMPARISONS: Final = 256
MAX_SORT_KEYS: Final = 32


class QueryError(CheckpointError):
    """A filter or sort text the language does not accept; the message names the column.

    ``column`` is 1-based (``None`` when the problem is the text as a whole) and ``text`` the
    text that failed, so a CLI can draw a caret under the spot with :meth:`pointer`.
    """

    def __init__(self, message: str, *, column: int | None = None, text: str | None = None) -> None:
        super().__init__(message)
        self.column = column
        self.text = text

    def pointer(self) -> str:
        """The text with a caret under the failing column (empty when either is unknown)."""
        if self.text is None or self.column is None or "\n" in self.text:
            return ""
        return f"{self.text}\n{' ' * (self.column - 1)}^"


KEYWORDS: Final = frozenset({"and", "or", "not", "in", "is", "null", "nan", "true", "false"})

# Bare words that an injected SQL fragment needs (statements, clauses, SQL-only operators). They
# could never reach SQL anyway, but a filter containing one is almost certainly pasted SQL, so we
# say so instead of quietly looking for a metric named "union". Backquotes make any of them a name.
_SQL_WORDS_TEXT: Final = """
    select insert update delete replace drop create alter truncate pragma attach detach vacuum
    reindex analyze explain begin commit rollback savepoint release transaction grant revoke exec
    execute declare from where union intersect except join into values set having group order by
    limit offset returning with recursive as on using distinct all table view trigger index database
    like glob regexp match between exists case when then else end cast collate escape isnull notnull
"""
SQL_WORDS: Final = frozenset(_SQL_WORDS_TEXT.split())

# --- tokenizer ---------------------------------------------------------------------------------

_TokenKind = Literal["num", "str", "ident", "qident", "op", "(", ")", ",", "sign", "eof"]

_NUMBER: Final = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_IDENT: Final = re.compile(r"[A-Za-z_](?:[A-Za-z0-9_.]|/(?!\*))*")  # "a/*" stops before the comment
_AFTER_NUMBER: Final = re.compile(r"[A-Za-z0-9_.`'\"]")
_OPS: Final = ("==", "!=", "<=", ">=", "=", "<", ">", "~")
_PUNCT: Final[dict[str, _TokenKind]] = {"(": "(", ")": ")", ",": ","}
_ESCAPES: Final = {"\\": "\\", "'": "'", '"': '"', "`": "`", "n": "\n", "t": "\t", "r": "\r"}
_INT64: Final = 2**63


@dataclass(frozen=True)
class Token:
    kind: _TokenKind
    text: str  # as written (for messages)
    col: int  # 1-based
    value: object = None  # int | float | bool | str for values, the name for identifiers


def fail(message: str, column: int | None, text: str) -> NoReturn:
    raise QueryError(message, column=column, text=text)


def check_text(text: str, what: str) -> None:
    if len(text) > MAX_TEXT_LENGTH:
        raise QueryError(f"the {what} is too long ({len(text)} characters; at most {MAX_TEXT_LENGTH})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: sqlite3 could not bind them as text
        # No ``text`` on the error: printing it would fail the same way.
        raise QueryError(
            f"the {what} holds a character that is not valid Unicode at column {e.start + 1}",
            column=e.start + 1,
        ) from None


def _read_quoted(text: str, start: int, what: str) -> tuple[str, int]:
    """The contents of the quoted run starting at ``start`` (backslash escapes) and the index after it."""
    quote = text[start]
    out: list[str] = []
    j = start + 1
    while j < len(text):
        ch = text[j]
        if ch == quote:
            return "".join(out), j + 1
        if ch == "\\" and j + 1 < len(text):
            esc = text[j + 1]
            if esc not in _ESCAPES:
                fail(f"unknown escape '\\{esc}' at column {j + 1}; use \\\\ for a backslash", j + 1, text)
            out.append(_ESCAPES[esc])
            j += 2
            continue
        out.append(ch)
        j += 1
    fail(f"unterminated {what} starting at column {start + 1} (missing closing {quote})", start + 1, text)


def _number(spelled: str) -> int | float:
    if any(ch in spelled for ch in ".eE"):
        return float(spelled)
    value = int(spelled)
    # SQLite integers are 64-bit; a bigger literal compares as the nearest float (or inf).
    return value if -_INT64 <= value < _INT64 else float(spelled)


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        col = i + 1
        if ch.isspace():
            i += 1
            continue
        two = text[i : i + 2]
        if two in ("--", "/*", "*/"):
            fail(f"comment marker {two!r} at column {col} is not allowed in a filter", col, text)
        if ch == ";":
            fail(f"unexpected ';' at column {col}: a filter is one expression, not SQL statements", col, text)
        if ch in "'\"":
            value, end = _read_quoted(text, i, "string")
            tokens.append(Token("str", text[i:end], col, value))
            i = end
            continue
        if ch == "`":
            value, end = _read_quoted(text, i, "`name`")
            if not value:
                fail(f"empty `` name at column {col}", col, text)
            tokens.append(Token("qident", text[i:end], col, value))
            i = end
            continue
        m = _NUMBER.match(text, i)
        if m:
            end = m.end()
            if end < n and _AFTER_NUMBER.match(text, end):
                fail(f"malformed number {text[i : end + 1]!r} at column {col}", col, text)
            tokens.append(Token("num", m.group(), col, _number(m.group())))
            i = end
            continue
        m = _IDENT.match(text, i)
        if m:
            tokens.append(Token("ident", m.group(), col, m.group()))
            i = m.end()
            continue
        op = next((op for op in _OPS if text.startswith(op, i)), None)
        if op is not None:
            tokens.append(Token("op", op, col))
            i += len(op)
            continue
        if ch in "(),":
            tokens.append(Token(_PUNCT[ch], ch, col))
            i += 1
            continue
        if ch in "+-":
            tokens.append(Token("sign", ch, col))
            i += 1
            continue
        fail(f"unexpected {ch!r} at column {col}", col, text)
    tokens.append(Token("eof", "", n + 1))
    return tokens


def describe(tok: Token) -> str:
    return "the end of the text" if tok.kind == "eof" else repr(tok.text)
