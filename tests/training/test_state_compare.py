"""The one state comparison (issue 14): training.state_compare.first_difference."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from ckptvault.training.state_compare import first_difference


def state() -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([math.nan, -0.0])},
        "np": np.array([1, 2, 3], dtype=np.int32),
        "step": 7,
        "lr": 0.1,
        "nan": math.nan,
        "items": [1, "a", (2.0, None)],
    }


def changed(path: list[Any], value: Any) -> dict[str, Any]:
    s = state()
    node: Any = s
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return s


CASES = [
    (["model", "w"], torch.arange(6.0).reshape(3, 2), "state['model']['w']: torch.float32(2, 3) vs"),
    (["model", "b"], torch.tensor([math.nan, 0.0]), "state['model']['b']: tensor values differ"),
    (["np"], np.array([1, 2, 4], dtype=np.int32), "state['np']: arrays differ"),
    (["np"], np.array([1, 2, 3], dtype=np.int64), "state['np']: arrays differ"),
    (["step"], 7.0, "state['step']: type int vs float"),
    (["lr"], 0.2, "state['lr']: 0.1 vs 0.2"),
    (["items", 2], [2.0, None], "state['items'][2]: type tuple vs list"),
    (["items"], [1, "a"], "state['items']: length 3 vs 2"),
]


def test_a_state_equals_itself_bit_for_bit() -> None:
    assert first_difference(state(), state()) is None
    assert first_difference(state(), state(), arrays=False) is None


@pytest.mark.parametrize(("path", "value", "message"), CASES)
def test_first_difference_names_the_place(path: list[Any], value: Any, message: str) -> None:
    found = first_difference(state(), changed(path, value))
    assert found is not None and found.startswith(message)


def test_keys_must_match_in_order() -> None:
    a, b = {"x": 1, "y": 2}, {"y": 2, "x": 1}
    assert first_difference(a, b) == "state: keys ['x', 'y'] vs ['y', 'x']"
