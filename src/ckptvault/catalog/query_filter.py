"""The find language's filter parser: text to a parameterised SQL boolean expression.

Split out of ``ckptvault.catalog.query`` (the grammar is documented there). The parser emits only
the constants of :mod:`ckptvault.catalog.query_sql` and the few operator fragments below; every
value and every metric, config or tag name travels as a ``?`` parameter.
"""

from __future__ import annotations

import json
from typing import NoReturn

from .query_sql import (
    CONFIG_EXISTS,
    CONFIG_IS_STRING,
    CONFIG_NOT_NULL,
    METRIC_EXISTS,
    SQL_OPS,
    TAG_EXISTS,
    TAG_PRESENT,
    Field,
    lookup_field,
)
from .query_tokens import (
    MAX_COMPARISONS,
    MAX_DEPTH,
    SQL_WORDS,
    Token,
    check_text,
    describe,
    fail,
    tokenize,
)

# --- filter parser -----------------------------------------------------------------------------
# A hand-written recursive-descent parser: the grammar is a dozen lines, and the point of the module
# is that it must never build SQL from user text, which is easiest to see (and to test) when every
# emitted fragment is a constant in query_sql.py or this file. A parser library would add a
# dependency and a grammar file for no gain.


class _FilterParser:
    def __init__(self, text: str, tokens: list[Token]) -> None:
        self.text = text
        self.tokens = tokens
        self.pos = 0
        self.params: list[object] = []
        self.comparisons = 0

    def fail(self, message: str, column: int | None) -> NoReturn:
        fail(message, column, self.text)

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self) -> Token:
        tok = self.peek()
        self.pos = min(self.pos + 1, len(self.tokens) - 1)
        return tok

    @staticmethod
    def is_word(tok: Token, *words: str) -> bool:
        return tok.kind == "ident" and tok.text.lower() in words

    def parse(self) -> str:
        sql = self.parse_or(0)
        tok = self.peek()
        if tok.kind != "eof":
            if tok.kind == "ident" and tok.text.lower() in SQL_WORDS:
                self.fail(
                    f"unexpected SQL word {tok.text!r} at column {tok.col}; "
                    "a filter combines comparisons with and, or, not",
                    tok.col,
                )
            self.fail(
                f"unexpected {describe(tok)} at column {tok.col}; expected 'and', 'or' or the end", tok.col
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

    def deeper(self, depth: int, tok: Token) -> int:
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
                    f"found {describe(close)}",
                    close.col,
                )
            return f"({inner})"
        field = lookup_field(self.take(), self.text)
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
        if op.kind == "ident" and op.text.lower() in SQL_WORDS:
            self.fail(
                f"{op.text!r} at column {op.col} is not an operator here; "
                "use = != < <= > >= ~, in (...), or is [not] null",
                op.col,
            )
        self.fail(
            f"expected an operator after {field.name!r} at column {op.col}, found {describe(op)}; "
            "use = != < <= > >= ~, in (...), or is [not] null",
            op.col,
        )

    def count(self, tok: Token) -> None:
        self.comparisons += 1
        if self.comparisons > MAX_COMPARISONS:
            self.fail(f"too many comparisons at column {tok.col} (at most {MAX_COMPARISONS})", tok.col)

    def value(self, tok: Token) -> object:
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
        self.fail(f"expected a value at column {tok.col}, found {describe(tok)}{hint}", tok.col)

    def check_value(self, field: Field, op: str, val: object, tok: Token) -> None:
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

    def compare(self, field: Field, op_tok: Token, tok: Token) -> str:
        self.count(op_tok)
        val = self.value(tok)
        op = op_tok.text
        self.check_value(field, op, val, tok)
        sql_op = SQL_OPS[op]
        if field.kind == "column":
            self.params.append(int(val) if isinstance(val, bool) else val)
            return f"{field.sql} {sql_op} ?"
        self.params.append(field.key)
        if field.kind == "metric":
            self.params.append(int(val) if isinstance(val, bool) else val)
            return METRIC_EXISTS.format(f"m.value {sql_op} ?")
        if field.kind == "tag":
            self.params.append(val)
            return TAG_EXISTS.format(f"t.value {sql_op} ?")
        # config
        if isinstance(val, bool):
            self.params.append("true" if val else "false")
            return CONFIG_EXISTS.format(f"g.value {sql_op} ?")
        if not isinstance(val, str):
            self.params.append(val)
            return CONFIG_EXISTS.format(f"g.num {sql_op} ?")
        if op == "~":
            # json.dumps keeps glob metacharacters (* ? [ ]) and quotes the pattern as the JSON text is.
            self.params += _json_forms(val)
            return CONFIG_EXISTS.format("(g.value GLOB ? OR g.value GLOB ?)")
        if op in ("=", "==", "!="):
            self.params += _json_forms(val)
            return CONFIG_EXISTS.format(f"g.value {'NOT IN' if op == '!=' else 'IN'} (?, ?)")
        self.params.append(json.dumps(val, ensure_ascii=False))
        return CONFIG_EXISTS.format(f"{CONFIG_IS_STRING} AND g.value {sql_op} ?")

    def in_list(self, field: Field) -> str:
        open_tok = self.take()
        if open_tok.kind != "(":
            self.fail(
                f"expected '(' after 'in' at column {open_tok.col}, found {describe(open_tok)}", open_tok.col
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
                    f"expected ',' or ')' in the list at column {sep.col}, found {describe(sep)}", sep.col
                )
        if field.kind == "column":
            self.params += [int(v) if isinstance(v, bool) else v for v in values]
            return f"{field.sql} IN ({_marks(len(values))})"
        self.params.append(field.key)
        if field.kind == "metric":
            self.params += [int(v) if isinstance(v, bool) else v for v in values]
            return METRIC_EXISTS.format(f"m.value IN ({_marks(len(values))})")
        if field.kind == "tag":
            self.params += values
            return TAG_EXISTS.format(f"t.value IN ({_marks(len(values))})")
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
        return CONFIG_EXISTS.format("(" + " OR ".join(conds) + ")")

    def is_null(self, field: Field, is_tok: Token) -> str:
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
            sql = METRIC_EXISTS.format("m.value IS NULL")
            return f"NOT {sql}" if negate else sql
        if not self.is_word(what, "null"):
            self.fail(f"expected 'null' or 'nan' at column {what.col}, found {describe(what)}", what.col)
        if field.kind == "column":
            return f"{field.sql} IS {'NOT ' if negate else ''}NULL"
        self.params.append(field.key)
        if field.kind == "metric":
            sql = METRIC_EXISTS.format("m.value IS NOT NULL")
        elif field.kind == "config":
            sql = CONFIG_EXISTS.format(CONFIG_NOT_NULL)
        else:
            sql = TAG_PRESENT
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
    check_text(text, "filter")
    if not text.strip():
        return "1", []
    parser = _FilterParser(text, tokenize(text))
    sql = parser.parse()
    return sql, parser.params
