"""What the policies know about a checkpoint, and how they read and compare metrics.

A :class:`CheckpointRecord` is the whole world of a policy: the manager builds one per committed
checkpoint from its manifest facts, the policies decide over lists of them, and the manager acts on the
decision. Nothing here touches storage, so every rule can be tested with plain values.

Metric values are read defensively (:func:`metric_value`) by the package's one rule
(:mod:`ckptvault.policy.metrics`): ``bool`` is not a number, and NaN is treated as absent, because a
NaN can neither be ranked nor ever improve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

from .metrics import rankable_number

Mode = Literal["min", "max"]
"""Whether a smaller (``"min"``, e.g. loss) or larger (``"max"``, e.g. accuracy) value is better."""

MODES: tuple[Mode, ...] = ("min", "max")

T = TypeVar("T")


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint of one stream, as the policies see it.

    ``name`` is the checkpoint's directory name inside the run and its identity: the policies return
    decisions keyed by it. ``created`` is the unix time of the commit. ``metrics`` may hold anything a
    manifest held; the policies use only the numbers in it. ``valid=False`` marks a checkpoint that
    failed verification: it is never the newest or the best and is kept only while pinned.
    ``checkpoint_id`` is the id in the checkpoint's manifest (``""`` when not known): a validation
    result or an index entry counts for this record only if it names the same id, because a
    same-step re-save puts another checkpoint under the same name. The policies never read it.
    """

    name: str
    step: int
    epoch: int
    created: float
    scope: str
    metrics: Mapping[str, float]
    pinned: bool = False
    valid: bool = True
    checkpoint_id: str = ""

    def newness(self) -> tuple[int, float, str]:
        """The sort key for "newer": step first, then commit time, then name (always a total order)."""
        return (self.step, self.created, self.name)


def check_mode(mode: str) -> None:
    """Raises ``ValueError`` unless ``mode`` is ``"min"`` or ``"max"``."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def metric_value(metrics: Mapping[str, object], name: str) -> float | None:
    """The number recorded under ``name``, or ``None`` when absent, NaN or not a number
    (:func:`~ckptvault.policy.metrics.rankable_number`).

    Fast on purpose (no allocation when the metric is missing): the save triggers call it per step.
    """
    return rankable_number(metrics.get(name))


def is_better(candidate: float, reference: float | None, mode: Mode) -> bool:
    """Whether ``candidate`` strictly beats ``reference`` (anything beats ``None``; NaN beats nothing)."""
    if math.isnan(candidate):
        return False
    if reference is None:
        return True
    return candidate < reference if mode == "min" else candidate > reference


def best_first(candidates: Iterable[T], score: Callable[[T], float | None], mode: str) -> list[T]:
    """The candidates that have a score, best first: the package's one "best" (issue 14).

    ``score`` gives a candidate's monitored value, ``None`` when it has none; NaN counts as none
    (it can neither be ranked nor improve), the infinities rank. ``mode == "max"`` puts the largest
    first, any other mode the smallest. Equal scores keep their input order, so give the candidates
    newest first to break ties in favour of the newer checkpoint. Retention's ``keep_best``,
    :meth:`CheckpointManager.best` and the report's "best" mark all choose by this.
    """
    ranked = [(value, c) for c in candidates if (value := score(c)) is not None and not math.isnan(value)]
    ranked.sort(key=lambda item: item[0], reverse=mode == "max")  # stable, also when reversed
    return [candidate for _, candidate in ranked]


def best_of(candidates: Iterable[T], score: Callable[[T], float | None], mode: str) -> T | None:
    """The first of :func:`best_first` (ties: the earliest in input order), or ``None``."""
    ranked = best_first(candidates, score, mode)
    return ranked[0] if ranked else None


def format_duration(seconds: float) -> str:
    """A short human duration for reason texts: ``"1h"``, ``"10m"``, ``"2d"``, ``"90s"``, ``"1.5s"``.

    Whole multiples of a day, hour or minute use that unit; anything else is seconds, rounded to a
    whole second from ten seconds up, so the text stays stable as a measured interval jitters.
    """
    value = float(round(seconds)) if seconds >= 10 else float(seconds)
    if value > 0 and value.is_integer():
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if value % size == 0:
                return f"{int(value) // size}{unit}"
        return f"{int(value)}s"
    return f"{value:g}s"


def check_positive_int(name: str, value: int | None) -> None:
    """Raises ``ValueError`` unless ``value`` is ``None`` or an ``int`` >= 1 (``bool`` is refused)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive_seconds(name: str, value: float | None) -> None:
    """Raises ``ValueError`` unless ``value`` is ``None`` or a finite number of seconds > 0."""
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")


def check_monitor(monitor: str | None, needed_by: str | None) -> None:
    """Raises ``ValueError`` when ``needed_by`` names an option that needs a monitor and none is set,
    or when ``monitor`` is set but is not a non-empty string."""
    if monitor is None:
        if needed_by is not None:
            raise ValueError(f"{needed_by} needs monitor= (the metric name to rank by)")
        return
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"monitor must be a non-empty metric name, got {monitor!r}")
