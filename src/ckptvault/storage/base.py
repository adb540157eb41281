"""The storage protocol: the few operations a checkpoint needs, nothing more.

A writer uses it in exactly this order::

    txn = storage.begin(target, overwrite=...)   # private staging area; sweeps dead leftovers
    f = txn.create(name); f.write(...); f.close()   # each file durable when close() returns
    txn.commit(manifest_bytes)                    # manifest written last: the commit point
    # or txn.abort() on any failure: nothing becomes visible

A reader opens a :class:`ReadHandle` on a committed checkpoint and reads byte ranges of its files.
``close`` on a handle closes its files; maps it handed out stay valid until dropped.
Backends map a failure of the medium to :class:`~ckptvault.errors.StorageError`.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from typing import Protocol


class WritableFile(Protocol):
    def write(self, data: memoryview | bytes, /) -> None:
        """Writes all of ``data`` (no short writes surface to the caller)."""

    def close(self) -> None:
        """Makes the file durable (fsync or equivalent) and releases it."""


class WriteTransaction(Protocol):
    def create(self, name: str, *, size_hint: int = 0) -> WritableFile:
        """A new file; ``size_hint`` (its expected size) lets a backend pick a write path."""

    def commit(self, manifest: bytes) -> None:
        """Writes the manifest last and publishes the checkpoint atomically and durably."""

    def abort(self) -> None:
        """Discards everything written; safe to call more than once and after a failed commit."""


class ReadHandle(Protocol):
    def read_manifest(self) -> bytes: ...
    def file_names(self) -> list[str]: ...
    def size(self, name: str) -> int: ...
    def read(self, name: str, offset: int, length: int) -> bytes: ...
    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        """Fills ``buffer`` from ``offset``; a short file raises CorruptCheckpointError."""

    def mmap(self, name: str, *, copy_on_write: bool = False) -> mmap.mmap | None:
        """A map of the file, or None where the backend cannot map (or the file is empty).

        Read-only by default; ``copy_on_write`` gives a private writable map whose writes never
        reach the file (what a loaded tensor backed by the file needs).
        """

    def is_stale(self) -> bool:
        """True when the checkpoint's path now names a different checkpoint (it was replaced)."""

    def close(self) -> None: ...


class Storage(Protocol):
    def begin(self, target: str, *, overwrite: bool) -> WriteTransaction: ...
    def open(self, target: str) -> ReadHandle: ...
    def iter_checkpoints(self, root: str) -> Iterator[str]: ...
