"""Validation levels and their results: the names every side of validation shares (levels, the
probe file's name and format, the tolerance), the result type, where results are recorded, and the
two levels that only read the checkpoint (``readback``; ``recorded_module``, ``has_probe``).

Split out of ``ckptvault.validation`` (issue 14) so that the worker process can import what it
needs without the client of the validation server; ``ckptvault.validation`` re-exports every name.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..engine.rundir import VALIDATION_DIR, RunDirectory
from ..errors import CheckpointError
from ..policy.metrics import as_number
from ..storage.resolve import split_location, storage_for

LEVELS = ("checksum", "readback", "full")
PROBE_FILE = "validation-probe.safetensors"
RESULTS_DIR = VALIDATION_DIR  # one name for the directory: the run layout's (engine.rundir)
PROBE_FORMAT = "ckptvault-probe/1"
GPU_TOLERANCE = {"rtol": 1e-3, "atol": 1e-5}
PROCESS_ENV = "CKPTVAULT_VALIDATION_PROCESS"
PROCESS_MODES = ("fork", "spawn")


class ValidationFailedError(CheckpointError):
    """The checkpoint was committed but failed validation; ``result`` says what and how long."""

    def __init__(self, result: ValidationResult) -> None:
        super().__init__(
            f"{result.checkpoint}: {result.level} validation failed: " + "; ".join(result.problems)
        )
        self.result = result


@dataclass(frozen=True)
class ValidationResult:
    checkpoint: str
    level: str  # the level that ran
    requested: str  # the level asked for ("full" may fall back to "readback", saying why in note)
    passed: bool
    problems: tuple[str, ...] = ()
    seconds: float = 0.0
    note: str = ""
    checks: tuple[str, ...] = field(default=())
    finished_at: float = 0.0
    checkpoint_id: str = ""  # which checkpoint of that name was validated

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["problems"], doc["checks"] = list(self.problems), list(self.checks)
        return doc


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"validate must be one of {LEVELS}, got {level!r}")
    return level


# -- the probe (made in the training process at save time) ---------------------------------------


def number(value: Any) -> float | None:
    """A metric as the probe file records it and the worker compares it: the package's one rule
    (:func:`~ckptvault.policy.metrics.as_number`), an int beyond any float left out."""
    try:
        return as_number(value)
    except OverflowError:
        return None


# -- results ------------------------------------------------------------------------------------
# A result lives in its run's layout (``RUN/.ckptvault-validation/NAME.json``), which only
# :class:`~ckptvault.engine.rundir.RunDirectory` knows how to reach; these names stay because the
# manager, the API and manager.validation_ids call them with a checkpoint's path.
def results_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the result of a local ``checkpoint`` lives (a name only; nothing is touched)."""
    path = Path(checkpoint)
    return path.parent / RESULTS_DIR / f"{path.name}.json"


def record_result(result: ValidationResult) -> None:
    """Writes the result beside the run (atomically: a reader sees the old or the new one; not
    flushed: a result lost in a crash is only a validation to repeat). The run's storage is rooted
    at the run, so a linked results directory is refused, never written through."""
    parent, name = split_location(result.checkpoint)
    RunDirectory(parent).write_validation(name, result.as_dict())


def read_result(checkpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The recorded result of ``checkpoint``; None when absent, damaged, a link or a FIFO."""
    parent, name = split_location(checkpoint)
    return RunDirectory(parent).read_validation(name)


# -- running a level ------------------------------------------------------------------------------
def readback(path: str, requested: str = "readback", note: str = "") -> ValidationResult:
    from ..engine.verify import verify_checkpoint

    started = time.perf_counter()
    report = verify_checkpoint(*storage_for(path))
    problems = tuple(f"{p.kind}: {p.message}" for p in report.problems)
    return ValidationResult(
        path,
        "readback",
        requested,
        not problems,
        problems,
        time.perf_counter() - started,
        note,
        (f"read back and re-hashed {report.files_checked} files, {report.tensors_checked} tensors",),
        time.time(),
    )


def has_probe(path: str) -> bool:
    from ..engine.reader import CheckpointReader

    with CheckpointReader(*storage_for(path)) as reader:
        return PROBE_FILE in reader.manifest.files and "architecture" in reader.decode_metadata()


def recorded_module(path: str) -> str | None:
    """The module of the checkpoint's recorded factory, if it records one."""
    from ..engine.reader import CheckpointReader

    with CheckpointReader(*storage_for(path)) as reader:
        architecture = reader.decode_metadata().get("architecture")
    factory = architecture.get("factory") if isinstance(architecture, dict) else None
    return factory.partition(":")[0] if isinstance(factory, str) else None
