"""The in-memory backend's chunk store (see :mod:`.memory`): a run's chunks as objects
``<root>/chunks/<ab>/<digest>.<codec>``, the local layout, in the backend's one namespace."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import CorruptCheckpointError, StorageError, UnsafeCheckpointError
from .base import SweepReport
from .chunkfiles import FRAME_HEAD_BYTES, frame_size_of
from .chunkstore import CODECS
from .memory_space import ObjectSpace, SharedExclusive, rel_key

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class MemoryChunkStore:
    """A run's chunks as objects ``<root>/chunks/<ab>/<digest>.<codec>`` (the local layout)."""

    def __init__(self, storage: ObjectSpace, root: str) -> None:
        self._storage = storage
        self.root = root

    def exists(self) -> bool:
        prefix = self.root + "/"
        with self._storage._cond:
            return any(key.startswith(prefix) for key in self._storage._objects)

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
            if (
                codec != "raw"
                and 0 < len(data) <= raw_len
                and frame_size_of(data[:FRAME_HEAD_BYTES], raw_len) == len(data)
            ):
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
            state = self._storage._store_locks.setdefault(self.root, SharedExclusive())
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
                rel = rel_key(key, chunks)
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
