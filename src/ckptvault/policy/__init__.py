"""L1 policy: pure decisions over checkpoint records — when to save and which checkpoints to keep.

Nothing here reads or deletes files: the manager turns storage facts into
:class:`CheckpointRecord` values, asks :func:`step_trigger` / :func:`epoch_trigger` whether to save
and :func:`retention_reasons` what to keep, and acts on the answers. Imports: stdlib and L0 only.

Modules: ``metrics`` (the package's one rule for "is this metric value a number"), ``records``
(the record type, metric helpers and the one "best" ranking, ``best_first``), ``retention`` (what
to keep, with the ``KEEP_*`` reason vocabulary), ``triggers`` (when to save, with the ``SAVE_*``
reason vocabulary).
"""

from __future__ import annotations

from .records import CheckpointRecord, Mode, format_duration
from .retention import (
    KEEP_ALL,
    KEEP_BEST,
    KEEP_BEST_RANKED,
    KEEP_EVERY_N_EPOCHS,
    KEEP_EVERY_N_STEPS,
    KEEP_LAST,
    KEEP_LATEST,
    KEEP_NEWER_THAN,
    KEEP_PINNED,
    REASON_TEMPLATES,
    RetentionPolicy,
    best_records,
    retention_reasons,
)
from .triggers import (
    FIRST_AUTO_INTERVAL_SECONDS,
    SAVE_AUTO,
    SAVE_EVERY_N_EPOCHS,
    SAVE_EVERY_N_STEPS,
    SAVE_EVERY_SECONDS,
    SAVE_IMPROVED,
    TriggerPolicy,
    TriggerState,
    auto_interval_seconds,
    epoch_trigger,
    step_trigger,
    young_daly_interval,
)

__all__ = [
    "FIRST_AUTO_INTERVAL_SECONDS",
    "KEEP_ALL",
    "KEEP_BEST",
    "KEEP_BEST_RANKED",
    "KEEP_EVERY_N_EPOCHS",
    "KEEP_EVERY_N_STEPS",
    "KEEP_LAST",
    "KEEP_LATEST",
    "KEEP_NEWER_THAN",
    "KEEP_PINNED",
    "REASON_TEMPLATES",
    "SAVE_AUTO",
    "SAVE_EVERY_N_EPOCHS",
    "SAVE_EVERY_N_STEPS",
    "SAVE_EVERY_SECONDS",
    "SAVE_IMPROVED",
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
]
