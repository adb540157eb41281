"""An in-memory storage backend: a test double and the reference semantics of an object store.

Why it exists: the :class:`~ckptvault.storage.base.Storage` protocol is the only door to storage, so
every promise above it (atomic publish, compare-and-swap documents, leases) must hold for *any*
backend. This one keeps those promises with the fewest moving parts -- one lock, plain dicts -- and
has no rename, as an object store has none:

* a write transaction stages its files privately (inside the transaction object); ``commit`` puts
  the manifest and every file under the target in one step under the lock. Nothing staged is ever
  listed or openable, and a crashed writer leaves nothing behind (its transaction is just garbage);
* documents, event logs, published files and chunks are *objects* (bytes with a version and a
  modification time) in one ``/``-joined namespace, so ``list`` and ``delete`` see them as a bucket
  listing would; a document's version is a digest of its bytes, as on local disk;
* leases expire by the injected ``clock`` (tests advance it instead of sleeping); an expired lease
  can be taken over and its old holder's ``renew`` then raises ConcurrentWriteError.

Leases are kept beside the namespace (never listed); ``mmap`` returns None (nothing to map).
"""

from __future__ import annotations

import errno
import hashlib
import io
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from ..config import MANIFEST_NAME, MAX_MANIFEST_BYTES
from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConcurrentWriteError,
    CorruptCheckpointError,
    DocumentConflictError,
    StorageError,
    UnsafeCheckpointError,
)
from .base import Document, Entry, EntryKind, Storage, SweepReport
from .chunkstore import CODECS, STORE_NAME

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_RANK: dict[EntryKind, int] = {"checkpoint": 0, "document": 1, "directory": 2}


def _norm(key: str) -> str:
    """The canonical form of a key: ``/``-joined, no empty or ``.`` parts; ``..`` is refused (a key
    never climbs out of its prefix)."""
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StorageError(errno.EINVAL, f"{key!r}: '..' never names a key")
    return "/".join(parts)


def _rel(key: str, prefix: str) -> str | None:
    """``key`` relative to ``prefix`` when it lies strictly below it, else None."""
    if not prefix:
        return key or None
    return key[len(prefix) + 1 :] if key.startswith(prefix + "/") else None


def _version(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def _frame_size(head: bytes, raw_len: int) -> int | None:
    """The size a compressed chunk's frame header promises (format §11.3, as
    :func:`~ckptvault.storage.chunkfiles.frame_size` reads it from a file); None if malformed."""
    if len(head) < 16 or head[:4] != b"CKVC" or int.from_bytes(head[8:16], "little") != raw_len:
        return None
    nplanes = head[6]
    table_end = 16 + 9 * nplanes
    if nplanes not in (1, 2, 4, 8) or len(head) < table_end:
        return None
    return table_end + sum(int.from_bytes(head[17 + 9 * i : 25 + 9 * i], "little") for i in range(nplanes))


@dataclass(frozen=True)
class _Blob:
    """One object's bytes; ``serial`` is unique per write (what ``report_bad`` marks)."""

    data: bytes
    version: str
    modified: float
    serial: int


@dataclass(frozen=True, eq=False)
class _Checkpoint:
    """A committed checkpoint: its files (manifest included), immutable once published."""

    files: dict[str, bytes]
    modified: float


@dataclass(eq=False)
class _LeaseState:
    owner: str
    expires: float
    ttl: float


@dataclass
class _SharedExclusive:
    shared: int = 0
    exclusive: bool = False


class MemoryStorage:
    """Every operation of the storage protocol on dicts under one lock (see the module docstring).

    ``clock`` gives seconds since the epoch: lease expiry and ``Entry.modified`` use it, so a test
    can move time forward without sleeping.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())  # the one lock (and its waiters)
        self._checkpoints: dict[str, _Checkpoint] = {}
        self._objects: dict[str, _Blob] = {}
        self._leases: dict[str, _LeaseState] = {}
        self._tokens: dict[str, int] = {}  # prefix -> serial of the last change at or below it
        self._bad: set[tuple[str, int]] = set()  # (chunk key, serial) reported damaged
        self._store_locks: dict[str, _SharedExclusive] = {}
        self._serial = 0

    # -- bookkeeping (callers hold the lock) -----------------------------------------------------
    def _bump(self, key: str) -> int:
        """Records a change at ``key``: every prefix above it gets a new change token."""
        self._serial += 1
        parts = key.split("/") if key else []
        for depth in range(len(parts) + 1):
            self._tokens["/".join(parts[:depth])] = self._serial
        return self._serial

    def _has_children(self, prefix: str) -> bool:
        return any(_rel(k, prefix) for k in (*self._checkpoints, *self._objects))

    def _store(self, key: str, data: bytes) -> str:
        if key in self._checkpoints or self._has_children(key) or not key:
            raise StorageError(errno.EISDIR, f"{key!r} is a checkpoint or a prefix, not a document")
        version = _version(data)
        self._objects[key] = _Blob(data, version, self._clock(), self._serial + 1)
        self._bump(key)
        return version

    def _check_target(self, target: str, overwrite: bool) -> None:
        if not target or target in self._objects:
            raise CheckpointExistsError(f"{target!r} exists and is not a checkpoint")
        if target in self._checkpoints:
            if not overwrite:
                raise CheckpointExistsError(
                    f"{target} is already a checkpoint; pass overwrite=True to replace it"
                )
        elif self._has_children(target):
            raise CheckpointExistsError(f"{target} holds other keys and is not a checkpoint; not touching it")

    def _publish(self, target: str, files: dict[str, bytes], *, overwrite: bool) -> None:
        """The commit point: the whole checkpoint replaces whatever was under ``target`` at once."""
        with self._cond:
            self._check_target(target, overwrite)
            for key in [k for k in self._objects if _rel(k, target)]:
                del self._objects[key]  # extra keys of the replaced checkpoint go with it
            self._checkpoints[target] = _Checkpoint(files, self._clock())
            self._bump(target)

    # -- naming and checkpoints -----------------------------------------------------------------
    def join(self, prefix: str, *names: str) -> str:
        return _norm("/".join((prefix, *names)))

    def begin(self, target: str, *, overwrite: bool) -> MemoryTransaction:
        key = _norm(target)
        with self._cond:
            self._check_target(key, overwrite)
        return MemoryTransaction(self, key, overwrite)

    def open(self, target: str) -> MemoryReadHandle:
        key = _norm(target)
        with self._cond:
            checkpoint = self._checkpoints.get(key)
        if checkpoint is None:
            raise CheckpointNotFoundError(f"{target}: not a committed checkpoint")
        return MemoryReadHandle(self, key, checkpoint)

    def iter_checkpoints(self, root: str) -> Iterator[str]:
        """Committed checkpoints under ``root``, as local disk walks them: ``root`` alone when it is
        one, never below a checkpoint or a hidden (``.``) name, sorted part by part."""
        base = _norm(root)
        with self._cond:
            keys = set(self._checkpoints)
        if base in keys:
            yield base
            return
        found = []
        for key in keys:
            rel = _rel(key, base)
            if rel is None:
                continue
            parts = rel.split("/")
            above = ("/".join((base, *parts[:i])).lstrip("/") for i in range(1, len(parts)))
            if not any(p.startswith(".") for p in parts) and not any(a in keys for a in above):
                found.append(key)
        yield from sorted(found, key=lambda k: k.split("/"))

    def list(self, prefix: str) -> list[Entry]:
        base = _norm(prefix)
        entries: dict[str, Entry] = {}

        def add(name: str, kind: EntryKind, modified: float, size: int) -> None:
            old = entries.get(name)
            if old is None or _RANK[kind] < _RANK[old.kind]:
                entries[name] = Entry(name, self.join(base, name), kind, modified, size)
            elif kind == old.kind == "directory" and modified > old.modified:
                entries[name] = Entry(name, old.key, kind, modified)

        with self._cond:
            if base in self._checkpoints:
                checkpoint = self._checkpoints[base]
                for name, data in checkpoint.files.items():
                    add(name, "document", checkpoint.modified, len(data))
            for key, ckpt in self._checkpoints.items():
                if (rel := _rel(key, base)) is not None:
                    size = sum(len(d) for d in ckpt.files.values())
                    head, sep, _ = rel.partition("/")
                    add(head, "directory" if sep else "checkpoint", ckpt.modified, 0 if sep else size)
            for key, blob in self._objects.items():
                if (rel := _rel(key, base)) is not None:
                    head, sep, _ = rel.partition("/")
                    add(head, "directory" if sep else "document", blob.modified, 0 if sep else len(blob.data))
        return [entries[name] for name in sorted(entries)]

    def change_token(self, prefix: str) -> str | None:
        key = _norm(prefix)
        with self._cond:
            if key in self._checkpoints or key in self._objects or self._has_children(key):
                return str(self._tokens.get(key, 0))
        return None

    def delete(self, target: str) -> bool:
        key = _norm(target)
        with self._cond:
            if self._checkpoints.pop(key, None) is None:
                return False
            for other in [k for k in self._objects if _rel(k, key)]:
                del self._objects[other]
            self._bump(key)
        return True

    def chunk_store(self, checkpoint: str) -> MemoryChunkStore:
        parent = _norm(checkpoint).rpartition("/")[0]
        return MemoryChunkStore(self, self.join(parent, STORE_NAME))

    # -- documents and event logs ---------------------------------------------------------------
    def get(self, key: str, *, max_bytes: int) -> Document | None:
        with self._cond:
            blob = self._objects.get(_norm(key))
        if blob is None:
            return None
        if len(blob.data) > max_bytes:
            raise StorageError(errno.EFBIG, f"{key} has {len(blob.data)} bytes, more than {max_bytes}")
        return Document(blob.data, blob.version)

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_version: str | None = None,
        if_absent: bool = False,
        durable: bool = True,
    ) -> str:
        """``durable`` changes nothing here: memory is as durable as it gets."""
        name = _norm(key)
        with self._cond:
            self._check_condition(name, if_version, if_absent)
            return self._store(name, bytes(data))

    def _check_condition(self, key: str, if_version: str | None, if_absent: bool) -> None:
        current = self._objects.get(key)
        if current is None and if_version is not None:
            raise DocumentConflictError(errno.ENOENT, f"{key} was removed by another writer")
        if current is not None and if_absent:
            raise DocumentConflictError(errno.EEXIST, f"{key} was created by another writer")
        if current is not None and if_version is not None and current.version != if_version:
            raise DocumentConflictError(errno.ESTALE, f"{key} was changed by another writer")

    def remove(self, key: str, *, if_version: str | None = None) -> bool:
        name = _norm(key)
        with self._cond:
            self._check_condition(name, if_version, False)
            if self._objects.pop(name, None) is None:
                return False
            self._bump(name)
        return True

    def append(self, key: str, line: bytes) -> None:
        if not line.endswith(b"\n"):
            raise ValueError(f"an event-log line ends in a newline: {line[-20:]!r}")
        name = _norm(key)
        with self._cond:
            current = self._objects.get(name)
            self._store(name, (current.data if current else b"") + line)

    def read_lines(self, key: str, *, max_line: int) -> Iterator[bytes]:
        """Lines with their newline (a torn last line without), as local disk reads them; a line
        counts its newline against ``max_line``."""
        with self._cond:
            blob = self._objects.get(_norm(key))
        data = blob.data if blob else b""
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end + 1
            if end - start <= max_line:
                yield data[start:end]
            start = end

    def recover(self, prefix: str) -> None:
        """Nothing to do: a put here is one dict assignment, so no writer leaves a temporary."""

    # -- leases ---------------------------------------------------------------------------------
    def acquire_lease(self, key: str, *, owner: str, ttl_seconds: float) -> MemoryLease:
        name = _norm(key)
        with self._cond:
            now = self._clock()
            held = self._leases.get(name)
            if held is not None and held.expires > now:
                raise ConcurrentWriteError(
                    errno.EWOULDBLOCK, f"{name} is held by {held.owner} for {held.expires - now:.1f} s more"
                )
            state = self._leases[name] = _LeaseState(owner, now + ttl_seconds, ttl_seconds)
        return MemoryLease(self, name, owner, state)

    # -- single published files -----------------------------------------------------------------
    def publish_file(self, target: str, action: str = "write") -> AbstractContextManager[BinaryIO]:
        return self._published(_norm(target), action)

    @contextmanager
    def _published(self, key: str, action: str) -> Iterator[BinaryIO]:
        buffer = io.BytesIO()
        yield buffer  # an exception in the block propagates here: nothing is stored
        try:
            with self._cond:
                self._store(key, buffer.getvalue())
        except StorageError as exc:
            raise StorageError(exc.errno or 0, f"cannot {action} {key}: {exc.strerror}") from exc


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

    def __init__(self, storage: MemoryStorage, target: str, overwrite: bool) -> None:
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

    def __init__(self, storage: MemoryStorage, target: str, checkpoint: _Checkpoint) -> None:
        self._storage = storage
        self.target = target
        self._checkpoint: _Checkpoint | None = checkpoint

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

    def __init__(self, storage: MemoryStorage, key: str, owner: str, state: _LeaseState) -> None:
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


class MemoryChunkStore:
    """A run's chunks as objects ``<root>/chunks/<ab>/<digest>.<codec>`` (the local layout)."""

    def __init__(self, storage: MemoryStorage, root: str) -> None:
        self._storage = storage
        self.root = root

    def _key(self, digest: str, codec: str) -> str:
        if not _HEX64.match(digest) or codec not in CODECS:
            raise UnsafeCheckpointError(f"unsafe chunk reference {digest[:70]!r}.{codec[:10]!r}")
        return self._storage.join(self.root, "chunks", digest[:2], f"{digest}.{codec}")

    def _good(self, digest: str, codec: str) -> bytes | None:
        key = self._key(digest, codec)
        with self._storage._cond:
            blob = self._storage._objects.get(key)
            if blob is None or (key, blob.serial) in self._storage._bad:
                return None
            return blob.data

    def find(self, digest: str, raw_len: int) -> tuple[str, int] | None:
        for codec in CODECS:
            data = self._good(digest, codec)
            if data is None:
                continue
            if codec == "raw" and len(data) == raw_len:
                return codec, len(data)
            if codec != "raw" and 0 < len(data) <= raw_len and _frame_size(data[:88], raw_len) == len(data):
                return codec, len(data)
        return None

    def has(self, digest: str, codec: str, stored_len: int) -> bool:
        data = self._good(digest, codec)
        return data is not None and len(data) == stored_len

    def put(self, digest: str, codec: str, data: memoryview | bytes) -> int:
        payload = memoryview(data).cast("B").tobytes()
        key = self._key(digest, codec)
        with self._storage._cond:
            self._storage._store(key, payload)  # a new serial: a damaged copy's mark no longer applies
        return len(payload)

    def sync(self) -> None:
        """Nothing to do: a put is visible and kept as soon as it returns."""

    def read(
        self, digest: str, codec: str, stored_len: int, *, where: str | None = None, tensor: str | None = None
    ) -> bytearray:
        with self._storage._cond:
            blob = self._storage._objects.get(self._key(digest, codec))
        if blob is None:
            raise CorruptCheckpointError(
                f"chunk {digest[:16]}….{codec} is missing from the chunk store {self.root}",
                path=where,
                tensor=tensor,
                kind="missing-chunk",
            )
        if len(blob.data) != stored_len:
            raise CorruptCheckpointError(
                f"chunk {digest}.{codec} has {len(blob.data)} bytes, the manifest says {stored_len}",
                path=where,
                tensor=tensor,
                kind="truncated" if len(blob.data) < stored_len else "size-mismatch",
            )
        return bytearray(blob.data)

    def report_bad(self, digest: str, codec: str) -> None:
        key = self._key(digest, codec)
        with self._storage._cond:
            blob = self._storage._objects.get(key)
            if blob is not None:
                self._storage._bad.add((key, blob.serial))

    @contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[None]:
        """Shared by saves, exclusive for a sweep; not reentrant (as a flock on a new fd is not)."""
        cond = self._storage._cond
        with cond:
            state = self._storage._store_locks.setdefault(self.root, _SharedExclusive())
            cond.wait_for(lambda: not state.exclusive and (state.shared == 0 or not exclusive))
            if exclusive:
                state.exclusive = True
            else:
                state.shared += 1
        try:
            yield
        finally:
            with cond:
                if exclusive:
                    state.exclusive = False
                else:
                    state.shared -= 1
                cond.notify_all()

    def sweep(self, live: set[str], *, dry_run: bool = False) -> SweepReport:
        storage = self._storage
        chunks = storage.join(self.root, "chunks")
        kept = deleted = freed = 0
        with storage._cond:
            state = storage._store_locks.get(self.root)
            if state is None or not state.exclusive:
                raise StorageError(errno.ENOLCK, f"sweep of {self.root} without locked(exclusive=True)")
            for key, blob in list(storage._objects.items()):
                rel = _rel(key, chunks)
                shard, _, name = (rel or "").partition("/")
                digest, _, codec = name.partition(".")
                if not (_HEX64.match(digest) and codec in CODECS and shard == digest[:2]):
                    continue  # not a chunk of ours: never deleted
                if digest in live:
                    kept += 1
                    continue
                deleted += 1
                freed += len(blob.data)
                if not dry_run:
                    del storage._objects[key]
                    storage._bad.discard((key, blob.serial))
                    storage._bump(key)
        return SweepReport(live_chunks=kept, deleted_chunks=deleted, freed_bytes=freed, deleted_temporary=0)


def _typecheck() -> Storage:
    """mypy proves here that MemoryStorage is a Storage (structural typing, no runtime cost)."""
    return MemoryStorage()
