"""The object-store backend's chunk store (see :mod:`.s3` and docs/format.md §14): a run's chunks as
objects ``<run>/.ckptvault-store/chunks/<ab>/<digest>.<codec>`` -- the local layout.

Why a listing cache: a dedup lookup per chunk as a HEAD request would cost an incremental save of
10,000 chunks 10,000 round trips; one LIST per 1,000 chunks tells the same. The cache is refilled
whenever the store's shared lock is taken, and a sweep only runs under the exclusive lock, so
inside a save's lock what the cache says exists does exist (the engine re-checks its hints there).

The lock itself is two kinds of small objects under ``locks/``: each save writes its own
``shared-<id>`` marker, a sweep the single ``exclusive`` one, each with an expiry. Each side writes
its marker first and then lists the other side's (S3 is strongly consistent): at least one of two
racing parties sees the other and backs off -- a save waits for a sweep, a sweep for every save.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import CorruptCheckpointError, DocumentConflictError, StorageError, UnsafeCheckpointError
from .base import SweepReport
from .chunkfiles import FRAME_HEAD_BYTES, frame_size_of
from .chunkstore import CODECS
from .s3_client import BucketOwner, ObjectMeta

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LOCK_TTL_S = 3600.0  # a marker older than this belongs to a dead process
_LOCK_POLL_S = 0.2


class S3ChunkStore:
    """A run's content-addressed chunks in the bucket (see the module docstring)."""

    def __init__(self, storage: BucketOwner, root: str) -> None:
        self._storage = storage
        self._client = storage.client
        self.root = root  # the store's key within the bucket
        self._chunks: dict[str, ObjectMeta] | None = None  # name -> meta (the listing cache)
        self._bad: dict[str, str] = {}  # name -> ETag of the copy reported damaged
        self._exclusive = False

    # -- the listing cache ----------------------------------------------------------------------
    def _listing(self) -> dict[str, ObjectMeta]:
        if self._chunks is None:
            chunks: dict[str, ObjectMeta] = {}
            for meta in self._client.list_all(f"{self.root}/chunks/"):
                chunks[meta.path.rpartition("/")[2]] = meta
            for meta in self._client.list_all(f"{self.root}/bad/"):
                found = self._client.get(meta.path, max_bytes=256)
                if found is not None:
                    self._bad[meta.path.rpartition("/")[2]] = found[0].decode("ascii", "replace")
            self._chunks = chunks
        return self._chunks

    def _key(self, digest: str, codec: str) -> str:
        if not _HEX64.match(digest) or codec not in CODECS:
            raise UnsafeCheckpointError(f"unsafe chunk reference {digest[:70]!r}.{codec[:10]!r}")
        return f"{self.root}/chunks/{digest[:2]}/{digest}.{codec}"

    def _good(self, digest: str, codec: str) -> ObjectMeta | None:
        self._key(digest, codec)
        name = f"{digest}.{codec}"
        meta = self._listing().get(name)
        if meta is None or self._bad.get(name) == meta.etag:
            return None
        return meta

    def exists(self) -> bool:
        return bool(self._listing()) or any(True for _ in self._client.list_all(f"{self.root}/"))

    def find(self, digest: str, raw_len: int) -> tuple[str, int] | None:
        for codec in CODECS:
            meta = self._good(digest, codec)
            if meta is None:
                continue
            if codec == "raw":
                if meta.size == raw_len:
                    return codec, meta.size
                continue
            if 0 < meta.size <= raw_len:
                head = self._client.get_range(meta.path, 0, min(FRAME_HEAD_BYTES, meta.size))
                if frame_size_of(bytes(head), raw_len) == meta.size:
                    return codec, meta.size
        return None

    def has(self, digest: str, codec: str, stored_len: int) -> bool:
        meta = self._good(digest, codec)
        return meta is not None and meta.size == stored_len

    def put(self, digest: str, codec: str, data: memoryview | bytes) -> int:
        key = self._key(digest, codec)
        name = f"{digest}.{codec}"
        self._listing()
        if self._bad.pop(name, None) is not None:  # this put replaces the damaged copy
            self._client.delete([f"{self.root}/bad/{name}"])
        view = memoryview(data).cast("B")
        etag = self._client.put(
            key, view, part_bytes=self._storage.part_bytes, max_concurrency=self._storage.max_concurrency
        )
        if self._chunks is not None:
            self._chunks[name] = ObjectMeta(key, len(view), time.time(), etag)
        return len(view)

    def sync(self) -> None:
        """Nothing to do: a PUT is durable when it returns."""

    def read(
        self, digest: str, codec: str, stored_len: int, *, where: str | None = None, tensor: str | None = None
    ) -> bytearray:
        key = self._key(digest, codec)
        found = self._client.get(key, max_bytes=stored_len)  # a larger object is refused unread
        if found is None:
            raise CorruptCheckpointError(
                f"chunk {digest[:16]}….{codec} is missing from the chunk store {self._client.url(self.root)}",
                path=where,
                tensor=tensor,
                kind="missing-chunk",
            )
        if len(found[0]) != stored_len:
            raise CorruptCheckpointError(
                f"chunk {digest}.{codec} has {len(found[0])} bytes, the manifest says {stored_len}",
                path=where,
                tensor=tensor,
                kind="truncated",
            )
        return bytearray(found[0])

    def report_bad(self, digest: str, codec: str) -> None:
        """Records the ETag of the copy now stored: that copy is never referenced again, and the
        next put of the same content (a new ETag) replaces it. Nothing is deleted: a digest
        mismatch may have happened on the wire, and the stored copy may be fine."""
        key = self._key(digest, codec)
        meta = self._client.head(key)
        if meta is None:
            return
        name = f"{digest}.{codec}"
        self._bad[name] = meta.etag
        self._client.put(f"{self.root}/bad/{name}", meta.etag.encode())

    # -- the lock ---------------------------------------------------------------------------------
    def _markers(self) -> dict[str, float]:
        """Live lock markers: name -> expiry (expired and damaged ones are left out)."""
        live: dict[str, float] = {}
        now = self._storage.clock()
        for meta in self._client.list_all(f"{self.root}/locks/"):
            found = self._client.get(meta.path, max_bytes=4096)
            if found is None:
                continue
            try:
                expires = float(json.loads(found[0])["expires"])
            except (ValueError, TypeError, KeyError):
                continue
            if expires > now:
                live[meta.path.rpartition("/")[2]] = expires
        return live

    def _marker(self, name: str, *, create: bool) -> str:
        path = f"{self.root}/locks/{name}"
        record = json.dumps({"expires": self._storage.clock() + _LOCK_TTL_S}).encode()
        if not create:
            return self._client.put(path, record)
        try:
            return self._client.put(path, record, mode="create")
        except DocumentConflictError:
            found = self._client.get(path, max_bytes=4096)
            if found is None:
                raise
            try:
                expired = float(json.loads(found[0])["expires"]) <= self._storage.clock()
            except (ValueError, TypeError, KeyError):
                expired = True
            if not expired:
                raise
            # A dead sweeper's marker: taken over by compare-and-swap on its ETag.
            return self._client.put(path, record, mode={"e_tag": found[1].etag})

    @contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[None]:
        """Shared by saves, exclusive for a sweep (see the module docstring); waits, never fails,
        for the other side -- up to the markers' expiry."""
        mine = "exclusive" if exclusive else f"shared-{secrets.token_hex(8)}"
        path = f"{self.root}/locks/{mine}"
        while True:
            try:
                self._marker(mine, create=exclusive)
            except DocumentConflictError:
                time.sleep(_LOCK_POLL_S)  # another sweep holds the store
                continue
            live = self._markers()
            others = [n for n in live if n != mine and (exclusive or n == "exclusive")]
            if not others:
                break
            if exclusive:
                # A sweep keeps its marker (new saves back off) and waits for the saves it saw.
                while any(n != mine for n in self._markers()):
                    time.sleep(_LOCK_POLL_S)
                break
            self._client.delete([path])
            time.sleep(_LOCK_POLL_S)
        self._chunks = None  # the listing is read afresh under the lock
        self._exclusive = exclusive
        try:
            yield
        finally:
            self._exclusive = False
            with contextlib.suppress(StorageError):  # the marker expires
                self._client.delete([path])

    def sweep(self, live: set[str], *, dry_run: bool = False) -> SweepReport:
        if not self._exclusive:
            raise StorageError(errno.ENOLCK, f"sweep of {self.root} without locked(exclusive=True)")
        kept = deleted = freed = 0
        doomed: list[str] = []
        for meta in self._client.list_all(f"{self.root}/chunks/"):
            shard, _, name = meta.path[len(self.root) + len("/chunks/") :].partition("/")
            digest, _, codec = name.partition(".")
            if not (_HEX64.match(digest) and codec in CODECS and shard == digest[:2]):
                continue  # not a chunk of ours: never deleted
            if digest in live:
                kept += 1
                continue
            deleted += 1
            freed += meta.size
            doomed.append(meta.path)
        if not dry_run and doomed:
            self._client.delete(doomed)
            gone = {p.rpartition("/")[2] for p in doomed}
            bad = [f"{self.root}/bad/{n}" for n in gone if n in self._bad]
            self._client.delete(bad)
            self._chunks = None
        return SweepReport(live_chunks=kept, deleted_chunks=deleted, freed_bytes=freed, deleted_temporary=0)
