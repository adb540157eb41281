"""ckptvault: crash-proof, verifiable, fast checkpoints for machine-learning training runs.

The functional core::

    import ckptvault as cv
    cv.save("ckpts/step_100", state)          # atomic, checksummed, no pickle
    state = cv.load("ckpts/step_100")         # exact types and bits back, every byte verified
    with cv.open("ckpts/step_100") as ck:     # lazy: reads only what you index
        w = ck["model"]["fc.weight"]
    report = cv.verify("ckpts/step_100")      # every problem, never an exception

and for training loops, ``CheckpointManager`` + ``TrainState`` (triggers, retention, exact resume).
"""

from __future__ import annotations

from .api import (
    info,
    list_checkpoints,
    load,
    load_model,
    load_program,
    open,
    save,
    save_async,
    save_model,
    validate,
    verify,
)
from .catalog.database import CatalogError
from .catalog.query_tokens import QueryError
from .catalog.registry import RegistryError, ReplacedCheckpointError
from .distributed.commit import DistributedCheckpointError
from .engine.background import PendingSave
from .engine.rundir import DamagedRunFileError
from .engine.staging import StagingBudgetError
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConcurrentWriteError,
    CorruptCheckpointError,
    DocumentConflictError,
    IncompatibleCheckpointError,
    MirrorBehindError,
    ResourceLimitError,
    StorageError,
    UnsafeCheckpointError,
    UnsafeFileError,
    UnsafeLegacyFileError,
    UnsupportedStateError,
)
from .export.common import ExportError, ExportMismatchError
from .manager import CheckpointManager, Scope
from .manager.restore import RestoreRefusedError
from .report_trajectory import ReportError
from .training.architecture import ArchitectureError, ModelMismatchError, model_factory
from .training.fingerprint import fingerprint
from .training.state import IncompleteStateError, TrainState
from .types import CheckpointInfo, Problem, VerifyReport
from .validation import ValidationFailedError, ValidationResult
from .version import __version__

__all__ = [
    "ArchitectureError",
    "CatalogError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ConcurrentWriteError",
    "CorruptCheckpointError",
    "DamagedRunFileError",
    "DistributedCheckpointError",
    "DocumentConflictError",
    "ExportError",
    "ExportMismatchError",
    "IncompatibleCheckpointError",
    "IncompleteStateError",
    "MirrorBehindError",
    "ModelMismatchError",
    "PendingSave",
    "Problem",
    "QueryError",
    "RegistryError",
    "ReplacedCheckpointError",
    "ReportError",
    "ResourceLimitError",
    "RestoreRefusedError",
    "Scope",
    "StagingBudgetError",
    "StorageError",
    "TrainState",
    "UnsafeCheckpointError",
    "UnsafeFileError",
    "UnsafeLegacyFileError",
    "UnsupportedStateError",
    "ValidationFailedError",
    "ValidationResult",
    "VerifyReport",
    "__version__",
    "fingerprint",
    "info",
    "list_checkpoints",
    "load",
    "load_model",
    "load_program",
    "model_factory",
    "open",
    "save",
    "save_async",
    "save_model",
    "validate",
    "verify",
]
