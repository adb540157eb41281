"""An in-memory storage backend: a test double and the reference semantics of an object store.

Why it exists: the :class:`~ckptvault.storage.base.Storage` protocol is the only door to storage, so
every promise above it (atomic publish, compare-and-swap documents, leases) must hold for *any*
backend. This one keeps those promises with the fewest moving parts -- one lock, plain dicts -- and
has no rename, as an object store has none:

* a write transaction stages its files privately (inside the transaction object); ``commit`` puts
  the manifest and every file under the target in one step under the lock. Nothing staged is ever
  listed or openable, and a crashed writer leaves nothing behind (its transaction is just garbage).
  Participants (``join_transaction``, by the token of a transaction open on this same object) stage
  into it too;
* documents, event logs, published files and chunks are *objects* (bytes with a version and a
  modification time) in one ``/``-joined namespace, so ``list`` and ``delete`` see them as a bucket
  listing would; a document's version is a digest of its bytes, as on local disk;
* leases expire by the injected ``clock`` (tests advance it instead of sleeping); an expired lease
  can be taken over and its old holder's ``renew`` then raises ConcurrentWriteError.

Leases are kept beside the namespace (never listed); ``mmap`` returns None (nothing to map).
"""

from __future__ import annotations

import errno
import io
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import BinaryIO

from ..config import MANIFEST_NAME
from ..errors import (
    CheckpointNotFoundError,
    ConcurrentWriteError,
    DocumentConflictError,
    StorageError,
)
from .base import Document, Entry, EntryKind, Storage
from .chunkstore import STORE_NAME
from .memory_chunks import MemoryChunkStore
from .memory_handles import MemoryLease, MemoryParticipant, MemoryReadHandle, MemoryTransaction
from .memory_space import LeaseState, ObjectSpace, norm_key, rel_key

_TOKEN = re.compile(r"[0-9a-f]{32}")
_RANK: dict[EntryKind, int] = {"checkpoint": 0, "document": 1, "directory": 2}


class MemoryStorage(ObjectSpace):
    """Every operation of the storage protocol on dicts under one lock (see the module docstring).

    ``clock`` gives seconds since the epoch: lease expiry and ``Entry.modified`` use it, so a test
    can move time forward without sleeping.
    """

    file_bytes: int | None = None

    # -- naming and checkpoints -----------------------------------------------------------------
    def begin(self, target: str, *, overwrite: bool) -> MemoryTransaction:
        key = norm_key(target)
        with self._cond:
            self._check_target(key, overwrite)
        return MemoryTransaction(self, key, overwrite)

    def join_transaction(self, target: str, token: str) -> MemoryParticipant:
        """A participant in a save this storage object began (in this process: memory is not
        shared); an unknown or finished token is ENOENT, another target's EINVAL."""
        key = norm_key(target)
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise StorageError(errno.EINVAL, f"{str(token)[:80]!r} is not a transaction token")
        with self._cond:
            txn = self._transactions.get(token)
        if txn is None:
            raise StorageError(errno.ENOENT, f"{key}: no open save has token {token}")
        if txn.target != key:
            raise StorageError(errno.EINVAL, f"token {token} names a save of another target")
        return MemoryParticipant(txn)

    def open(self, target: str) -> MemoryReadHandle:
        key = norm_key(target)
        with self._cond:
            checkpoint = self._checkpoints.get(key)
        if checkpoint is None:
            raise CheckpointNotFoundError(f"{target}: not a committed checkpoint")
        return MemoryReadHandle(self, key, checkpoint)

    def iter_checkpoints(self, root: str) -> Iterator[str]:
        """Committed checkpoints under ``root``, as local disk walks them: ``root`` alone when it is
        one, never below a checkpoint or a hidden (``.``) name, sorted part by part."""
        base = norm_key(root)
        with self._cond:
            keys = set(self._checkpoints)
        if base in keys:
            yield base
            return
        found = []
        for key in keys:
            rel = rel_key(key, base)
            if rel is None:
                continue
            parts = rel.split("/")
            above = ("/".join((base, *parts[:i])).lstrip("/") for i in range(1, len(parts)))
            if not any(p.startswith(".") for p in parts) and not any(a in keys for a in above):
                found.append(key)
        yield from sorted(found, key=lambda k: k.split("/"))

    def list(self, prefix: str) -> list[Entry]:
        base = norm_key(prefix)
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
                if (rel := rel_key(key, base)) is not None:
                    size = len(ckpt.files[MANIFEST_NAME])
                    head, sep, _ = rel.partition("/")
                    add(head, "directory" if sep else "checkpoint", ckpt.modified, 0 if sep else size)
            for key, blob in self._objects.items():
                if (rel := rel_key(key, base)) is not None:
                    head, sep, _ = rel.partition("/")
                    add(head, "directory" if sep else "document", blob.modified, 0 if sep else len(blob.data))
        return [entries[name] for name in sorted(entries)]

    def change_token(self, prefix: str) -> str | None:
        key = norm_key(prefix)
        with self._cond:
            if key in self._checkpoints or key in self._objects or self._has_children(key):
                return str(self._tokens.get(key, 0))
        return None

    def delete(self, target: str) -> bool:
        key = norm_key(target)
        with self._cond:
            if self._checkpoints.pop(key, None) is None:
                return False
            for other in [k for k in self._objects if rel_key(k, key)]:
                del self._objects[other]
            self._bump(key)
        return True

    def chunk_store(self, checkpoint: str) -> MemoryChunkStore:
        parent = norm_key(checkpoint).rpartition("/")[0]
        return MemoryChunkStore(self, self.join(parent, STORE_NAME))

    # -- documents and event logs ---------------------------------------------------------------
    def get(self, key: str, *, max_bytes: int) -> Document | None:
        with self._cond:
            blob = self._objects.get(norm_key(key))
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
        name = norm_key(key)
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
        name = norm_key(key)
        with self._cond:
            self._check_condition(name, if_version, False)
            if self._objects.pop(name, None) is None:
                return False
            self._bump(name)
        return True

    def append(self, key: str, line: bytes) -> None:
        if not line.endswith(b"\n"):
            raise ValueError(f"an event-log line ends in a newline: {line[-20:]!r}")
        name = norm_key(key)
        with self._cond:
            current = self._objects.get(name)
            self._store(name, (current.data if current else b"") + line)

    def read_lines(self, key: str, *, max_line: int) -> Iterator[bytes]:
        """Lines with their newline (a torn last line without), as local disk reads them; a line
        counts its newline against ``max_line``."""
        with self._cond:
            blob = self._objects.get(norm_key(key))
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
        name = norm_key(key)
        with self._cond:
            now = self._clock()
            held = self._leases.get(name)
            if held is not None and held.expires > now:
                raise ConcurrentWriteError(
                    errno.EWOULDBLOCK, f"{name} is held by {held.owner} for {held.expires - now:.1f} s more"
                )
            state = self._leases[name] = LeaseState(owner, now + ttl_seconds, ttl_seconds)
        return MemoryLease(self, name, owner, state)

    # -- single published files -----------------------------------------------------------------
    def publish_file(self, target: str, action: str = "write") -> AbstractContextManager[BinaryIO]:
        return self._published(norm_key(target), action)

    @contextmanager
    def _published(self, key: str, action: str) -> Iterator[BinaryIO]:
        buffer = io.BytesIO()
        yield buffer  # an exception in the block propagates here: nothing is stored
        try:
            with self._cond:
                self._store(key, buffer.getvalue())
        except StorageError as exc:
            raise StorageError(exc.errno or 0, f"cannot {action} {key}: {exc.strerror}") from exc


def _typecheck() -> Storage:
    """mypy proves here that MemoryStorage is a Storage (structural typing, no runtime cost)."""
    return MemoryStorage()
