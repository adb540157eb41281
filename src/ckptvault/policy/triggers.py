"""When to save: pure functions of a policy, a small mutable state and the current step's facts.

The manager owns one :class:`TriggerState` per scope and drives it in this order::

    state.observe(metrics, policy.monitor, policy.mode)   # for every metrics report, first
    reason = step_trigger(policy, state, step=..., epoch=..., now=..., metrics=...)   # every step
    reason = epoch_trigger(policy, state, epoch=..., now=..., metrics=...)           # epoch ends
    if reason is not None:
        save(...)
        state.record_save(step=..., epoch=..., now=..., duration=...)

The trigger functions never mutate the state; only ``observe`` (best value seen) and ``record_save``
(what the last save covered) do. That split keeps the per-step call cheap and makes every decision
reproducible from ``(policy, state.to_dict(), inputs)``.

Improvement: ``state.best`` is the best monitored value seen; ``state.best_saved`` the best one a save
already covers (``record_save`` copies ``best`` into it). The improvement trigger fires while the best
value, including one in this call's ``metrics``, strictly beats ``best_saved``; so an improvement that
``observe`` already recorded still fires, and one save covers it. The first value ever seen counts as an
improvement. NaN never improves. Call ``observe`` *before* the triggers: observed after a save, an
improvement is only covered by the next one.

``every="auto"`` (Young/Daly): the interval is ``sqrt(2 * C * MTBF)`` with ``C`` the smoothed measured
save cost. Before any save has been timed, the interval is ``min(FIRST_AUTO_INTERVAL_SECONDS, MTBF)``:
an early first save measures ``C``, and waiting for a measurement that only a save can provide would
never save at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Final

from .records import (
    Mode,
    check_mode,
    check_monitor,
    check_positive_int,
    check_positive_seconds,
    format_duration,
    is_better,
    metric_value,
)

# The reason vocabulary of saves (stored as the checkpoint's ``reason``). Filled with ``str.format``.
SAVE_EVERY_N_STEPS: Final = "every {n} steps"
SAVE_EVERY_N_EPOCHS: Final = "every {n} epochs"
SAVE_EVERY_SECONDS: Final = "every {interval}"
"""``interval`` is a short duration such as ``"10m"`` or ``"90s"``."""
SAVE_AUTO: Final = "auto interval {interval}"
"""The Young/Daly interval in force when it fired, e.g. ``"auto interval 1314s"``."""
SAVE_IMPROVED: Final = "improved {monitor}"

FIRST_AUTO_INTERVAL_SECONDS: Final = 600.0
"""The ``every="auto"`` interval before any save has been timed (capped at the MTBF)."""
SAVE_COST_SMOOTHING: Final = 0.3
"""Weight of the newest measured save duration in ``save_cost_seconds`` (exponential moving average)."""
MIN_SAVE_COST_SECONDS: Final = 1e-3
"""Floor for the measured save cost, so a save timed at ~0 s cannot make every step a save."""


@dataclass(frozen=True)
class TriggerPolicy:
    """When one stream saves; a save happens when any option set here fires.

    ``every_n_steps`` fires at ``step % n == 0``; ``every_seconds`` and ``auto_mtbf_seconds`` when
    that long has passed since the last save; ``every_n_epochs`` when ``epoch % n == 0`` at an
    epoch's end; ``on_improvement`` when ``monitor`` strictly improves (see the module docstring).
    """

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    every_seconds: float | None = None
    on_improvement: bool = False
    monitor: str | None = None
    mode: Mode = "min"
    auto_mtbf_seconds: float | None = None

    def __post_init__(self) -> None:
        check_positive_int("every_n_steps", self.every_n_steps)
        check_positive_int("every_n_epochs", self.every_n_epochs)
        check_positive_seconds("every_seconds", self.every_seconds)
        check_positive_seconds("auto_mtbf_seconds", self.auto_mtbf_seconds)
        if not isinstance(self.on_improvement, bool):
            raise ValueError(f"on_improvement must be True or False, got {self.on_improvement!r}")
        check_mode(self.mode)
        check_monitor(self.monitor, "on_improvement" if self.on_improvement else None)


@dataclass
class TriggerState:
    """What the triggers remember between calls; one per scope, owned and persisted by the manager.

    ``last_save_time`` starts as the manager's start time (set it then), so time-based triggers count
    from the start of the run rather than from 1970. ``to_dict`` gives plain JSON (non-finite floats
    as strings) and ``from_dict`` reads it back exactly.
    """

    last_save_step: int = 0
    last_save_epoch: int = 0
    last_save_time: float = 0.0
    best: float | None = None
    best_saved: float | None = None
    save_cost_seconds: float | None = None

    def observe(self, metrics: Mapping[str, object], monitor: str | None, mode: Mode = "min") -> bool:
        """Takes in a metrics report: updates ``best`` when ``monitor`` strictly improves on it.

        Returns whether it improved. Without a monitor, or with the metric absent or NaN, nothing
        changes.
        """
        if monitor is None:
            return False
        value = metric_value(metrics, monitor)
        if value is None or not is_better(value, self.best, mode):
            return False
        self.best = value
        return True

    def record_save(self, *, step: int, epoch: int, now: float, duration: float) -> None:
        """Notes a committed save: the position and time it covers, its cost, and the best it covers.

        ``duration`` (seconds the save took) feeds the moving average ``every="auto"`` uses.
        """
        if not math.isfinite(duration) or duration < 0:
            raise ValueError(f"a save duration must be a finite number of seconds >= 0, got {duration!r}")
        self.last_save_step = step
        self.last_save_epoch = epoch
        self.last_save_time = now
        self.best_saved = self.best
        previous = self.save_cost_seconds
        alpha = SAVE_COST_SMOOTHING
        self.save_cost_seconds = duration if previous is None else alpha * duration + (1 - alpha) * previous

    def to_dict(self) -> dict[str, object]:
        """Plain JSON values; ``inf``/``-inf`` become strings so strict JSON writers accept them."""
        return {f.name: _encode_float(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> TriggerState:
        """Reads ``to_dict`` output back; missing keys take their defaults, unknown keys are refused."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown trigger state fields: {sorted(unknown)}")
        state = cls()
        for key in ("last_save_step", "last_save_epoch"):
            if key in data:
                setattr(state, key, _read_int(key, data[key]))
        if "last_save_time" in data:
            state.last_save_time = _read_float("last_save_time", data["last_save_time"])
        for key in ("best", "best_saved", "save_cost_seconds"):
            if data.get(key) is not None:
                setattr(state, key, _read_float(key, data[key]))
        return state


def _encode_float(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf", "nan"
    return value


def _read_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"trigger state {key} must be an integer, got {value!r}")
    return value


def _read_float(key: str, value: object) -> float:
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"trigger state {key} must be a number, got {value!r}")
    return float(value)


def young_daly_interval(save_cost_seconds: float, mtbf_seconds: float) -> float:
    """The checkpoint interval that minimises expected lost work: ``sqrt(2 * C * MTBF)`` seconds.

    Young's first-order optimum (Daly refined it; the difference matters only when C nears MTBF).
    Both inputs must be positive and finite; e.g. C = 10 s, MTBF = 1 day gives about 1314.5 s.
    """
    check_positive_seconds("save_cost_seconds", save_cost_seconds)
    check_positive_seconds("mtbf_seconds", mtbf_seconds)
    return math.sqrt(2.0 * save_cost_seconds * mtbf_seconds)


def auto_interval_seconds(save_cost_seconds: float | None, mtbf_seconds: float) -> float:
    """The ``every="auto"`` interval in force: Young/Daly once a save has been timed, before that
    ``min(FIRST_AUTO_INTERVAL_SECONDS, mtbf_seconds)``. Costs below ``MIN_SAVE_COST_SECONDS`` count
    as that floor."""
    if save_cost_seconds is None:
        return min(FIRST_AUTO_INTERVAL_SECONDS, mtbf_seconds)
    return math.sqrt(2.0 * max(save_cost_seconds, MIN_SAVE_COST_SECONDS) * mtbf_seconds)


def step_trigger(
    policy: TriggerPolicy,
    state: TriggerState,
    *,
    step: int,
    epoch: int,
    now: float,
    metrics: Mapping[str, object],
) -> str | None:
    """Called after every optimizer step; the reason to save now, or ``None``.

    Checked in order: ``every_n_steps``, ``every_seconds``, auto, improvement; the first that fires
    names the reason. Never fires for a step at or before ``state.last_save_step`` (that step is
    saved already). Epoch triggers never fire here. Allocates nothing but the returned text.
    """
    if step <= state.last_save_step:
        return None
    n = policy.every_n_steps
    if n is not None and step % n == 0:
        return SAVE_EVERY_N_STEPS.format(n=n)
    elapsed = now - state.last_save_time
    interval = policy.every_seconds
    if interval is not None and elapsed >= interval:
        return SAVE_EVERY_SECONDS.format(interval=format_duration(interval))
    mtbf = policy.auto_mtbf_seconds
    if mtbf is not None:
        interval = auto_interval_seconds(state.save_cost_seconds, mtbf)
        if elapsed >= interval:
            return SAVE_AUTO.format(interval=format_duration(interval))
    if policy.on_improvement and _improved(policy, state, metrics):
        return SAVE_IMPROVED.format(monitor=policy.monitor)
    return None


def epoch_trigger(
    policy: TriggerPolicy, state: TriggerState, *, epoch: int, now: float, metrics: Mapping[str, object]
) -> str | None:
    """Called when an epoch ends (``epoch`` = completed epochs); fires for ``every_n_epochs`` (once
    per epoch count above ``state.last_save_epoch``) and for improvement. ``now`` is accepted for
    symmetry with :func:`step_trigger`; no epoch rule depends on time."""
    n = policy.every_n_epochs
    if n is not None and epoch > state.last_save_epoch and epoch % n == 0:
        return SAVE_EVERY_N_EPOCHS.format(n=n)
    if policy.on_improvement and _improved(policy, state, metrics):
        return SAVE_IMPROVED.format(monitor=policy.monitor)
    return None


def _improved(policy: TriggerPolicy, state: TriggerState, metrics: Mapping[str, object]) -> bool:
    """Whether the best value seen, this call's included, beats what the last save covered."""
    best = state.best
    if policy.monitor is not None:
        value = metric_value(metrics, policy.monitor)
        if value is not None and is_better(value, best, policy.mode):
            best = value
    return best is not None and is_better(best, state.best_saved, policy.mode)
