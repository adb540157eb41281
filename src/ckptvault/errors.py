"""The one exception hierarchy of ckptvault.

Every error the library raises on purpose derives from :class:`CheckpointError`, so a training
script can guard a whole save or restore with one ``except``. The tree::

    CheckpointError(Exception)
    ├── CheckpointNotFoundError      no committed checkpoint at that path (no valid manifest)
    ├── CheckpointExistsError        the target is already a committed checkpoint
    ├── CorruptCheckpointError       stored bytes disagree with the manifest or the format rules
    │   └── UnsafeCheckpointError    a name or path tries to leave the checkpoint (.., /, symlink)
    ├── IncompatibleCheckpointError  written by a newer format version than this library reads
    ├── UnsupportedStateError        a value in the state cannot be saved safely (names its path)
    ├── ResourceLimitError           reading would allocate or work beyond the caller's byte cap
    ├── StorageError                 the storage failed (disk full, permission, I/O error)
    │   ├── ConcurrentWriteError     another writer holds the target
    │   │   └── DocumentConflictError  a compare-and-swap document write lost to another writer
    │   ├── MirrorBehindError        a run's mirror (remote copy) fell too many checkpoints behind
    │   └── UnsafeFileError          a bookkeeping file is a link, FIFO or device, or oversized
    ├── UnsafeLegacyFileError        a legacy torch file needs globals we refuse to unpickle
    └── declared beside the code that raises them (each a direct subclass unless noted):
        ArchitectureError, ModelMismatchError (training.architecture: the model cannot be rebuilt
        or does not fit), RestoreRefusedError (manager.restore: only checkpoints that failed
        validation remain), ValidationFailedError (validation.results), IncompleteStateError
        (training.state), StagingBudgetError (engine.staging), DamagedRunFileError (engine.rundir:
        a run document exists but cannot be parsed), ExportError > ExportMismatchError
        (export.common), RegistryError > ReplacedCheckpointError (catalog.registry), CatalogError
        (catalog.database), QueryError (catalog.query_tokens), ReportError (report_trajectory),
        DistributedCheckpointError (distributed.commit: a save or load failed on some rank)

Every class named in this tree is public: exported from the package root, so ``except
ckptvault.ExportError`` works without knowing the module it lives in. ``tests/test_errors_tree.py``
imports every module and fails on a ``CheckpointError`` subclass this tree does not name, on a
drawn parent that is not the class's base, and on a named class the package root does not export.

Corruption errors carry ``file`` and ``tensor`` so a user knows *where* without parsing text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


class CheckpointError(Exception):
    """Base class of every error ckptvault raises deliberately."""


class CheckpointNotFoundError(CheckpointError):
    """The path holds no committed checkpoint: a missing directory or one without a manifest."""


class CheckpointExistsError(CheckpointError):
    """Saving would replace a committed checkpoint and ``overwrite`` was not given."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes do not match what the manifest promises, or break a format rule.

    ``file`` is the file name inside the checkpoint (or ``None`` for the checkpoint as a whole),
    ``tensor`` the tensor name when the problem is inside one tensor's bytes, and ``kind`` a stable
    word for scripts: ``missing-file``, ``extra-file``, ``truncated``, ``size-mismatch``,
    ``digest-mismatch``, ``bad-header``, ``foreign-file``, ``bad-manifest``, ``unsafe``, and for
    chunked tensors ``missing-chunk`` and ``bad-chunk``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        file: str | None = None,
        tensor: str | None = None,
        kind: str = "corrupt",
    ) -> None:
        where = " / ".join(p for p in (path, file, f"tensor {tensor!r}" if tensor else None) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = message
        self.path = path
        self.file = file
        self.tensor = tensor
        self.kind = kind


class UnsafeCheckpointError(CorruptCheckpointError):
    """A name or path in a checkpoint would escape it (``..``, absolute path, symlink)."""

    def __init__(self, message: str, *, path: str | None = None, file: str | None = None) -> None:
        super().__init__(message, path=path, file=file, kind="unsafe")


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint uses a format version or feature this version of ckptvault does not know."""


class UnsupportedStateError(CheckpointError, TypeError):
    """A value in the state cannot be encoded safely; the message names its path in the state."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.state_path = path
        self.reason = message


class ResourceLimitError(CheckpointError):
    """Reading would allocate (or compare, decode, write) more bytes than the cap allows.

    Raised *before* the allocation: a checkpoint or legacy file can declare sizes far beyond the
    bytes it actually stores (one chunk referenced a million times, a stride-0 view, an expanded
    tensor). ``needed`` and ``limit`` are byte counts; pass a larger ``max_bytes=`` to proceed.
    """

    def __init__(self, message: str, *, needed: int, limit: int) -> None:
        super().__init__(f"{message}: needs {needed} bytes, the cap is {limit} (max_bytes=)")
        self.needed = needed
        self.limit = limit


class StorageError(CheckpointError, OSError):
    """The storage failed underneath us (ENOSPC, EIO, permissions); nothing was committed."""


class ConcurrentWriteError(StorageError):
    """Another process is writing the same target; one writer wins, the other gets this."""


class DocumentConflictError(ConcurrentWriteError):
    """A conditional document write lost: the document changed (or appeared) since it was read.

    Raised by ``Storage.put(if_version=...)`` / ``put(if_absent=True)``; the caller re-reads and
    decides again (or reports the other writer), never overwrites blindly."""


class MirrorBehindError(StorageError):
    """A run's mirror (``CheckpointManager(mirror=...)``) is more than ``mirror_max_behind``
    committed checkpoints behind the local run: uploads keep failing (or cannot keep up), so a lost
    machine would lose more work than the user allowed. Raised in the training loop (the next
    ``step``/``save``); the message names the last upload failure."""


class UnsafeFileError(StorageError):
    """A bookkeeping file or directory is a symbolic link, a FIFO, socket or device, or larger than
    any such file may be: refused without following it, blocking on it or reading it whole."""


class UnsafeLegacyFileError(CheckpointError):
    """A legacy pickle-based file references globals that ``torch.load(weights_only=True)`` refuses."""


def typed_os_errors(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorates a public entry point so that a failure of the medium anywhere beneath it surfaces
    as :class:`StorageError` (errno and message kept, the ``OSError`` chained), never as a raw
    ``OSError``: callers guard with ``except CheckpointError`` and must not need a second clause for
    the bookkeeping files (run index, pins, registry, chunk store) that sit beside checkpoints."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return func(*args, **kwargs)
        except CheckpointError:
            raise
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise StorageError(exc.errno or 0, f"{exc.strerror or exc}{where}") from exc

    return wrapper
