"""The filter and sort language of ``ckptvault find ROOT 'val_acc > 0.9 and step >= 1000' --sort -val_acc``.

A filter compiles to a SQL boolean expression over the catalog's ``checkpoints`` table (alias ``c``)
plus a list of parameters. The text a user types never becomes SQL: every field name is looked up
in a fixed table of SQL fragments (or becomes a ``?`` parameter naming a metric, config key or
tag), every value is a ``?`` parameter, and the only SQL this module emits is the constants below.
Injection is therefore impossible by construction; on top of that, text that *looks* like an
injection attempt (``;``, ``--``, ``/*``, bare SQL words such as ``union`` or ``drop``) is
rejected with a :class:`QueryError` that says where, because it is almost certainly a mistake.

Grammar (keywords ``and or not in is null nan true false`` are case-insensitive; field names are
case-sensitive)::

    expr   := or
    or     := and ("or" and)*
    and    := not ("and" not)*
    not    := "not" not | atom
    atom   := "(" expr ")"
            | field op value                      op: = == != < <= > >= ~ (~ is SQLite GLOB)
            | field ["not"] "in" "(" value ("," value)* ")"
            | field "is" ["not"] ("null" | "nan")
    field  := [A-Za-z_][A-Za-z0-9_./]*  |  `any name` (backquotes; backslash escapes)
    value  := integer | float (1e-3, -2.5) | 'text' | "text" (backslash escapes) | true | false

Fields:

* built-ins (columns of ``checkpoints``): ``step epoch scope run run_id name path created size
  tensor_bytes num_tensors git checkpoint_id valid validation``. Text built-ins take quoted values
  and ``~``; ``created`` is ISO 8601 UTC text, so ``created > '2026-11-01'`` works, and
  ``created ~ '2026-11-01*'`` selects one day; ``git ~ 'abc1*'`` matches a commit prefix.
* ``config.<dotted.key>``: the run config. Numbers compare with the stored number; text values are
  stored as JSON text, so ``=``/``!=``/``in`` compare against ``json.dumps(value)`` (both with and
  without ``ensure_ascii``, whichever way the catalog encoded it), ``~`` globs the JSON text
  (``config.opt ~ 'ad*'``), and ``< >`` compare JSON text among string values only;
  ``true``/``false`` match JSON booleans (``=``/``!=`` only).
* ``tag.<key>`` / ``tags.<key>``: text; ``tag.k is not null`` means "has the tag".
* ``metric.<name>`` / ``metrics.<name>``, or any other name: a metric (a number; NaN is stored as
  NULL). ``m is null`` means "no value (missing or NaN)", ``m is nan`` finds diverged checkpoints.

A comparison on a value a checkpoint does not have (a NULL column, a missing or NaN metric, a
missing config key or tag) is false, so ``not (x > 1)`` includes checkpoints without ``x``, and
``x not in (...)`` is ``not (x in (...))``.

Sort keys (``compile_sort``): comma-separated fields, each optionally prefixed with ``-``
(descending) or ``+``; NULLs (missing, NaN) always sort last. ``config.<key>`` sorts by the
numeric value (text values sort as missing).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final, Literal, NoReturn

from ckptvault.errors import CheckpointError

MAX_TEXT_LENGTH: Final = 4096
MAX_DEPTH: Final = 64
MAX_COMPARISONS: Final = 256
MAX_SORT_KEYS: Final = 32

DEFAULT_SORT: Final = "c.run_dir, c.step, c.name"  # the name makes ties deterministic


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


# --- fixed SQL ---------------------------------------------------------------------------------
# Everything below is the complete set of SQL this module can emit; user text only ever selects
# among these constants or travels as a parameter.

_BUILTINS: Final[dict[str, tuple[str, bool]]] = {  # field -> (column, is numeric)
    "step": ("c.step", True),
    "epoch": ("c.epoch", True),
    "scope": ("c.scope", False),
    "run": ("c.run_dir", False),
    "run_id": ("c.run_id", False),
    "name": ("c.name", False),
    "path": ("c.path", False),
    "created": ("c.created_at", False),
    "size": ("c.size_bytes", True),
    "tensor_bytes": ("c.tensor_bytes", True),
    "num_tensors": ("c.num_tensors", True),
    "git": ("c.git_commit", False),
    "checkpoint_id": ("c.checkpoint_id", False),
    "valid": ("c.validation_passed", True),
    "validation": ("c.validation_level", False),
}

_SQL_OPS: Final[dict[str, str]] = {
    "=": "=",
    "==": "=",
    "!=": "!=",
    "<": "<",
    "<=": "<=",
    ">": ">",
    ">=": ">=",
    "~": "GLOB",
}

# Uncorrelated IN-subqueries, not correlated EXISTS: SQLite answers them once from the (name, value)
# and (key, num) indexes instead of probing per checkpoint (benchmarks/catalog.py: a metric filter over
# 100,000 checkpoints went from 61 ms to 0.5 ms). c.id is never NULL, so the result is never NULL.
_METRIC_EXISTS: Final = "c.id IN (SELECT m.checkpoint FROM metrics m WHERE m.name = ? AND {})"
_CONFIG_EXISTS: Final = "c.id IN (SELECT g.checkpoint FROM config g WHERE g.key = ? AND {})"
_TAG_EXISTS: Final = "c.id IN (SELECT t.checkpoint FROM tags t WHERE t.key = ? AND {})"
_TAG_PRESENT: Final = "c.id IN (SELECT t.checkpoint FROM tags t WHERE t.key = ?)"
# Columns declared NOT NULL sort without the "IS NULL" key, so their indexes can serve ORDER BY.
_NOT_NULL_COLUMNS: Final = frozenset(
    {
        "c.step",
        "c.run_dir",
        "c.name",
        "c.path",
        "c.created_at",
        "c.size_bytes",
        "c.tensor_bytes",
        "c.num_tensors",
        "c.checkpoint_id",
    }
)
_CONFIG_NOT_NULL: Final = "g.value IS NOT NULL AND g.value != 'null'"
_CONFIG_IS_STRING: Final = "substr(g.value, 1, 1) = '\"'"

_SORT_METRIC: Final = "(SELECT m.value FROM metrics m WHERE m.checkpoint = c.id AND m.name = ?)"
# Config keys sort by their number; text, booleans and JSON null sort with the missing (last).
_SORT_CONFIG: Final = "(SELECT g.num FROM config g WHERE g.checkpoint = c.id AND g.key = ?)"
_SORT_TAG: Final = "(SELECT t.value FROM tags t WHERE t.checkpoint = c.id AND t.key = ?)"

_KEYWORDS: Final = frozenset({"and", "or", "not", "in", "is", "null", "nan", "true", "false"})

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
_SQL_WORDS: Final = frozenset(_SQL_WORDS_TEXT.split())

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
class _Token:
    kind: _TokenKind
    text: str  # as written (for messages)
    col: int  # 1-based
    value: object = None  # int | float | bool | str for values, the name for identifiers


def _fail(message: str, column: int | None, text: str) -> NoReturn:
    raise QueryError(message, column=column, text=text)


def _check_text(text: str, what: str) -> None:
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
                _fail(f"unknown escape '\\{esc}' at column {j + 1}; use \\\\ for a backslash", j + 1, text)
            out.append(_ESCAPES[esc])
            j += 2
            continue
        out.append(ch)
        j += 1
    _fail(f"unterminated {what} starting at column {start + 1} (missing closing {quote})", start + 1, text)


def _number(spelled: str) -> int | float:
    if any(ch in spelled for ch in ".eE"):
        return float(spelled)
    value = int(spelled)
    # SQLite integers are 64-bit; a bigger literal compares as the nearest float (or inf).
    return value if -_INT64 <= value < _INT64 else float(spelled)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
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
            _fail(f"comment marker {two!r} at column {col} is not allowed in a filter", col, text)
        if ch == ";":
            _fail(
                f"unexpected ';' at column {col}: a filter is one expression, not SQL statements", col, text
            )
        if ch in "'\"":
            value, end = _read_quoted(text, i, "string")
            tokens.append(_Token("str", text[i:end], col, value))
            i = end
            continue
        if ch == "`":
            value, end = _read_quoted(text, i, "`name`")
            if not value:
                _fail(f"empty `` name at column {col}", col, text)
            tokens.append(_Token("qident", text[i:end], col, value))
            i = end
            continue
        m = _NUMBER.match(text, i)
        if m:
            end = m.end()
            if end < n and _AFTER_NUMBER.match(text, end):
                _fail(f"malformed number {text[i : end + 1]!r} at column {col}", col, text)
            tokens.append(_Token("num", m.group(), col, _number(m.group())))
            i = end
            continue
        m = _IDENT.match(text, i)
        if m:
            tokens.append(_Token("ident", m.group(), col, m.group()))
            i = m.end()
            continue
        op = next((op for op in _OPS if text.startswith(op, i)), None)
        if op is not None:
            tokens.append(_Token("op", op, col))
            i += len(op)
            continue
        if ch in "(),":
            tokens.append(_Token(_PUNCT[ch], ch, col))
            i += 1
            continue
        if ch in "+-":
            tokens.append(_Token("sign", ch, col))
            i += 1
            continue
        _fail(f"unexpected {ch!r} at column {col}", col, text)
    tokens.append(_Token("eof", "", n + 1))
    return tokens


def _describe(tok: _Token) -> str:
    return "the end of the text" if tok.kind == "eof" else repr(tok.text)


# --- fields ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    kind: Literal["column", "metric", "config", "tag"]
    name: str  # as the user wrote it, for messages
    sql: str = ""  # the fixed column fragment, for built-ins
    numeric: bool = False  # for built-ins
    key: str = ""  # metric name, config key or tag key: always bound as a parameter


_PREFIXES: Final[tuple[tuple[str, Literal["metric", "config", "tag"]], ...]] = (
    ("config.", "config"),
    ("tag.", "tag"),
    ("tags.", "tag"),
    ("metric.", "metric"),
    ("metrics.", "metric"),
)


def _field(tok: _Token, text: str) -> _Field:
    """Resolve a field token; keywords and bare SQL words are refused so pasted SQL fails loudly."""
    if tok.kind not in ("ident", "qident"):
        hint = "; values go on the right of an operator" if tok.kind in ("num", "str") else ""
        _fail(f"expected a field name at column {tok.col}, found {_describe(tok)}{hint}", tok.col, text)
    name = str(tok.value)
    if tok.kind == "ident":
        word = name.lower()
        if word in _KEYWORDS:
            _fail(f"expected a field name at column {tok.col}, found the keyword {tok.text!r}", tok.col, text)
        if word in _SQL_WORDS:
            _fail(
                f"{tok.text!r} at column {tok.col} is not a field; quote field names that are SQL words "
                f"with backquotes (`{tok.text}`)",
                tok.col,
                text,
            )
    if name in _BUILTINS:
        sql, numeric = _BUILTINS[name]
        return _Field("column", name, sql=sql, numeric=numeric)
    for prefix, kind in _PREFIXES:
        if name.startswith(prefix):
            key = name[len(prefix) :]
            if not key:
                _fail(f"{name!r} at column {tok.col} needs a key after the dot", tok.col, text)
            return _Field(kind, name, key=key)
    return _Field("metric", name, key=name)


# --- filter parser -----------------------------------------------------------------------------
# A hand-written recursive-descent parser: the grammar is a dozen lines, and the point of the module
# is that it must never build SQL from user text, which is easiest to see (and to test) when every
# emitted fragment is a constant in this file. A parser library would add a dependency and a
# grammar file for no gain.


class _FilterParser:
    def __init__(self, text: str, tokens: list[_Token]) -> None:
        self.text = text
        self.tokens = tokens
        self.pos = 0
        self.params: list[object] = []
        self.comparisons = 0

    def fail(self, message: str, column: int | None) -> NoReturn:
        _fail(message, column, self.text)

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def take(self) -> _Token:
        tok = self.peek()
        self.pos = min(self.pos + 1, len(self.tokens) - 1)
        return tok

    @staticmethod
    def is_word(tok: _Token, *words: str) -> bool:
        return tok.kind == "ident" and tok.text.lower() in words

    def parse(self) -> str:
        sql = self.parse_or(0)
        tok = self.peek()
        if tok.kind != "eof":
            if tok.kind == "ident" and tok.text.lower() in _SQL_WORDS:
                self.fail(
                    f"unexpected SQL word {tok.text!r} at column {tok.col}; "
                    "a filter combines comparisons with and, or, not",
                    tok.col,
                )
            self.fail(
                f"unexpected {_describe(tok)} at column {tok.col}; expected 'and', 'or' or the end", tok.col
            )
        return sql

    def parse_or(self, depth: int) -> str:
        parts = [self.parse_and(depth)]
        while self.is_word(self.peek(), "or"):
            self.take()
            parts.append(self.parse_and(depth))
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def parse_and(self, depth: int) -> str:
        parts = [self.parse_not(depth)]
        while self.is_word(self.peek(), "and"):
            self.take()
            parts.append(self.parse_not(depth))
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def deeper(self, depth: int, tok: _Token) -> int:
        if depth + 1 > MAX_DEPTH:
            self.fail(
                f"the filter nests too deeply at column {tok.col} (at most {MAX_DEPTH} levels)", tok.col
            )
        return depth + 1

    def parse_not(self, depth: int) -> str:
        tok = self.peek()
        if self.is_word(tok, "not"):
            self.take()
            return _negate(self.parse_not(self.deeper(depth, tok)))
        return self.parse_atom(depth)

    def parse_atom(self, depth: int) -> str:
        tok = self.peek()
        if tok.kind == "(":
            self.take()
            inner = self.parse_or(self.deeper(depth, tok))
            close = self.take()
            if close.kind != ")":
                self.fail(
                    f"expected ')' at column {close.col} to close the '(' at column {tok.col}, "
                    f"found {_describe(close)}",
                    close.col,
                )
            return f"({inner})"
        field = _field(self.take(), self.text)
        op = self.take()
        if op.kind == "op":
            value = self.take()
            return self.compare(field, op, value)
        if self.is_word(op, "in"):
            return self.in_list(field)
        if self.is_word(op, "not") and self.is_word(self.peek(), "in"):
            self.take()
            return _negate(self.in_list(field))
        if self.is_word(op, "is"):
            return self.is_null(field, op)
        if op.kind == "ident" and op.text.lower() in _SQL_WORDS:
            self.fail(
                f"{op.text!r} at column {op.col} is not an operator here; "
                "use = != < <= > >= ~, in (...), or is [not] null",
                op.col,
            )
        self.fail(
            f"expected an operator after {field.name!r} at column {op.col}, found {_describe(op)}; "
            "use = != < <= > >= ~, in (...), or is [not] null",
            op.col,
        )

    def count(self, tok: _Token) -> None:
        self.comparisons += 1
        if self.comparisons > MAX_COMPARISONS:
            self.fail(f"too many comparisons at column {tok.col} (at most {MAX_COMPARISONS})", tok.col)

    def value(self, tok: _Token) -> object:
        if tok.kind in ("num", "str"):
            return tok.value
        if self.is_word(tok, "true", "false"):
            return tok.text.lower() == "true"
        if self.is_word(tok, "null"):
            self.fail(f"use 'is null' or 'is not null' to test for null (column {tok.col})", tok.col)
        hint = (
            "; quote text with '...' (backquotes quote field names)"
            if tok.kind in ("ident", "qident")
            else ""
        )
        self.fail(f"expected a value at column {tok.col}, found {_describe(tok)}{hint}", tok.col)

    def check_value(self, field: _Field, op: str, val: object, tok: _Token) -> None:
        """Refuse type mixes SQLite would answer silently with "no rows" (e.g. ``step = 'ten'``)."""
        if (field.kind == "column" and field.numeric) or field.kind == "metric":
            what = f"metric {field.name!r}" if field.kind == "metric" else field.name
            if op == "~":
                self.fail(f"'~' (glob) needs a text field; {what} is a number (column {tok.col})", tok.col)
            if isinstance(val, str):
                self.fail(
                    f"{what} is a number and cannot be compared with the text {val!r} at column {tok.col}",
                    tok.col,
                )
        elif field.kind in ("column", "tag"):
            if not isinstance(val, str):
                self.fail(
                    f"{field.name} is text; quote the value at column {tok.col} ('{tok.text}')",
                    tok.col,
                )
        elif isinstance(val, bool):  # config
            if op not in ("=", "==", "!="):
                self.fail(f"true/false only compare with = or != (column {tok.col})", tok.col)
        elif op == "~" and not isinstance(val, str):
            self.fail(f"'~' (glob) needs a text pattern at column {tok.col}", tok.col)

    def compare(self, field: _Field, op_tok: _Token, tok: _Token) -> str:
        self.count(op_tok)
        val = self.value(tok)
        op = op_tok.text
        self.check_value(field, op, val, tok)
        sql_op = _SQL_OPS[op]
        if field.kind == "column":
            self.params.append(int(val) if isinstance(val, bool) else val)
            return f"{field.sql} {sql_op} ?"
        self.params.append(field.key)
        if field.kind == "metric":
            self.params.append(int(val) if isinstance(val, bool) else val)
            return _METRIC_EXISTS.format(f"m.value {sql_op} ?")
        if field.kind == "tag":
            self.params.append(val)
            return _TAG_EXISTS.format(f"t.value {sql_op} ?")
        # config
        if isinstance(val, bool):
            self.params.append("true" if val else "false")
            return _CONFIG_EXISTS.format(f"g.value {sql_op} ?")
        if not isinstance(val, str):
            self.params.append(val)
            return _CONFIG_EXISTS.format(f"g.num {sql_op} ?")
        if op == "~":
            # json.dumps keeps glob metacharacters (* ? [ ]) and quotes the pattern as the JSON text is.
            self.params += _json_forms(val)
            return _CONFIG_EXISTS.format("(g.value GLOB ? OR g.value GLOB ?)")
        if op in ("=", "==", "!="):
            self.params += _json_forms(val)
            return _CONFIG_EXISTS.format(f"g.value {'NOT IN' if op == '!=' else 'IN'} (?, ?)")
        self.params.append(json.dumps(val, ensure_ascii=False))
        return _CONFIG_EXISTS.format(f"{_CONFIG_IS_STRING} AND g.value {sql_op} ?")

    def in_list(self, field: _Field) -> str:
        open_tok = self.take()
        if open_tok.kind != "(":
            self.fail(
                f"expected '(' after 'in' at column {open_tok.col}, found {_describe(open_tok)}", open_tok.col
            )
        values: list[object] = []
        while True:
            tok = self.take()
            if tok.kind == ")" and not values:
                self.fail(f"'in (...)' needs at least one value (column {tok.col})", tok.col)
            self.count(tok)
            val = self.value(tok)
            self.check_value(field, "=", val, tok)
            values.append(val)
            sep = self.take()
            if sep.kind == ")":
                break
            if sep.kind != ",":
                self.fail(
                    f"expected ',' or ')' in the list at column {sep.col}, found {_describe(sep)}", sep.col
                )
        if field.kind == "column":
            self.params += [int(v) if isinstance(v, bool) else v for v in values]
            return f"{field.sql} IN ({_marks(len(values))})"
        self.params.append(field.key)
        if field.kind == "metric":
            self.params += [int(v) if isinstance(v, bool) else v for v in values]
            return _METRIC_EXISTS.format(f"m.value IN ({_marks(len(values))})")
        if field.kind == "tag":
            self.params += values
            return _TAG_EXISTS.format(f"t.value IN ({_marks(len(values))})")
        # config: numbers against num, text and booleans against the JSON text
        nums = [v for v in values if not isinstance(v, (str, bool))]
        texts = [form for v in values if isinstance(v, str) for form in _json_forms(v)]
        texts += ["true" if v else "false" for v in values if isinstance(v, bool)]
        conds = []
        if nums:
            conds.append(f"g.num IN ({_marks(len(nums))})")
            self.params += nums
        if texts:
            conds.append(f"g.value IN ({_marks(len(texts))})")
            self.params += texts
        return _CONFIG_EXISTS.format("(" + " OR ".join(conds) + ")")

    def is_null(self, field: _Field, is_tok: _Token) -> str:
        self.count(is_tok)
        negate = self.is_word(self.peek(), "not")
        if negate:
            self.take()
        what = self.take()
        if self.is_word(what, "nan"):
            if field.kind != "metric":
                self.fail(
                    f"only metrics can be nan; {field.name!r} is not a metric (column {what.col})", what.col
                )
            self.params.append(field.key)
            sql = _METRIC_EXISTS.format("m.value IS NULL")
            return f"NOT {sql}" if negate else sql
        if not self.is_word(what, "null"):
            self.fail(f"expected 'null' or 'nan' at column {what.col}, found {_describe(what)}", what.col)
        if field.kind == "column":
            return f"{field.sql} IS {'NOT ' if negate else ''}NULL"
        self.params.append(field.key)
        if field.kind == "metric":
            sql = _METRIC_EXISTS.format("m.value IS NOT NULL")
        elif field.kind == "config":
            sql = _CONFIG_EXISTS.format(_CONFIG_NOT_NULL)
        else:
            sql = _TAG_PRESENT
        # "x is null" = x has no value, i.e. no row with a value exists
        return sql if negate else f"NOT {sql}"


def _negate(sql: str) -> str:
    """``not``, in two-valued logic: a comparison on a NULL column is false, so its negation is true.

    Plain SQL ``NOT`` would keep NULL (``not valid = true`` would drop unvalidated checkpoints),
    unlike metrics, config and tags, whose EXISTS tests are never NULL. ``x IS NOT 1`` is true for
    0 and NULL; AND/OR below it are monotone, so treating NULL as false only here is exact.
    """
    return f"({sql}) IS NOT 1"


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _json_forms(value: str) -> list[str]:
    """The two JSON spellings the catalog may have stored a string as (ASCII-escaped or not)."""
    return [json.dumps(value), json.dumps(value, ensure_ascii=False)]


def compile_filter(text: str) -> tuple[str, list[object]]:
    """Compile a filter into a SQL boolean expression over ``checkpoints c`` and its parameters.

    Use it as ``f"SELECT ... FROM checkpoints c WHERE {sql}"`` with ``params``. Empty or blank text
    matches everything (``"1"``). Raises :class:`QueryError` for anything outside the language.
    """
    _check_text(text, "filter")
    if not text.strip():
        return "1", []
    parser = _FilterParser(text, _tokenize(text))
    sql = parser.parse()
    return sql, parser.params


def compile_sort(text: str) -> tuple[str, list[object]]:
    """Compile ``-val_acc,step`` into an ``ORDER BY`` list (without the words) and its parameters.

    Each key sorts as ``x IS NULL, x [DESC]`` so missing values and NaN metrics come last in both
    directions on any SQLite (``NULLS LAST`` needs 3.30). Ties fall back to run and step, which is
    also the order of empty text, so results are deterministic.
    """
    _check_text(text, "sort")
    if not text.strip():
        return DEFAULT_SORT, []
    tokens = _tokenize(text)
    keys: list[str] = []
    params: list[object] = []
    i = 0
    while True:
        tok = tokens[i]
        descending = False
        if tok.kind == "sign":
            descending = tok.text == "-"
            i += 1
            tok = tokens[i]
        field = _field(tok, text)
        if len(keys) == MAX_SORT_KEYS:
            _fail(f"too many sort keys at column {tok.col} (at most {MAX_SORT_KEYS})", tok.col, text)
        if field.kind == "column":
            expr = field.sql
        else:
            expr = {"metric": _SORT_METRIC, "config": _SORT_CONFIG, "tag": _SORT_TAG}[field.kind]
            params += [field.key, field.key]
        if expr in _NOT_NULL_COLUMNS:
            keys.append(f"{expr}{' DESC' if descending else ''}")
        else:
            keys.append(f"{expr} IS NULL, {expr}{' DESC' if descending else ''}")
        i += 1
        sep = tokens[i]
        if sep.kind == "eof":
            break
        if sep.kind != ",":
            _fail(
                f"expected ',' between sort keys at column {sep.col}, found {_describe(sep)}", sep.col, text
            )
        i += 1
    return ", ".join([*keys, DEFAULT_SORT]), params


def single_metric_sort(text: str) -> tuple[str, bool] | None:
    """``(metric, descending)`` when the sort is exactly one metric key, else None.

    The catalog answers such a sort from the metrics (name, value) index in value order and stops at
    the limit, instead of computing the metric for every checkpoint and sorting them all.
    """
    if not text.strip():
        return None
    tokens = _tokenize(text)
    i = 0
    descending = False
    if tokens[0].kind == "sign":
        descending = tokens[0].text == "-"
        i = 1
    if tokens[i].kind == "eof" or tokens[i + 1].kind != "eof":
        return None
    field = _field(tokens[i], text)
    return (field.key, descending) if field.kind == "metric" else None
