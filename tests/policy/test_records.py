"""The shared pieces of the policy layer: metric reading, comparison, durations, the public surface."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

import ckptvault.policy as policy
from ckptvault.policy.records import (
    CheckpointRecord,
    best_first,
    best_of,
    format_duration,
    is_better,
    metric_value,
)

POLICY_DIR = Path(policy.__file__).parent
ALLOWED_CKPTVAULT_MODULES = {"ckptvault.errors", "ckptvault.types", "ckptvault.config"}


def test_metric_value_reads_numbers_only():
    metrics: dict[str, object] = {"a": 1, "b": 2.5, "c": True, "d": "3", "e": float("nan"), "f": float("inf")}
    assert metric_value(metrics, "a") == 1.0
    assert metric_value(metrics, "b") == 2.5
    assert metric_value(metrics, "c") is None  # bool is not a number here
    assert metric_value(metrics, "d") is None
    assert metric_value(metrics, "e") is None  # NaN can be neither ranked nor improve
    assert metric_value(metrics, "f") == math.inf
    assert metric_value(metrics, "missing") is None


@pytest.mark.parametrize(
    ("candidate", "reference", "mode", "expected"),
    [
        (1.0, None, "min", True),
        (1.0, 2.0, "min", True),
        (2.0, 2.0, "min", False),
        (3.0, 2.0, "min", False),
        (3.0, 2.0, "max", True),
        (2.0, 2.0, "max", False),
        (float("nan"), None, "min", False),
        (float("nan"), 1.0, "max", False),
    ],
)
def test_is_better_is_strict(candidate, reference, mode, expected):
    assert is_better(candidate, reference, mode) is expected


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (3600, "1h"),
        (600, "10m"),
        (86400, "1d"),
        (172800, "2d"),
        (5400, "90m"),
        (90, "90s"),
        (1.5, "1.5s"),
        (5, "5s"),
        (1314.534, "1315s"),
        (412.3, "412s"),
        (0.25, "0.25s"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_record_newness_orders_by_step_then_time_then_name():
    a = CheckpointRecord("a", 5, 0, 10.0, "full", {})
    b = CheckpointRecord("b", 5, 0, 10.0, "full", {})
    c = CheckpointRecord("c", 5, 0, 9.0, "full", {})
    d = CheckpointRecord("d", 4, 0, 99.0, "full", {})
    assert sorted([a, b, c, d], key=CheckpointRecord.newness) == [d, c, a, b]


def test_exported_members_are_pinned():
    assert set(policy.__all__) == {
        "CheckpointRecord",
        "Mode",
        "RetentionPolicy",
        "TriggerPolicy",
        "TriggerState",
        "auto_interval_seconds",
        "best_records",
        "epoch_trigger",
        "format_duration",
        "retention_reasons",
        "step_trigger",
        "young_daly_interval",
        "FIRST_AUTO_INTERVAL_SECONDS",
        "REASON_TEMPLATES",
        "KEEP_ALL",
        "KEEP_BEST",
        "KEEP_BEST_RANKED",
        "KEEP_EVERY_N_EPOCHS",
        "KEEP_EVERY_N_STEPS",
        "KEEP_LAST",
        "KEEP_LATEST",
        "KEEP_NEWER_THAN",
        "KEEP_PINNED",
        "SAVE_AUTO",
        "SAVE_EVERY_N_EPOCHS",
        "SAVE_EVERY_N_STEPS",
        "SAVE_EVERY_SECONDS",
        "SAVE_IMPROVED",
    }
    for name in policy.__all__:
        assert hasattr(policy, name), name


def _imports(path: Path) -> set[str]:
    """Absolute module names a policy module imports (relative ones resolved inside ckptvault.policy)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add(node.module or "")
            else:
                base = ["ckptvault", "policy"][: 3 - node.level]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
    return names


@pytest.mark.parametrize("path", sorted(POLICY_DIR.glob("*.py")), ids=lambda p: p.name)
def test_policy_imports_only_stdlib_and_l0(path):
    """DESIGN.md: policy/ is L1 and may import only the stdlib and the L0 modules."""
    import sys

    for name in _imports(path):
        top = name.split(".")[0]
        if top == "ckptvault":
            assert name.startswith("ckptvault.policy") or name in ALLOWED_CKPTVAULT_MODULES, name
        else:
            assert top in sys.stdlib_module_names or top == "__future__", name


def test_best_first_ranks_by_mode_and_skips_what_has_no_score() -> None:
    scores = {"a": 3.0, "b": 1.0, "c": None, "d": math.nan, "e": 2.0, "f": math.inf}
    assert best_first(scores, scores.get, "min") == ["b", "e", "a", "f"]
    assert best_first(scores, scores.get, "max") == ["f", "a", "e", "b"]
    assert best_of(scores, scores.get, "max") == "f"
    assert best_of(["c", "d"], scores.get, "min") is None


def test_best_first_ties_keep_input_order() -> None:
    newest_first = ["step30", "step20", "step10"]
    score = {"step30": 1.0, "step20": 1.0, "step10": 1.0}.get
    assert best_first(newest_first, score, "min") == newest_first
    assert best_first(newest_first, score, "max") == newest_first
    assert best_of(newest_first, score, "max") == "step30"  # the newer of equals
