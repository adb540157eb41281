"""The one "metric number" rule (issue 14): which metric values are numbers, for every reader."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptvault.policy import metrics as metrics_mod
from ckptvault.policy.metrics import (
    as_number,
    finite_metrics,
    finite_number,
    numeric_metrics,
    plain_metric,
    rankable_number,
)
from ckptvault.policy.records import metric_value
from ckptvault.training import history


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1.0),
        (2.5, 2.5),
        (math.inf, math.inf),
        (-math.inf, -math.inf),
        (np.float32(1.5), 1.5),
        (np.int64(7), 7.0),
        (np.array([2.0]), 2.0),
        (np.array(3.0), 3.0),
        (torch.tensor(4.0), 4.0),
        (torch.tensor([5.0]), 5.0),
        (torch.tensor(6), 6.0),
        (True, None),  # bool is a flag, not a number
        (np.bool_(True), None),
        (torch.tensor(True), None),
        (np.array([1.0, 2.0]), None),
        (torch.tensor([1.0, 2.0]), None),
        ("1.5", None),
        (None, None),
        (object(), None),
    ],
)
def test_as_number(value: object, expected: float | None) -> None:
    assert as_number(value) == expected


def test_nan_passes_as_number_but_is_not_rankable_nor_finite() -> None:
    assert math.isnan(as_number(math.nan) or 0.0)
    assert math.isnan(as_number(torch.tensor(math.nan)) or 0.0)
    assert rankable_number(math.nan) is None
    assert rankable_number(math.inf) == math.inf  # an infinity still ranks
    assert finite_number(math.nan) is None
    assert finite_number(math.inf) is None
    assert finite_number(np.float64(2.0)) == 2.0


def test_huge_integers() -> None:
    with pytest.raises(OverflowError):
        as_number(10**400)
    assert finite_number(10**400) is None
    assert finite_metrics({"a": 10**400, "b": 1}) == {"b": 1.0}


def test_mapping_helpers() -> None:
    raw = {"loss": torch.tensor(0.5), "acc": 1, "flag": True, "name": "x", "nan": math.nan, 3: 2.0}
    numbers = numeric_metrics(raw)
    assert set(numbers) == {"loss", "acc", "nan", "3"}
    assert numbers["loss"] == 0.5 and math.isnan(numbers["nan"])
    assert finite_metrics(raw) == {"loss": 0.5, "acc": 1.0, "3": 2.0}
    assert finite_metrics([1, 2]) == {}
    assert plain_metric(torch.tensor(0.25)) == 0.25
    assert plain_metric("text") == "text" and plain_metric(True) is True and plain_metric(None) is None
    vector = np.array([1.0, 2.0])
    assert plain_metric(vector) is vector


def test_readers_share_the_rule() -> None:
    assert history.as_number is as_number
    assert metric_value({"m": np.float32(2.0)}, "m") == 2.0
    assert metric_value({"m": True}, "m") is None
    assert metric_value({"m": math.nan}, "m") is None


def test_no_torch_import() -> None:
    """The rule duck-types tensors: importing it must not pull torch into a process."""
    tree = ast.parse(Path(metrics_mod.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert not imported & {"torch", "numpy"}
