"""The fixed SQL of the find language, and how a field name selects among it.

Split out of ``ckptvault.catalog.query``: everything here is the complete set of SQL fragments a
filter or sort can select by name (columns, EXISTS subqueries, sort subqueries), kept in one small
module so that "user text never becomes SQL" can be checked by reading it. User text only ever
selects among these constants or travels as a ``?`` parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from .query_tokens import KEYWORDS, SQL_WORDS, Token, describe, fail

DEFAULT_SORT: Final = "c.run_dir, c.step, c.name"  # the name makes ties deterministic

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

SQL_OPS: Final[dict[str, str]] = {
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
METRIC_EXISTS: Final = "c.id IN (SELECT m.checkpoint FROM metrics m WHERE m.name = ? AND {})"
CONFIG_EXISTS: Final = "c.id IN (SELECT g.checkpoint FROM config g WHERE g.key = ? AND {})"
TAG_EXISTS: Final = "c.id IN (SELECT t.checkpoint FROM tags t WHERE t.key = ? AND {})"
TAG_PRESENT: Final = "c.id IN (SELECT t.checkpoint FROM tags t WHERE t.key = ?)"
# A limited find sorted by one metric walks that metric's (name, value) index and stops at the limit;
# there the IN form would first materialise every checkpoint matching each condition (90 ms at
# 1,000,000 rows for 5 rows), while a correlated EXISTS costs one primary-key probe per walked row
# (docs/scaling.md: 77 ms -> 0.01 ms). The rewrite is textual over the constants above, which hold no
# user text (values are parameters); the parameters keep their order.
_CORRELATED: Final = tuple(
    (
        f"c.id IN (SELECT {a}.checkpoint FROM {table} {a} WHERE ",
        f"EXISTS (SELECT 1 FROM {table} {a} WHERE {a}.checkpoint = c.id AND ",
    )
    for table, a in (("metrics", "m"), ("config", "g"), ("tags", "t"))
)


def correlated(condition: str) -> str:
    """``condition`` (from ``compile_filter``) with its subqueries as correlated EXISTS (see above)."""
    for uncorrelated, probe in _CORRELATED:
        condition = condition.replace(uncorrelated, probe)
    return condition


# Columns declared NOT NULL sort without the "IS NULL" key, so their indexes can serve ORDER BY.
NOT_NULL_COLUMNS: Final = frozenset(
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
CONFIG_NOT_NULL: Final = "g.value IS NOT NULL AND g.value != 'null'"
CONFIG_IS_STRING: Final = "substr(g.value, 1, 1) = '\"'"

SORT_METRIC: Final = "(SELECT m.value FROM metrics m WHERE m.checkpoint = c.id AND m.name = ?)"
# Config keys sort by their number; text, booleans and JSON null sort with the missing (last).
SORT_CONFIG: Final = "(SELECT g.num FROM config g WHERE g.checkpoint = c.id AND g.key = ?)"
SORT_TAG: Final = "(SELECT t.value FROM tags t WHERE t.checkpoint = c.id AND t.key = ?)"

# --- fields ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
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


def lookup_field(tok: Token, text: str) -> Field:
    """Resolve a field token; keywords and bare SQL words are refused so pasted SQL fails loudly."""
    if tok.kind not in ("ident", "qident"):
        hint = "; values go on the right of an operator" if tok.kind in ("num", "str") else ""
        fail(f"expected a field name at column {tok.col}, found {describe(tok)}{hint}", tok.col, text)
    name = str(tok.value)
    if tok.kind == "ident":
        word = name.lower()
        if word in KEYWORDS:
            fail(f"expected a field name at column {tok.col}, found the keyword {tok.text!r}", tok.col, text)
        if word in SQL_WORDS:
            fail(
                f"{tok.text!r} at column {tok.col} is not a field; quote field names that are SQL words "
                f"with backquotes (`{tok.text}`)",
                tok.col,
                text,
            )
    if name in _BUILTINS:
        sql, numeric = _BUILTINS[name]
        return Field("column", name, sql=sql, numeric=numeric)
    for prefix, kind in _PREFIXES:
        if name.startswith(prefix):
            key = name[len(prefix) :]
            if not key:
                fail(f"{name!r} at column {tok.col} needs a key after the dot", tok.col, text)
            return Field(kind, name, key=key)
    return Field("metric", name, key=name)
