"""Which checkpoints to keep: a pure decision over one stream's records; deleting is the caller's job.

:func:`retention_reasons` answers, for every record, *why* it is kept; an empty answer means "delete
it". Returning reasons rather than booleans lets ``ckptvault ls`` show them, and lets a test check that
each kept checkpoint is kept by a rule that really applies.

Guarantees, whatever the policy (each is a property test in ``tests/policy``):

* one entry per input record, in input order; names must be unique;
* the newest valid record (by step, then commit time, then name) is kept: ``"latest"``;
* when ``monitor`` is set, the best valid record by it is kept, even when ``keep_best`` is not set;
* pinned records are kept, valid or not;
* an invalid record (failed verification) is never the latest or the best and no ``keep_*`` rule
  keeps it: it is deleted unless pinned. Only with no retention configured does it stay, because
  then nothing is deleted at all (removing corrupt checkpoints is a deliberate act: ``gc``/``verify``);
* idempotence: deleting what was not kept and deciding again deletes nothing more, because every
  rule keeps a set that can only grow when other records go away;
* every reason names a rule that applies to that record; nothing else is kept.

The manager calls this once per scope (``full``, ``weights``), so the records form one stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from .records import (
    CheckpointRecord,
    Mode,
    best_first,
    check_mode,
    check_monitor,
    check_positive_int,
    check_positive_seconds,
    format_duration,
    metric_value,
)

# The reason vocabulary, as ``ckptvault ls`` prints it. Templates are filled with ``str.format``.
KEEP_PINNED: Final = "pinned"
"""Pinned by the user (``manager.pin(step)``); kept whatever the policy says, even when invalid."""
KEEP_LATEST: Final = "latest"
"""The newest valid checkpoint: what ``restore`` would load."""
KEEP_BEST: Final = "best {monitor}"
"""The best valid checkpoint by the monitored metric (``keep_best`` unset or 1)."""
KEEP_BEST_RANKED: Final = "best {monitor} ({rank} of {count})"
"""One of the ``keep_best`` best valid checkpoints; rank 1 is the best."""
KEEP_LAST: Final = "last {n}"
"""One of the ``keep_last`` newest valid checkpoints."""
KEEP_EVERY_N_STEPS: Final = "every {n} steps"
"""A valid checkpoint whose step is a multiple of ``keep_every_n_steps``."""
KEEP_EVERY_N_EPOCHS: Final = "every {n} epochs"
"""The first valid checkpoint taken once ``epoch`` (completed epochs, > 0) reached a multiple of n."""
KEEP_NEWER_THAN: Final = "newer than {age}"
"""A valid checkpoint committed within the last ``keep_newer_than`` seconds (age like ``"1h"``)."""
KEEP_ALL: Final = "all kept (no retention policy)"
"""No ``keep_*`` option is set, so retention deletes nothing."""

REASON_TEMPLATES: Final = (
    KEEP_PINNED,
    KEEP_LATEST,
    KEEP_BEST,
    KEEP_BEST_RANKED,
    KEEP_LAST,
    KEEP_EVERY_N_STEPS,
    KEEP_EVERY_N_EPOCHS,
    KEEP_NEWER_THAN,
    KEEP_ALL,
)
"""Every reason text, in the order reasons appear in a record's tuple."""


_COUNT_RULES: Final = ("keep_last", "keep_best", "keep_every_n_steps", "keep_every_n_epochs")
_KEEP_RULES: Final = (*_COUNT_RULES, "keep_newer_than")


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints of one stream to keep; the union of the rules that are set.

    With no ``keep_*`` option set, the policy keeps everything (reason ``KEEP_ALL``). ``monitor`` on
    its own does not configure retention, but whenever it is set the best checkpoint by it is kept.
    Records lacking the metric, or holding NaN there, are never ranked as best.
    """

    keep_last: int | None = None
    keep_best: int | None = None
    monitor: str | None = None
    mode: Mode = "min"
    keep_every_n_steps: int | None = None
    keep_every_n_epochs: int | None = None
    keep_newer_than: float | None = None

    def __post_init__(self) -> None:
        for name in _COUNT_RULES:
            check_positive_int(name, getattr(self, name))
        check_positive_seconds("keep_newer_than", self.keep_newer_than)
        check_mode(self.mode)
        check_monitor(self.monitor, "keep_best" if self.keep_best is not None else None)

    @property
    def configured(self) -> bool:
        """Whether any ``keep_*`` rule is set; if not, retention deletes nothing."""
        return any(getattr(self, name) is not None for name in _KEEP_RULES)


def retention_reasons(
    records: Sequence[CheckpointRecord], policy: RetentionPolicy, *, now: float
) -> dict[str, tuple[str, ...]]:
    """Every record's name -> why it is kept (empty tuple: delete it). Pure, deterministic.

    ``now`` is the unix time ``keep_newer_than`` is measured from. Raises ``ValueError`` when two
    records share a name. Reasons appear in the order of :data:`REASON_TEMPLATES`.
    """
    reasons = _empty_reasons(records)
    newest_first = sorted((r for r in records if r.valid), key=CheckpointRecord.newness, reverse=True)
    _add(reasons, (r for r in records if r.pinned), KEEP_PINNED)
    _add(reasons, newest_first[:1], KEEP_LATEST)
    _add_best(reasons, newest_first, policy)
    if not policy.configured:
        _add(reasons, records, KEEP_ALL)
    else:
        _add_rules(reasons, newest_first, policy, now)
    return {name: tuple(why) for name, why in reasons.items()}


def _empty_reasons(records: Sequence[CheckpointRecord]) -> dict[str, list[str]]:
    reasons: dict[str, list[str]] = {}
    for record in records:
        if record.name in reasons:
            raise ValueError(f"two checkpoint records share the name {record.name!r}")
        reasons[record.name] = []
    return reasons


def _add(reasons: dict[str, list[str]], records: Iterable[CheckpointRecord], reason: str) -> None:
    for record in records:
        reasons[record.name].append(reason)


def _add_best(
    reasons: dict[str, list[str]], newest_first: list[CheckpointRecord], policy: RetentionPolicy
) -> None:
    """Keeps the best ``keep_best`` (or 1) valid records by ``monitor``; ties go to the newer one."""
    if policy.monitor is None:
        return
    count = policy.keep_best or 1
    for rank, record in enumerate(best_records(newest_first, policy.monitor, policy.mode)[:count], start=1):
        if count == 1:
            reasons[record.name].append(KEEP_BEST.format(monitor=policy.monitor))
        else:
            reasons[record.name].append(
                KEEP_BEST_RANKED.format(monitor=policy.monitor, rank=rank, count=count)
            )


def best_records(records: Sequence[CheckpointRecord], monitor: str, mode: Mode) -> list[CheckpointRecord]:
    """The valid records that have ``monitor``, best first; equal values keep their input order.

    Give the records newest first to break ties in favour of the newer checkpoint.
    """
    return best_first((r for r in records if r.valid), lambda r: metric_value(r.metrics, monitor), mode)


def _add_rules(
    reasons: dict[str, list[str]], newest_first: list[CheckpointRecord], policy: RetentionPolicy, now: float
) -> None:
    """The ``keep_*`` rules; each looks at valid records only."""
    if policy.keep_last is not None:
        _add(reasons, newest_first[: policy.keep_last], KEEP_LAST.format(n=policy.keep_last))
    if policy.keep_every_n_steps is not None:
        n = policy.keep_every_n_steps
        _add(reasons, (r for r in newest_first if r.step % n == 0), KEEP_EVERY_N_STEPS.format(n=n))
    if policy.keep_every_n_epochs is not None:
        n = policy.keep_every_n_epochs
        _add(reasons, _epoch_boundaries(newest_first, n), KEEP_EVERY_N_EPOCHS.format(n=n))
    if policy.keep_newer_than is not None:
        cutoff = now - policy.keep_newer_than
        reason = KEEP_NEWER_THAN.format(age=format_duration(policy.keep_newer_than))
        _add(reasons, (r for r in newest_first if r.created >= cutoff), reason)


def _epoch_boundaries(newest_first: list[CheckpointRecord], n: int) -> list[CheckpointRecord]:
    """For each epoch count k*n (k >= 1), the oldest record carrying it: the one taken at that boundary.

    Keeping one per epoch rather than every record with ``epoch % n == 0`` matters: ``epoch`` counts
    *completed* epochs, so every mid-epoch checkpoint of the following epoch carries the same number.
    """
    first: dict[int, CheckpointRecord] = {}
    for record in reversed(newest_first):  # oldest first: the first seen per epoch wins
        if record.epoch > 0 and record.epoch % n == 0:
            first.setdefault(record.epoch, record)
    return list(first.values())
