"""Fault injection at the operating-system boundary: fail, tear or delay the Nth file operation.

Why at the ``os`` boundary and not around our ``Storage`` protocol: a checkpoint's life touches the
disk through more doors than ``Storage`` (the chunk store, retention's deletes, garbage collection,
the run index, the registry's pins, validation results, the catalog's SQLite file). Wrapping the
functions they all end in -- ``os.open/write/pwrite/fsync/ftruncate/rename/replace/unlink/rmdir/
mkdir``, the reads ``os.read/pread/preadv``, ``open()`` in a writing mode, the ``renameat2`` swap of
an overwrite and the catalog's SQLite statements -- reaches every write path at once, including the
ones nobody thought to route through a wrapper. The technique is SQLite's: run an operation with a
fault at operation 1, 2, 3, ... until it completes without reaching the fault, and after each
failure check that nothing committed was harmed (see :mod:`ckptvault.testing.invariants`).

Scope: only operations on paths under ``root`` count (a descriptor counts for the path it was
opened with), so the test's own bookkeeping elsewhere is untouched. Process-wide and thread-safe
(async saves write from a background thread): one injector may be active at a time.

Actions at the chosen operation:

* ``"error"``: raise :class:`InjectedFault` (an ``OSError`` with ``errno``, EIO by default) instead
  of doing it -- once (``persistent=False``) or for that and every later counted operation (a
  dead disk);
* ``"torn"``: a write stores only the first half of its bytes, then fails (a torn write); other
  operations fail as with ``"error"``;
* ``"delay"``: sleep ``delay_s`` and then do it (widens race windows for concurrency tests).

``record=True`` keeps an :class:`Op` log of what was done (with the bytes of every write), which
:mod:`ckptvault.testing.crashsim` replays to build the states a power cut could leave.
Not for production use: it slows every file operation of the process while active.

The module is split by job: :mod:`ckptvault.testing.fault_log` (what an operation is, the
counting and the log), :mod:`ckptvault.testing.fault_doors` (the patched functions) and this one
(installing and removing them).
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .fault_doors import PatchedDoors
from .fault_log import ALL_KINDS, READ_KINDS, WRITE_KINDS, Action, InjectedFault, Op

__all__ = ["ALL_KINDS", "READ_KINDS", "WRITE_KINDS", "Action", "FaultInjector", "InjectedFault", "Op"]

_active: FaultInjector | None = None
_active_lock = threading.Lock()


class FaultInjector(PatchedDoors):
    """Counts the file operations under ``root`` and injects a fault at number ``fail_at``.

    Use as a context manager; ``count`` says how many operations it saw, ``fired`` how many it
    faulted, ``log`` what happened (kinds of every counted operation; with ``record=True`` the
    full operations a crash replay needs). ``fail_at=None`` only counts (and records): the way to
    learn how many operations a write path has. ``kinds`` limits what counts (default: the
    writing operations; add ``"read"`` for restore paths).
    """

    # -- install --------------------------------------------------------------------------------
    def __enter__(self) -> FaultInjector:
        global _active
        with _active_lock:
            if _active is not None:
                raise RuntimeError("another FaultInjector is active")
            _active = self
        from ..storage import local  # late: a test may import this module before the engine

        patches: dict[tuple[Any, str], Callable[..., Any]] = {
            (os, "open"): self._open,
            (os, "close"): self._close,
            (os, "write"): self._write,
            (os, "pwrite"): self._pwrite,
            (os, "fsync"): self._fsync,
            (os, "fdatasync"): self._fsync,
            (os, "ftruncate"): self._ftruncate,
            (os, "rename"): self._rename,
            (os, "replace"): self._replace,
            (os, "unlink"): self._unlink,
            (os, "remove"): self._unlink,
            (os, "rmdir"): self._rmdir,
            (os, "mkdir"): self._mkdir,
            (os, "read"): self._read,
            (os, "pread"): self._pread,
            (os, "preadv"): self._preadv,
            (builtins, "open"): self._open_file,
            (io, "open"): self._open_file,
            (shutil, "rmtree"): self._rmtree,
            (local, "exchange_paths"): self._exchange,
            (sqlite3, "connect"): self._sqlite_connect,
        }
        for (owner, name), replacement in patches.items():
            self._saved[(owner, name)] = getattr(owner, name)
            setattr(owner, name, replacement)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _active
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)
        self._saved.clear()
        with _active_lock:
            _active = None
