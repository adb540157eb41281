"""L1: the one rule for "is this metric value a number" (issue 14: there were six).

A training loop hands the library metrics as Python numbers, numpy scalars, 0-d or 1-element torch
tensors, strings, bools, ``None``. Every reader of metrics -- the history columns, the manager's
metadata and policy records, the triggers and retention, the catalog, the trajectory report -- must
agree on which of those are numbers, or a checkpoint could be "best" in one view and absent from
another. The rule, :func:`as_number`:

* ``int`` and ``float`` (and their subclasses such as ``numpy.float64``) are numbers;
* ``bool`` is *not* a number (``True`` is a flag, not a loss of 1.0);
* anything with ``.item()`` holding exactly one element (``.numel()`` for torch, ``.size`` for
  numpy) is a number when its item is an int or float: torch is duck-typed, never imported here;
* everything else (strings, ``None``, arrays of several values) is not.

NaN and infinities are numbers to :func:`as_number`; what a reader does with them depends on what
it needs, so the variants say it in their names: :func:`rankable_number` drops NaN (it can neither be
ranked nor ever improve), :func:`finite_number` drops NaN, the infinities and an integer beyond any
float (a curve or a SQL column has no place for them). Imports: stdlib only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "as_number",
    "finite_metrics",
    "finite_number",
    "numeric_metrics",
    "plain_metric",
    "rankable_number",
]


def as_number(value: Any) -> float | None:
    """A metric value as a float: Python numbers and 1-element numpy/torch values; bools and
    everything else are not numbers here. NaN and the infinities pass through; an ``int`` beyond
    any float raises ``OverflowError`` (use :func:`finite_number` where that must not fail)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    numel = getattr(value, "numel", None)  # torch: numel(); numpy: size
    count = numel() if callable(numel) else getattr(value, "size", 2)
    if hasattr(value, "item") and count == 1:
        item = value.item()
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            return float(item)
    return None


def rankable_number(value: Any) -> float | None:
    """:func:`as_number`, but ``None`` for NaN: what "best" and "improved" compare (infinities rank)."""
    if value is None:  # the common case of a missing metric costs nothing
        return None
    number = as_number(value)
    return None if number is None or math.isnan(number) else number


def finite_number(value: Any) -> float | None:
    """:func:`as_number`, but ``None`` for NaN, the infinities and integers beyond any float."""
    try:
        number = as_number(value)
    except OverflowError:
        return None
    return number if number is not None and math.isfinite(number) else None


def plain_metric(value: Any) -> Any:
    """A metric as metadata holds it: numbers (tensors, numpy scalars) become Python floats, plain
    values (``None``, bools, ints, floats, strings) stay as they are, anything else is left alone."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    number = as_number(value)
    return value if number is None else number


def numeric_metrics(metrics: Mapping[Any, Any]) -> dict[str, float]:
    """The numeric metrics (Python or numpy/torch scalars) as floats, NaN included; others left out."""
    numbers = {str(key): as_number(value) for key, value in metrics.items()}
    return {key: value for key, value in numbers.items() if value is not None}


def finite_metrics(metrics: Any) -> dict[str, float]:
    """The finite numeric metrics only (``{}`` when ``metrics`` is not a mapping): what a curve holds."""
    if not isinstance(metrics, Mapping):
        return {}
    out: dict[str, float] = {}
    for key, value in metrics.items():
        number = finite_number(value)
        if number is not None:
            out[str(key)] = number
    return out
