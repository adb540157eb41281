"""The in-memory backend's transactions, read handles and leases (see :mod:`.memory`)."""

from __future__ import annotations

import errno
import secrets
from collections.abc import Callable
from typing import Protocol

from ..config import MANIFEST_NAME, MAX_MANIFEST_BYTES
from ..errors import ConcurrentWriteError, CorruptCheckpointError, StorageError
from .memory_space import CheckpointObject, LeaseState, ObjectSpace


class _FileOwner(Protocol):
    """What a staged file reports to: the coordinator's transaction or a participant."""

    @property
    def finished(self) -> bool: ...
    def _closed(self, name: str, data: bytes) -> None: ...


class MemoryWritableFile:
    """A staged file: its bytes reach the transaction when ``close`` returns (an upload)."""

    def __init__(self, txn: _FileOwner, name: str) -> None:
        self._txn = txn
        self._name = name
        self._data: bytearray | None = bytearray()

    def write(self, data: memoryview | bytes, /) -> None:
        if self._data is None or self._txn.finished:
            raise StorageError(errno.EBADF, f"{self._name} is closed")
        self._data += memoryview(data).cast("B")

    def close(self) -> None:
        if self._data is not None:
            data, self._data = bytes(self._data), None
            self._txn._closed(self._name, data)


class MemoryTransaction:
    """Private staging (nothing shared is touched before ``commit``). Registered under its
    ``token`` while open, so participants of this process can join it; staged state changes under
    the storage's lock (participants may write from other threads)."""

    def __init__(self, storage: ObjectSpace, target: str, overwrite: bool) -> None:
        self._storage = storage
        self.target = target
        self.overwrite = overwrite
        self.token = secrets.token_hex(16)
        self._staged: dict[str, bytes] = {}
        self._open: set[str] = set()
        self.finished = False
        with storage._cond:
            storage._transactions[self.token] = self

    def _claim(self, name: str) -> None:
        """Reserves ``name`` in the staging area (caller holds the lock): one writer per name."""
        if self.finished:
            raise StorageError(errno.EBADF, "transaction already finished")
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise StorageError(errno.EINVAL, f"{name!r} is not a file name")
        if name == MANIFEST_NAME or name in self._staged or name in self._open:
            raise StorageError(errno.EEXIST, f"{self.target}/{name} was already created")
        self._open.add(name)

    def create(self, name: str, *, size_hint: int = 0) -> MemoryWritableFile:
        with self._storage._cond:
            self._claim(name)
        return MemoryWritableFile(self, name)

    def _closed(self, name: str, data: bytes) -> None:
        with self._storage._cond:
            self._open.discard(name)
            if not self.finished:
                self._staged[name] = data

    def commit(self, manifest: bytes, *, wait_files: Callable[[], None] | None = None) -> None:
        if wait_files is not None:
            wait_files()
        with self._storage._cond:  # no participant's file lands between the check and the publish
            if self.finished:
                raise StorageError(0, "transaction already finished")
            if self._open:
                names = sorted(self._open)
                self.abort()
                raise StorageError(errno.EBUSY, f"{names} not closed before the commit")
            files = {**self._staged, MANIFEST_NAME: bytes(manifest)}
            try:
                self._storage._publish(self.target, files, overwrite=self.overwrite)
            finally:
                self.abort()

    def abort(self) -> None:
        """Drops every staged file, participants' included, and the token's registration."""
        with self._storage._cond:
            self.finished = True
            self._staged.clear()
            self._storage._transactions.pop(self.token, None)


class MemoryParticipant:
    """Another writer of a :class:`MemoryTransaction`'s staging area (see base.WriteTransaction):
    its files are staged into the coordinator's; it never commits."""

    def __init__(self, txn: MemoryTransaction) -> None:
        self._txn = txn
        self._lock = txn._storage._cond
        self.target = txn.target
        self.token = txn.token
        self._open: set[str] = set()
        self._written: set[str] = set()
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done or self._txn.finished

    def create(self, name: str, *, size_hint: int = 0) -> MemoryWritableFile:
        with self._lock:
            if self._done:
                raise StorageError(errno.EBADF, "transaction already finished")
            if self._txn.finished:
                raise StorageError(errno.ENOENT, f"{self.target}: the save joined is over")
            self._txn._claim(name)
            self._open.add(name)
        return MemoryWritableFile(self, name)

    def _closed(self, name: str, data: bytes) -> None:
        with self._lock:
            if name not in self._open:
                return  # aborted meanwhile: the name was released then
            self._open.discard(name)
            self._txn._open.discard(name)
            if self._done:
                return
            if self._txn.finished:
                raise StorageError(errno.ENOENT, f"{self.target}/{name}: the save joined is over")
            self._txn._staged[name] = data
            self._written.add(name)

    def commit(self, manifest: bytes, *, wait_files: Callable[[], None] | None = None) -> None:
        raise StorageError(errno.EPERM, "only the transaction that began the save commits it")

    def abort(self) -> None:
        """Withdraws this participant's files (staged or still open) from the save, if it is open."""
        with self._lock:
            if self._done:
                return
            self._done = True
            if not self._txn.finished:
                for name in self._written:
                    self._txn._staged.pop(name, None)
                self._txn._open.difference_update(self._open)
            self._open.clear()
            self._written.clear()


class MemoryReadHandle:
    """One committed checkpoint, held by reference: an overwrite never changes what it reads."""

    def __init__(self, storage: ObjectSpace, target: str, checkpoint: CheckpointObject) -> None:
        self._storage = storage
        self.target = target
        self._checkpoint: CheckpointObject | None = checkpoint

    def _file(self, name: str) -> bytes:
        if self._checkpoint is None:
            raise StorageError(errno.EBADF, f"{self.target}: read handle is closed")
        data = self._checkpoint.files.get(name)
        if data is None:
            raise CorruptCheckpointError(
                "file listed in the manifest is missing", path=self.target, file=name, kind="missing-file"
            )
        return data

    def read_manifest(self) -> bytes:
        data = self._file(MANIFEST_NAME)
        if len(data) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"manifest of {len(data)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit",
                path=self.target,
                file=MANIFEST_NAME,
                kind="bad-manifest",
            )
        return data

    def file_names(self) -> list[str]:
        self._file(MANIFEST_NAME)
        assert self._checkpoint is not None
        return sorted(self._checkpoint.files)

    def size(self, name: str) -> int:
        return len(self._file(name))

    def read(self, name: str, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(name, offset, memoryview(buffer))
        return bytes(buffer)

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        data = self._file(name)
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        if offset < 0 or offset + len(view) > len(data):
            raise CorruptCheckpointError(
                f"file ends at byte {len(data)}, expected {offset + len(view)}",
                path=self.target,
                file=name,
                kind="truncated",
            )
        view[:] = data[offset : offset + len(view)]

    def mmap(self, name: str, *, copy_on_write: bool = False) -> None:
        """Always None (nothing to map): callers fall back to reads, as on an object store."""
        self._file(name)

    def is_stale(self) -> bool:
        with self._storage._cond:
            return self._storage._checkpoints.get(self.target) is not self._checkpoint

    def close(self) -> None:
        self._checkpoint = None


class MemoryLease:
    """A lease that lapses at ``expires`` by the storage's clock unless renewed."""

    def __init__(self, storage: ObjectSpace, key: str, owner: str, state: LeaseState) -> None:
        self._storage = storage
        self.key = key
        self.owner = owner
        self._state = state

    @property
    def expires(self) -> float:
        return self._state.expires

    def renew(self) -> None:
        storage = self._storage
        with storage._cond:
            now = storage._leases.get(self.key)
            if now is not self._state:
                who = f"taken by {now.owner}" if now is not None else "released or taken and given up"
                raise ConcurrentWriteError(errno.ENOLCK, f"the lease of {self.key} was lost: {who}")
            self._state.expires = storage._clock() + self._state.ttl

    def release(self) -> None:
        with self._storage._cond:
            if self._storage._leases.get(self.key) is self._state:
                del self._storage._leases[self.key]
