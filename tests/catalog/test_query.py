"""The find language: filters and sorts run against a real SQLite catalog built from schema.sql.

Every filter is executed, not just compiled, so the tests check what users see (which checkpoints
match) and that SQLite accepts every expression the compiler emits. Injection attempts must fail
with QueryError *and* leave the database as it was.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptvault.catalog import query as query_module
from ckptvault.catalog.query import (
    MAX_COMPARISONS,
    MAX_DEPTH,
    MAX_TEXT_LENGTH,
    QueryError,
    compile_filter,
    compile_sort,
)
from ckptvault.errors import CheckpointError

SCHEMA = Path(query_module.__file__).with_name("schema.sql")
NAN = math.nan

_A_CONFIG = {"lr": 0.001, "optimizer": {"name": "adam", "betas": [0.9, 0.99]}, "amp": True, "batch": 32}
_B_CONFIG = {"lr": 0.01, "optimizer": {"name": "sgd"}, "amp": False, "batch": 64}

# label, run_dir, step, epoch, scope, created_at, size, run_id, git, level, passed, metrics, config, tags
ROWS: list[tuple[Any, ...]] = [
    ("a100", "runs/a", 100, 0, "train", "2026-10-30T12:00:00Z", 1000, "a", "abc1234", "checksum", 1,
     {"val_acc": 0.5, "loss": 2.0}, _A_CONFIG, {}),
    ("a1000", "runs/a", 1000, 1, "train", "2026-11-01T08:00:00Z", 2000, "a", "abc1234", "full", 1,
     {"val_acc": 0.91, "loss": 1.0}, _A_CONFIG, {"best": "yes"}),
    ("a2000", "runs/a", 2000, 2, "train", "2026-11-02T09:30:00Z", 2000, "a", "abc1234", "full", 0,
     {"val_acc": 0.95, "loss": NAN}, _A_CONFIG, {"stage": "final"}),
    ("a3000", "runs/a", 3000, 3, None, "2026-11-03T00:00:00Z", 3000, "a", "abc1234", None, None,
     {"loss": 0.5}, _A_CONFIG, {}),
    ("b500", "runs/b", 500, None, "eval", "2026-10-15T00:00:00Z", 500, "b", "abd9999", "checksum", 1,
     {"val_acc": 0.92, "loss": 0.7}, _B_CONFIG, {"stage": "warmup"}),
    ("b1500", "runs/b", 1500, None, "train", "2026-11-05T00:00:00Z", 1500, "b", "abd9999", None, None,
     {"val_acc": 0.88, "loss": 0.6}, _B_CONFIG, {}),
    ("b2500", "runs/b", 2500, None, "train", "2026-10-20T00:00:00Z", 2500, "b", "abd9999", None, None,
     {"val_acc": NAN, "loss": NAN}, _B_CONFIG, {}),
    ("c1000", "exp/c", 1000, None, "train", "2026-12-01T00:00:00Z", 1000, None, "f00ba47", None, None,
     {"val_acc": 0.97}, {"lr": 0.001, "optimizer": {"name": 'adam "w"'}, "note": "héllo"},
     {"best": "yes", "owner": "o'brien"}),
    ("c4000", "exp/c", 4000, None, "train", "2026-12-02T00:00:00Z", 4000, None, "f00ba47", None, None,
     {"val/acc-top5": 0.99, "select": 1.0, "step": 7.0}, {}, {}),
    ("d10", "exp/d", 10, None, None, "2026-09-01T00:00:00Z", 10, None, None, None, None,
     {"val_acc": 0.1}, {"lr": "1e-3"}, {}),
    ("d20", "exp/d", 20, None, None, "2026-09-02T00:00:00Z", 20, None, None, None, None,
     {"val_acc": 0.99}, {"lr": None}, {}),
    ("d30", "exp/d", 30, None, None, "2026-09-03T00:00:00Z", 30, None, None, None, None,
     {"val_acc": 0.3}, {}, {"note": "a*b"}),
]  # fmt: skip
ALL = {row[0] for row in ROWS}


def _flatten(config: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _make_db() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA.read_text())
    for cid, row in enumerate(ROWS, start=1):
        label, run_dir, step, epoch, scope, created, size, run_id, git, level, passed, metrics, cfg, tags = (
            row
        )
        db.execute(
            "INSERT INTO checkpoints (id, path, run_dir, name, checkpoint_id, step, epoch, scope, created_at,"
            " size_bytes, tensor_bytes, num_tensors, run_id, git_commit, config_json, validation_level,"
            f" validation_passed, manifest_mtime_ns) VALUES ({', '.join('?' * 18)})",
            (
                cid, f"{run_dir}/step-{step:06d}", run_dir, f"step-{step:06d}", f"ck-{label}", step, epoch,
                scope, created, size, size * 4 // 5, 3, run_id, git, json.dumps(cfg), level, passed, 0,
            ),
        )  # fmt: skip
        for name, value in metrics.items():
            db.execute(
                "INSERT INTO metrics VALUES (?, ?, ?)", (cid, name, None if math.isnan(value) else value)
            )
        for key, value in _flatten(cfg):
            # The catalog's encoding: JSON text (json.dumps defaults, so "é" is stored as \u00e9);
            # num only for real numbers (not booleans).
            num = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            db.execute("INSERT INTO config VALUES (?, ?, ?, ?)", (cid, key, json.dumps(value), num))
        for key, value in tags.items():
            db.execute("INSERT INTO tags VALUES (?, ?, ?)", (cid, key, value))
    db.commit()
    return db


LABELS = {cid: row[0] for cid, row in enumerate(ROWS, start=1)}


@pytest.fixture(scope="module")
def db() -> Iterator[sqlite3.Connection]:
    conn = _make_db()
    yield conn
    conn.close()


def find(db: sqlite3.Connection, text: str) -> set[str]:
    sql, params = compile_filter(text)
    return {LABELS[cid] for (cid,) in db.execute(f"SELECT c.id FROM checkpoints c WHERE {sql}", params)}


def ordered(db: sqlite3.Connection, sort: str, text: str = "") -> list[str]:
    where, wparams = compile_filter(text)
    order, oparams = compile_sort(sort)
    rows = db.execute(f"SELECT c.id FROM checkpoints c WHERE {where} ORDER BY {order}", [*wparams, *oparams])
    return [LABELS[cid] for (cid,) in rows]


def snapshot(db: sqlite3.Connection) -> list[Any]:
    tables = db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    counts = [
        db.execute(f"SELECT count(*) FROM {t}").fetchone()
        for t in ("checkpoints", "metrics", "config", "tags")
    ]
    return [tables, counts, db.execute("SELECT * FROM checkpoints ORDER BY id").fetchall()]


# --- matching --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ALL),
        ("   \t\n", ALL),
        ("val_acc > 0.9", {"a1000", "a2000", "b500", "c1000", "d20"}),
        ("val_acc > 0.9 and step >= 1000", {"a1000", "a2000", "c1000"}),
        ("loss <= 1", {"a1000", "a3000", "b500", "b1500"}),
        ("loss != 2", {"a1000", "a3000", "b500", "b1500"}),  # NaN is no value: never equal or unequal
        ("loss < 1e0 and loss > 5e-1", {"b500", "b1500"}),
        ("loss is nan", {"a2000", "b2500"}),
        ("loss is not nan", ALL - {"a2000", "b2500"}),
        ("val_acc is null", {"a3000", "b2500", "c4000"}),  # missing or NaN
        ("val_acc is not null", ALL - {"a3000", "b2500", "c4000"}),
        ("val_acc in (0.5, 0.88)", {"a100", "b1500"}),
        ("val_acc not in (0.5, 0.88)", ALL - {"a100", "b1500"}),
        ("val_acc > -1 and val_acc < .2", {"d10"}),
        ("`val/acc-top5` >= 0.99", {"c4000"}),
        ("metric.step = 7", {"c4000"}),
        ("metrics.step == 7.0", {"c4000"}),
        ("`select` = true", {"c4000"}),  # an SQL word as a metric name, backquoted
        ("`step` = 7", set()),  # backquotes change tokenizing only: still the built-in step
    ],
)
def test_metrics(db: sqlite3.Connection, text: str, expected: set[str]) -> None:
    assert find(db, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("step = 1000", {"a1000", "c1000"}),
        ("step == 1000", {"a1000", "c1000"}),
        ("step in (10, 20, 4000)", {"d10", "d20", "c4000"}),
        ("epoch >= 2", {"a2000", "a3000"}),
        ("epoch is null", ALL - {"a100", "a1000", "a2000", "a3000"}),
        ("scope = 'eval'", {"b500"}),
        ('scope = "eval"', {"b500"}),
        ("scope is null", {"a3000", "d10", "d20", "d30"}),
        ("run = 'runs/b'", {"b500", "b1500", "b2500"}),
        ("run ~ 'exp/*'", {"c1000", "c4000", "d10", "d20", "d30"}),
        ("run_id is null", {"c1000", "c4000", "d10", "d20", "d30"}),
        ("run_id in ('a', 'b') and step < 600", {"a100", "b500"}),
        ("name = 'step-000030'", {"d30"}),
        ("path = 'runs/a/step-000100'", {"a100"}),
        ("checkpoint_id = 'ck-b500'", {"b500"}),
        ("git ~ 'abc*'", {"a100", "a1000", "a2000", "a3000"}),
        ("git ~ 'ab?9*'", {"b500", "b1500", "b2500"}),
        ("git is null", {"d10", "d20", "d30"}),
        ("created > '2026-11-01'", {"a1000", "a2000", "a3000", "b1500", "c1000", "c4000"}),
        ("created < '2026-10-01'", {"d10", "d20", "d30"}),
        ("created >= '2026-11-01T08:00:00Z' and created <= '2026-11-02'", {"a1000"}),
        ("created ~ '2026-11-0[12]*'", {"a1000", "a2000"}),
        ("valid = true", {"a100", "a1000", "b500"}),
        ("valid = FALSE", {"a2000"}),
        ("valid is null", ALL - {"a100", "a1000", "a2000", "b500"}),
        ("validation = 'full'", {"a1000", "a2000"}),
        ("size > 2000", {"a3000", "b2500", "c4000"}),
        ("tensor_bytes = 1600 and num_tensors = 3", {"a1000", "a2000"}),
    ],
)
def test_builtins(db: sqlite3.Connection, text: str, expected: set[str]) -> None:
    assert find(db, text) == expected


A_RUN = {"a100", "a1000", "a2000", "a3000"}
B_RUN = {"b500", "b1500", "b2500"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("config.lr = 0.001", A_RUN | {"c1000"}),
        ("config.lr < 0.005", A_RUN | {"c1000"}),
        ("config.lr = '1e-3'", {"d10"}),  # a string stays a string
        ("config.lr is null", {"c4000", "d20", "d30"}),  # missing, or JSON null
        ("config.lr is not null", ALL - {"c4000", "d20", "d30"}),
        ("config.optimizer.name = 'adam'", A_RUN),
        ("config.optimizer.name = 'adam \"w\"'", {"c1000"}),  # quotes inside JSON text
        ("config.optimizer.name ~ 'adam*'", A_RUN | {"c1000"}),
        ("config.optimizer.name != 'adam'", B_RUN | {"c1000"}),
        ("config.optimizer.name in ('sgd', 'adam')", A_RUN | B_RUN),
        ("config.optimizer.name > 'b'", B_RUN),  # text orders among text values only
        ("config.lr > ''", {"d10"}),  # ... so numbers are not "greater than" text
        ("config.amp = true", A_RUN),
        ("config.amp = False", B_RUN),
        ("config.amp != true", B_RUN),
        ("config.note = 'héllo'", {"c1000"}),  # stored ASCII-escaped as "h\u00e9llo"
        ("config.note ~ 'h*llo'", {"c1000"}),
        ("config.batch >= 64", B_RUN),
        ("config.batch in (32, 64) and not config.amp = true", B_RUN),
        ("config.optimizer.betas is not null", A_RUN),
        ("config.missing = 1", set()),
    ],
)
def test_config(db: sqlite3.Connection, text: str, expected: set[str]) -> None:
    assert find(db, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tag.best = 'yes'", {"a1000", "c1000"}),
        ("tags.stage in ('final', 'warmup')", {"a2000", "b500"}),
        ("tag.best is not null", {"a1000", "c1000"}),
        ("tag.best is null", ALL - {"a1000", "c1000"}),
        ("tag.owner = 'o\\'brien'", {"c1000"}),
        ('tag.owner = "o\'brien"', {"c1000"}),
        ("tag.note ~ 'a[*]b'", {"d30"}),
        ("tag.note ~ 'a?b'", {"d30"}),
        ("tag.stage != 'final'", {"b500"}),
    ],
)
def test_tags(db: sqlite3.Connection, text: str, expected: set[str]) -> None:
    assert find(db, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # and binds tighter than or; parentheses override
        ("step = 100 or step = 500 and scope = 'eval'", {"a100", "b500"}),
        ("(step = 100 or step = 500) and scope = 'eval'", {"b500"}),
        ("step = 500 and scope = 'eval' or step = 100", {"a100", "b500"}),
        # not binds tighter than and
        ("not step = 100 and run = 'runs/a'", {"a1000", "a2000", "a3000"}),
        ("not (step = 100 and run = 'runs/a')", ALL - {"a100"}),
        ("not not step = 100", {"a100"}),
        ("not val_acc > 0.9", ALL - {"a1000", "a2000", "b500", "c1000", "d20"}),  # includes missing
        ("((((step = 10))))", {"d10"}),
        ("step = 10 or (step = 20 or (step = 30 and not valid = true))", {"d10", "d20", "d30"}),
        # keywords are case-insensitive
        ("step = 100 OR step = 500 AND scope = 'eval'", {"a100", "b500"}),
        ("NOT step In (100, 500) And run Is Not Null and run = 'runs/b'", {"b1500", "b2500"}),
    ],
)
def test_boolean_structure(db: sqlite3.Connection, text: str, expected: set[str]) -> None:
    assert find(db, text) == expected


def test_empty_filter_is_true() -> None:
    assert compile_filter("") == ("1", [])
    assert compile_filter("  \n ") == ("1", [])


def test_values_are_parameters_not_sql() -> None:
    sql, params = compile_filter("val_acc > 0.9 and name = 'zq_x' and config.zq_key ~ 'zq*' and tag.zq = 'v'")
    assert "zq" not in sql and "0.9" not in sql
    assert params == ["val_acc", 0.9, "zq_x", "zq_key", '"zq*"', '"zq*"', "zq", "v"]


def test_numbers() -> None:
    assert compile_filter("step > -5")[1] == [-5]
    assert compile_filter("x > 1e-3")[1] == ["x", 0.001]
    assert compile_filter("x > +2.5E2")[1] == ["x", 250.0]
    assert compile_filter("x > 5.")[1] == ["x", 5.0]
    assert compile_filter("x > 99999999999999999999")[1] == ["x", 1e20]  # past int64: a float
    assert compile_filter("x = 1e999")[1] == ["x", math.inf]


# --- sorting ---------------------------------------------------------------------------------


def test_sort_default() -> None:
    assert compile_sort("") == ("c.run_dir, c.step, c.name", [])
    assert compile_sort("  ") == ("c.run_dir, c.step, c.name", [])


def test_sort_metric_desc_nulls_last(db: sqlite3.Connection) -> None:
    expected = ["d20", "c1000", "a2000", "b500", "a1000", "b1500", "a100", "d30", "d10"]
    # no value (missing or NaN) last, ties in run/step order
    assert ordered(db, "-val_acc") == [*expected, "c4000", "a3000", "b2500"]


def test_sort_metric_asc_nulls_last(db: sqlite3.Connection) -> None:
    expected = ["d10", "d30", "a100", "b1500", "a1000", "b500", "a2000", "c1000", "d20"]
    assert ordered(db, "val_acc") == [*expected, "c4000", "a3000", "b2500"]
    assert ordered(db, "+val_acc") == ordered(db, "metric.val_acc")


def test_sort_multi_key(db: sqlite3.Connection) -> None:
    assert ordered(db, "run, -step") == [
        "c4000", "c1000", "d30", "d20", "d10", "a3000", "a2000", "a1000", "a100", "b2500", "b1500", "b500",
    ]  # fmt: skip
    assert ordered(db, "-scope, step", "step < 1600") == [
        "a100", "c1000", "a1000", "b1500", "b500", "d10", "d20", "d30",  # train, eval, NULL; ties by run
    ]  # fmt: skip


def test_sort_config_tag_and_filter(db: sqlite3.Connection) -> None:
    # config sorts by its number: text ("1e-3") and JSON null sort as missing
    assert ordered(db, "-config.lr, -step", "step >= 1000 or run = 'exp/d'") == [
        "b2500", "b1500", "a3000", "a2000", "c1000", "a1000", "c4000", "d30", "d20", "d10",
    ]  # fmt: skip
    assert ordered(db, "tags.stage")[:2] == ["a2000", "b500"]
    assert ordered(db, "-`val/acc-top5`")[0] == "c4000"


def test_sort_parameters_repeat_for_null_test() -> None:
    sql, params = compile_sort("-val_acc,step")
    assert sql.count("?") == len(params) == 2
    assert sql.endswith("c.run_dir, c.step, c.name")
    assert "DESC" in sql and "val_acc" not in sql


@pytest.mark.parametrize(
    "text",
    [
        "val_acc desc",
        "drop",
        "-",
        "a,,b",
        "a,",
        "1",
        "-1",
        "x; y",
        "a -- b",
        "`a",
        "select, step",
        "a b",
        "(a)",
    ],
)
def test_sort_errors(text: str) -> None:
    with pytest.raises(QueryError):
        compile_sort(text)


def test_sort_key_limit() -> None:
    compile_sort(",".join(["step"] * 32))
    with pytest.raises(QueryError, match="too many sort keys"):
        compile_sort(",".join(["step"] * 33))


# --- errors and injection --------------------------------------------------------------------


INJECTIONS = [
    "val_acc > 0.9; DROP TABLE checkpoints",
    "step = 1 or 1=1 --",
    "step = 1 or 1=1",
    "name = 'x' union select",
    "name = 'x' UNION SELECT path FROM checkpoints",
    "' or ''='",
    '" or ""="',
    "name = 'x",
    'name = "x',
    "`abc = 1",
    "name = 'x' /* comment */",
    "step = 1 */",
    "DROP TABLE checkpoints",
    "select * from checkpoints",
    "step in (select step from checkpoints)",
    "step = 1; pragma writable_schema = 1",
    "attach database 'x' as y",
    "step = ?",
    "step = :x",
    "step = @x",
    "step = $x",
    "step = 0x10",
    "step = 1) or (1 = 1",
    "x is not null union all select 1",
    "name = 'a' || 'b'",
    "step like 1",
    "exec xp_cmdshell",
    "load_extension('evil')",
    "step = 1 or drop = 1",
    "name = 'it\\'s",
    "tag.x = 'a\\q'",
    "x = 1 #",
]


@pytest.mark.parametrize("text", INJECTIONS)
def test_injection_attempts_are_rejected(db: sqlite3.Connection, text: str) -> None:
    before = snapshot(db)
    with pytest.raises(QueryError):
        compile_filter(text)
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "text",
    [
        "`x' or '1'='1` > 0",
        "`a'); DROP TABLE checkpoints; --` > 0",
        '`" OR 1=1 --` is not null',
        "`select * from checkpoints` = 1",
    ],
)
def test_backquoted_names_are_only_names(db: sqlite3.Connection, text: str) -> None:
    before = snapshot(db)
    assert find(db, text) == set()
    assert snapshot(db) == before


def test_sql_inside_strings_is_only_text(db: sqlite3.Connection) -> None:
    before = snapshot(db)
    assert find(db, "name = '\\'; DROP TABLE checkpoints; --'") == set()
    assert find(db, "name = \"x' OR '1'='1\" or tag.best = '/* */'") == set()
    assert find(db, "`config.x' OR 1=1` = 1") == set()  # backquotes around the whole field name
    assert snapshot(db) == before


@pytest.mark.parametrize(
    ("text", "message", "column"),
    [
        ("val_acc > 0.9; DROP TABLE checkpoints", "unexpected ';' at column 14", 14),
        (
            "drop > 1",
            "'drop' at column 1 is not a field; quote field names that are SQL words with backquotes",
            1,
        ),
        ("step = 1 or 1=1 --", "comment marker '--' at column 17", 17),
        ("name = 'x' union select", "unexpected SQL word 'union' at column 12", 12),
        ("name = 'abc", "unterminated string starting at column 8", 8),
        ("(step = 1", "expected ')' at column 10 to close the '(' at column 1", 10),
        ("step = 1)", "unexpected ')' at column 9", 9),
        ("x = null", "use 'is null'", 5),
        ("step = 'ten'", "step is a number", 8),
        ("name = 3", "name is text; quote the value", 8),
        ("loss ~ 'a*'", "'~' (glob) needs a text field", 8),
        ("val_acc > 'high'", "metric 'val_acc' is a number", 11),
        ("tag.best = 1", "tag.best is text", 12),
        ("config.lr ~ 1", "'~' (glob) needs a text pattern", 13),
        ("config.amp > true", "true/false only compare with = or !=", 14),
        ("step is nan", "only metrics can be nan", 9),
        ("step is 1", "expected 'null' or 'nan'", 9),
        ("x in ()", "needs at least one value", 7),
        ("x in 1", "expected '(' after 'in'", 6),
        ("x in (1 2)", "expected ',' or ')'", 9),
        ("x > 1e", "malformed number '1e'", 5),
        ("x > 1 y", "unexpected 'y' at column 7", 7),
        ("and x > 1", "found the keyword 'and'", 1),
        ("x >", "expected a value at column 4, found the end of the text", 4),
        ("x", "expected an operator after 'x'", 2),
        ("x > y", "expected a value at column 5", 5),
        ("config. = 1", "needs a key after the dot", 1),
        ("``", "empty", 1),
        ("x = 'a\\z'", "unknown escape", 7),
        ("x ! 1", "unexpected '!' at column 3", 3),
    ],
)
def test_error_messages_point_at_the_column(text: str, message: str, column: int) -> None:
    with pytest.raises(QueryError) as info:
        compile_filter(text)
    assert message in str(info.value)
    assert info.value.column == column
    assert info.value.text == text
    assert info.value.pointer().splitlines()[1] == " " * (column - 1) + "^"
    assert isinstance(info.value, CheckpointError)


def test_lone_surrogate_is_a_query_error() -> None:
    with pytest.raises(QueryError, match="not valid Unicode at column 9"):
        compile_filter("name = '\ud800'")


# --- limits ----------------------------------------------------------------------------------


def test_length_limit(db: sqlite3.Connection) -> None:
    ok = "step = 10" + " " * (MAX_TEXT_LENGTH - 9)
    assert find(db, ok) == {"d10"}
    with pytest.raises(QueryError, match="too long"):
        compile_filter(ok + " ")
    with pytest.raises(QueryError, match="too long"):
        compile_sort("a" * (MAX_TEXT_LENGTH + 1))


def test_depth_limit(db: sqlite3.Connection) -> None:
    assert find(db, "(" * MAX_DEPTH + "step = 10" + ")" * MAX_DEPTH) == {"d10"}
    assert find(db, "not " * MAX_DEPTH + "step = 10") == {"d10"}
    assert find(db, "(not " * (MAX_DEPTH // 2) + "step = 10" + ")" * (MAX_DEPTH // 2)) == {"d10"}
    with pytest.raises(QueryError, match="nests too deeply"):
        compile_filter("(" * (MAX_DEPTH + 1) + "step = 10" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(QueryError, match="nests too deeply"):
        compile_filter("not " * (MAX_DEPTH + 1) + "step = 10")
    with pytest.raises(QueryError, match="nests too deeply"):
        compile_filter("(" * 2000)


def test_comparison_limit(db: sqlite3.Connection) -> None:
    # the worst case for parameters and expression depth still runs: 256 config text comparisons
    many = "or ".join(f"config.o='{i % 10}'" for i in range(MAX_COMPARISONS - 1))
    assert find(db, many + " or step = 10") == {"d10"}
    values = ", ".join(str(i) for i in range(MAX_COMPARISONS))
    assert find(db, f"step in ({values})") == {"d10", "d20", "d30", "a100"}
    with pytest.raises(QueryError, match="too many comparisons"):
        compile_filter(many + " or step = 10 or step = 20")
    with pytest.raises(QueryError, match="too many comparisons"):
        compile_filter(f"step in ({values}, 999)")


# --- property: anything either compiles and runs, or is a QueryError ---------------------------

_FRAGMENTS = [
    "step", "val_acc", "loss", "config.lr", "config.optimizer.name", "config.amp", "tag.best", "tags.stage",
    "created", "git", "valid", "name", "metric.step", "`select`", "`a'b`", "run",
    "=", "==", "!=", "<", "<=", ">", ">=", "~", "in", "not", "is", "null", "nan", "and", "or",
    "(", ")", ",", "1", "-2.5", "1e-3", "0", "'adam'", "'2026-11-01'", "'a*'", '"x"', "true", "false",
    ";", "--", "/*", "'", "`", "union", "select", "drop", "-", "+", "?", "\\",
]  # fmt: skip
_FIELDS = st.sampled_from(
    ["step", "val_acc", "loss", "config.lr", "config.optimizer.name", "config.amp", "tag.best", "created",
     "git", "valid", "name", "metric.step", "`select`", "`a'b`", "scope"]
)  # fmt: skip
_VALUES = st.one_of(
    st.sampled_from(["1", "-2.5", "1e-3", "0", "true", "false", "'adam'", "'2026-11-01'", "'a*'", '"x"']),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False).map(repr).filter(lambda r: "inf" not in r),
    st.text(max_size=6).map(lambda t: "'" + t.replace("\\", "\\\\").replace("'", "\\'") + "'"),
)
_ATOMS = st.one_of(
    st.tuples(_FIELDS, st.sampled_from(["=", "==", "!=", "<", "<=", ">", ">=", "~"]), _VALUES).map(" ".join),
    st.tuples(_FIELDS, st.sampled_from(["in", "not in"]), st.lists(_VALUES, min_size=1, max_size=4)).map(
        lambda t: f"{t[0]} {t[1]} ({', '.join(t[2])})"
    ),
    st.tuples(_FIELDS, st.sampled_from(["is null", "is not null", "is nan", "is not nan"])).map(" ".join),
)
# Grammatical filters (some with type errors), so the property also covers deep valid expressions.
_EXPRESSIONS = st.recursive(
    _ATOMS,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["and", "or", "AND", "Or"]), inner).map(" ".join),
        inner.map(lambda e: f"not {e}"),
        inner.map(lambda e: f"({e})"),
    ),
    max_leaves=12,
)
_SORT_FRAGMENTS = ["step", "-val_acc", "+loss", "config.lr", "tag.best", "`x y`", ",", "-", "desc", "1", ";"]


def _run_or_query_error(db: sqlite3.Connection, text: str, sort: str) -> None:
    try:
        where, wparams = compile_filter(text)
    except QueryError:
        where, wparams = "1", []
    try:
        order, oparams = compile_sort(sort)
    except QueryError:
        order, oparams = "c.id", []
    rows = db.execute(f"SELECT c.id FROM checkpoints c WHERE {where} ORDER BY {order}", [*wparams, *oparams])
    assert {cid for (cid,) in rows} <= set(LABELS)


@settings(max_examples=400, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=80),
        st.lists(st.sampled_from(_FRAGMENTS), max_size=25).map(" ".join),
        st.lists(st.sampled_from(_FRAGMENTS), max_size=25).map("".join),
        _EXPRESSIONS,
    ),
    sort=st.one_of(st.text(max_size=30), st.lists(st.sampled_from(_SORT_FRAGMENTS), max_size=8).map("".join)),
)
def test_arbitrary_text_compiles_and_runs_or_is_a_query_error(
    db: sqlite3.Connection, text: str, sort: str
) -> None:
    _run_or_query_error(db, text, sort)


_NAMES = st.from_regex(r"zq[a-z0-9_]{0,8}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    names=st.lists(_NAMES, min_size=1, max_size=6),
    strings=st.lists(st.text(max_size=12), min_size=1, max_size=6),
    ops=st.lists(st.sampled_from(["=", "!=", "<", ">=", "~"]), min_size=1, max_size=6),
    joins=st.lists(st.sampled_from(["and", "or", "and not"]), min_size=6, max_size=6),
)
def test_user_text_never_reaches_sql(
    db: sqlite3.Connection, names: list[str], strings: list[str], ops: list[str], joins: list[str]
) -> None:
    parts = []
    for i, name in enumerate(names):
        s = strings[i % len(strings)]
        quoted = "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"
        kind = ("tag.", "config.", "`", "")[i % 4]
        if kind == "`":
            parts.append(f"`{name}{s.replace(chr(92), '').replace('`', '')}` > 1")
        elif kind:
            parts.append(f"{kind}{name} {ops[i % len(ops)]} {quoted}")
        else:
            parts.append(f"{name} >= 1 and name {ops[i % len(ops)]} {quoted}")
    text = parts[0] + "".join(f" {joins[i]} {p}" for i, p in enumerate(parts[1:]))
    before = snapshot(db)
    sql, params = compile_filter(text)
    assert "zq" not in sql
    assert sql.count("?") == len(params)
    assert all(isinstance(p, (int, float, str)) for p in params)
    db.execute(f"SELECT c.id FROM checkpoints c WHERE {sql}", params).fetchall()
    assert snapshot(db) == before
