"""The metrics history of a run, kept column by column.

A history grows by one row per step for the whole run. Stored as a list of dicts inside the
checkpoint's JSON tree, every save would re-encode all of it in Python (O(steps) per save) and a
long run would outgrow the tree's node limit. Stored as columns — one float64 array per metric plus
int64 step and epoch arrays, NaN where a row lacks a metric — it is a handful of tensors that are
written and hashed at disk speed. Only numbers are kept, by the package's one rule
(:func:`ckptvault.policy.metrics.as_number`; non-numeric metric values still reach each checkpoint's
metadata).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..policy.metrics import as_number

__all__ = ["MetricsHistory", "as_number"]  # as_number: the package's one rule, re-exported


class MetricsHistory:
    """Append-only table of (step, epoch, metrics...) rows."""

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._epochs: list[int] = []
        self._columns: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._steps)

    def append(self, step: int, epoch: int, metrics: Mapping[str, Any]) -> None:
        row = len(self._steps)
        self._steps.append(step)
        self._epochs.append(epoch)
        for name, value in metrics.items():
            number = as_number(value)
            if number is None:
                continue
            column = self._columns.get(name)
            if column is None:
                column = self._columns[name] = [math.nan] * row
            column.append(number)
        for column in self._columns.values():
            if len(column) == row:
                column.append(math.nan)

    def rows(self) -> Iterator[dict[str, Any]]:
        """Each row as a dict with only the metrics recorded in it."""
        for i, (step, epoch) in enumerate(zip(self._steps, self._epochs, strict=True)):
            row: dict[str, Any] = {"step": step, "epoch": epoch}
            for name, column in self._columns.items():
                if not math.isnan(column[i]):
                    row[name] = column[i]
            yield row

    def column(self, name: str) -> list[float]:
        return list(self._columns.get(name, []))

    def to_tree(self) -> dict[str, Any]:
        return {
            "step": np.asarray(self._steps, dtype=np.int64),
            "epoch": np.asarray(self._epochs, dtype=np.int64),
            "metrics": {name: np.asarray(values, dtype=np.float64) for name, values in self._columns.items()},
        }

    @classmethod
    def from_tree(cls, tree: Mapping[str, Any]) -> MetricsHistory:
        history = cls()
        history._steps = [int(v) for v in tree["step"]]
        history._epochs = [int(v) for v in tree["epoch"]]
        for name, values in tree["metrics"].items():
            column = [float(v) for v in values]
            if len(column) != len(history._steps):
                raise ValueError(
                    f"metrics history column {name!r} has {len(column)} rows, expected {len(history)}"
                )
            history._columns[str(name)] = column
        return history
