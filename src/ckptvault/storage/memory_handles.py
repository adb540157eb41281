"""The in-memory backend's transactions, read handles and leases (see :mod:`.memory`)."""

from __future__ import annotations

import errno

from ..config import MANIFEST_NAME, MAX_MANIFEST_BYTES
from ..errors import ConcurrentWriteError, CorruptCheckpointError, StorageError
from .memory_space import CheckpointObject, LeaseState, ObjectSpace


class MemoryWritableFile:
    """A staged file: its bytes reach the transaction when ``close`` returns (an upload)."""

    def __init__(self, txn: MemoryTransaction, name: str) -> None:
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
    """Private staging (nothing shared is touched before ``commit``)."""

    def __init__(self, storage: ObjectSpace, target: str, overwrite: bool) -> None:
        self._storage = storage
        self.target = target
        self.overwrite = overwrite
        self._staged: dict[str, bytes] = {}
        self._open: set[str] = set()
        self.finished = False

    def create(self, name: str, *, size_hint: int = 0) -> MemoryWritableFile:
        if self.finished:
            raise StorageError(errno.EBADF, "transaction already finished")
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise StorageError(errno.EINVAL, f"{name!r} is not a file name")
        if name == MANIFEST_NAME or name in self._staged or name in self._open:
            raise StorageError(errno.EEXIST, f"{self.target}/{name} was already created")
        self._open.add(name)
        return MemoryWritableFile(self, name)

    def _closed(self, name: str, data: bytes) -> None:
        self._open.discard(name)
        if not self.finished:
            self._staged[name] = data

    def commit(self, manifest: bytes) -> None:
        if self.finished:
            raise StorageError(0, "transaction already finished")
        if self._open:
            self.abort()
            raise StorageError(errno.EBUSY, f"{sorted(self._open)} not closed before the commit")
        files = {**self._staged, MANIFEST_NAME: bytes(manifest)}
        try:
            self._storage._publish(self.target, files, overwrite=self.overwrite)
        finally:
            self.abort()

    def abort(self) -> None:
        self.finished = True
        self._staged.clear()


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
