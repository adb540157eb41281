"""L3: the checkpoint manager -- a run of checkpoints with triggers, retention, validation and restore.

The package, by seam: :mod:`.scope` (a stream's configuration: :class:`Scope` is its one list of
options), :mod:`.records` (records from the index reconciled with the run's listing; the read-only
views ``kept_reasons`` and ``read_events``), :mod:`.index_check` (index claims checked against the
manifests before retention deletes), :mod:`.book` (retention, deletion, the index, applying
validation results), :mod:`.saving` (metadata and the one save pipeline), :mod:`.validation_ids`
(background validation bound to checkpoint ids), :mod:`.signals` (preemption), :mod:`.restore`
(restore and what it says about what it skips) and :mod:`.core` (:class:`CheckpointManager`).

The run's layout is :class:`~ckptvault.engine.rundir.RunDirectory`'s (docs/format.md, "Run
layout"); every name importable from ``ckptvault.manager`` before the split still is.
"""

from __future__ import annotations

import time as time  # tests pin the manager's clock through ckptvault.manager.time.time

from ..engine.rundir import EVENTS_NAME as EVENTS_NAME
from ..engine.rundir import INDEX_NAME as INDEX_NAME
from ..engine.rundir import LEASE_NAME as LOCK_NAME  # the run lease's file on local disk
from ..engine.rundir import DamagedRunFileError as DamagedRunFileError
from ..engine.rundir import checkpoint_name as checkpoint_name
from .core import RUN_DIR_ENV as RUN_DIR_ENV
from .core import CheckpointManager as CheckpointManager
from .records import kept_reasons as kept_reasons
from .records import load_pins as load_pins
from .records import load_records as load_records
from .records import read_events as read_events
from .records import read_index as read_index
from .records import record_from_info as record_from_info
from .restore import RestoreRefusedError as RestoreRefusedError
from .scope import Mode as Mode
from .scope import Scope as Scope

__all__ = [
    "EVENTS_NAME",
    "INDEX_NAME",
    "LOCK_NAME",
    "RUN_DIR_ENV",
    "CheckpointManager",
    "DamagedRunFileError",
    "Mode",
    "RestoreRefusedError",
    "Scope",
    "checkpoint_name",
    "kept_reasons",
    "load_pins",
    "load_records",
    "read_events",
    "read_index",
    "record_from_info",
]
