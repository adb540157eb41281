"""The filter and sort language of ``ckptvault find ROOT 'val_acc > 0.9 and step >= 1000' --sort -val_acc``.

A filter compiles to a SQL boolean expression over the catalog's ``checkpoints`` table (alias ``c``)
plus a list of parameters. The text a user types never becomes SQL: every field name is looked up
in a fixed table of SQL fragments (or becomes a ``?`` parameter naming a metric, config key or
tag), every value is a ``?`` parameter, and the only SQL the language emits is the fixed fragments
of ``query_sql`` and ``query_filter``. Injection is therefore impossible by construction; on top of
that, text that *looks* like an injection attempt (``;``, ``--``, ``/*``, bare SQL words such as
``union`` or ``drop``) is rejected with a :class:`QueryError` that says where, because it is almost
certainly a mistake.

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

Layout: this module documents the language, compiles sorts and re-exports the public names;
``query_tokens`` holds the limits, :class:`QueryError` and the tokenizer, ``query_sql`` the fixed
SQL and field lookup, ``query_filter`` the filter parser (:func:`compile_filter`).
"""

from __future__ import annotations

from .query_filter import compile_filter
from .query_sql import DEFAULT_SORT, NOT_NULL_COLUMNS, SORT_CONFIG, SORT_METRIC, SORT_TAG, lookup_field
from .query_tokens import (
    MAX_COMPARISONS,
    MAX_DEPTH,
    MAX_SORT_KEYS,
    MAX_TEXT_LENGTH,
    QueryError,
    check_text,
    describe,
    fail,
    tokenize,
)

__all__ = [
    "DEFAULT_SORT",
    "MAX_COMPARISONS",
    "MAX_DEPTH",
    "MAX_SORT_KEYS",
    "MAX_TEXT_LENGTH",
    "QueryError",
    "compile_filter",
    "compile_sort",
    "single_metric_sort",
]


def compile_sort(text: str) -> tuple[str, list[object]]:
    """Compile ``-val_acc,step`` into an ``ORDER BY`` list (without the words) and its parameters.

    Each key sorts as ``x IS NULL, x [DESC]`` so missing values and NaN metrics come last in both
    directions on any SQLite (``NULLS LAST`` needs 3.30). Ties fall back to run and step, which is
    also the order of empty text, so results are deterministic.
    """
    check_text(text, "sort")
    if not text.strip():
        return DEFAULT_SORT, []
    tokens = tokenize(text)
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
        field = lookup_field(tok, text)
        if len(keys) == MAX_SORT_KEYS:
            fail(f"too many sort keys at column {tok.col} (at most {MAX_SORT_KEYS})", tok.col, text)
        if field.kind == "column":
            expr = field.sql
        else:
            expr = {"metric": SORT_METRIC, "config": SORT_CONFIG, "tag": SORT_TAG}[field.kind]
            params += [field.key, field.key]
        if expr in NOT_NULL_COLUMNS:
            keys.append(f"{expr}{' DESC' if descending else ''}")
        else:
            keys.append(f"{expr} IS NULL, {expr}{' DESC' if descending else ''}")
        i += 1
        sep = tokens[i]
        if sep.kind == "eof":
            break
        if sep.kind != ",":
            fail(f"expected ',' between sort keys at column {sep.col}, found {describe(sep)}", sep.col, text)
        i += 1
    return ", ".join([*keys, DEFAULT_SORT]), params


def single_metric_sort(text: str) -> tuple[str, bool] | None:
    """``(metric, descending)`` when the sort is exactly one metric key, else None.

    The catalog answers such a sort from the metrics (name, value) index in value order and stops at
    the limit, instead of computing the metric for every checkpoint and sorting them all.
    """
    if not text.strip():
        return None
    tokens = tokenize(text)
    i = 0
    descending = False
    if tokens[0].kind == "sign":
        descending = tokens[0].text == "-"
        i = 1
    if tokens[i].kind == "eof" or tokens[i + 1].kind != "eof":
        return None
    field = lookup_field(tokens[i], text)
    return (field.key, descending) if field.kind == "metric" else None
