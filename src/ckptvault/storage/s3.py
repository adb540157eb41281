"""The object-store backend: the storage protocol on S3 (and GCS / Azure through the same client),
without a rename anywhere. docs/format.md §14 is the normative layout and protocol; in short:

* a checkpoint ``T`` is committed when ``T/manifest.json`` exists; that object is created last,
  with ``If-None-Match: *`` (two writers never both commit ``T``), and names in its metadata the
  *save id* under which the data files were written first (``<parent>/.ckptvault-saves/<name>/
  <save id>/``), so a save that dies leaves only objects no manifest names;
* documents (run.json, index, pins, registry entries, validation results) change by
  compare-and-swap on their ETag (``If-Match``) or are created with ``If-None-Match: *``; event logs
  append by the same compare-and-swap; a lease is a document with an owner and an expiry;
* what dead saves left is removed by :meth:`S3Storage.recover` (which a run calls when opened)
  and by the next save of the same checkpoint, once older than ``orphan_grace_seconds`` -- a save
  still uploading is never disturbed; a replaced checkpoint's old data stays for the same grace
  so readers holding it finish;
* a failed request is retried by the client (5xx, throttling, resets, timeouts: backoff with
  jitter, bounded); what still fails is a StorageError naming the object.

Keys are URLs (``s3://bucket/a/b``): an error always names the object in the user's terms.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import Any, BinaryIO

from ..config import MANIFEST_NAME, MAX_MANIFEST_BYTES
from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConcurrentWriteError,
    DocumentConflictError,
    StorageError,
)
from .base import Document, Entry, Storage
from .chunkstore import STORE_NAME
from .s3_chunks import S3ChunkStore
from .s3_client import ObjectClient, ObjectMeta, split_url
from .s3_join import S3Participant, check_save_token
from .s3_txn import (
    SAVES_NAME,
    S3Lease,
    S3ReadHandle,
    S3Transaction,
    area_of,
    lease_record,
    parse_lease,
    save_id_of,
)

_APPEND_TRIES = 64
MIN_PART_BYTES = 5 << 20  # S3 refuses a multipart upload whose parts (but the last) are smaller


class S3Storage:
    """Every operation of the storage protocol on one bucket (see the module docstring).

    ``location`` is any URL in the bucket (``s3://bucket/prefix``); client settings (``endpoint``,
    ``region``, ``profile``, ``config``, retry and timeout limits) go to
    :class:`~ckptvault.storage.s3_client.ObjectClient`. ``part_bytes`` and ``max_concurrency`` shape
    multipart uploads and parallel ranged reads; ``file_bytes`` caps a save's data files (64 MiB:
    a load then fetches whole files, several at once, in one request each).
    """

    def __init__(
        self,
        location: str,
        *,
        client: ObjectClient | None = None,
        part_bytes: int = 16 << 20,
        max_concurrency: int = 8,
        file_bytes: int | None = 64 << 20,
        orphan_grace_seconds: float = 3600.0,
        clock: Callable[[], float] = time.time,
        **client_options: Any,
    ) -> None:
        scheme, bucket, _ = split_url(location)
        self.client = client or ObjectClient(scheme, bucket, **client_options)
        self.scheme, self.bucket = scheme, bucket
        self.part_bytes = max(part_bytes, MIN_PART_BYTES)
        self.file_bytes: int | None = file_bytes
        self.max_concurrency = max_concurrency
        self.orphan_grace_seconds = orphan_grace_seconds
        self.clock = clock
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def executor(self) -> Executor:
        """One pool per backend for parallel ranged reads and listings (never one per call)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="ckptvault-s3")
            return self._pool

    # -- naming ---------------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        scheme, bucket, path = split_url(str(key))
        if (scheme, bucket) != (self.scheme, self.bucket):
            raise StorageError(errno.EXDEV, f"{key} is not in {self.client.url('')}")
        return path

    def join(self, prefix: str, *names: str) -> str:
        path = "/".join(p for p in (self._path(prefix), *names) if p)
        return self.client.url(split_url(f"{self.scheme}://{self.bucket}/{path}")[2])

    # -- checkpoints ------------------------------------------------------------------------------
    def _committed(self, target: str) -> tuple[bytes, ObjectMeta, str | None] | None:
        """The manifest of ``target``: bytes, metadata, save id; None if not committed."""
        found = self.client.get(f"{target}/{MANIFEST_NAME}", max_bytes=MAX_MANIFEST_BYTES)
        if found is None:
            return None
        data, meta, attributes = found
        return data, meta, save_id_of(attributes, self.client.url(target))

    def begin(self, target: str, *, overwrite: bool) -> S3Transaction:
        path = self._path(target)
        if not path or self.client.head(path) is not None:
            raise CheckpointExistsError(f"{target!r} exists and is not a checkpoint")
        committed = self.client.head(f"{path}/{MANIFEST_NAME}")
        if committed is not None and not overwrite:
            raise CheckpointExistsError(
                f"{target} is already a checkpoint; pass overwrite=True to replace it"
            )
        if self._has_children(path, committed):
            raise CheckpointExistsError(f"{target} holds other keys and is not a checkpoint; not touching it")
        parent, _, name = path.rpartition("/")
        self._sweep_saves(parent, only=name)
        return S3Transaction(self, path, overwrite)

    def join_transaction(self, target: str, token: str) -> S3Participant:
        """A participant uploading into the area of the save ``token`` (its save id) names."""
        check_save_token(token)
        path = self._path(target)
        if not path:
            raise StorageError(errno.EINVAL, f"{target!r} names no checkpoint")
        return S3Participant(self, path, token)

    def _has_children(self, path: str, committed: ObjectMeta | None) -> bool:
        if committed is not None:
            return False
        prefixes, objects = self.client.list_dir(path)
        return bool(prefixes or objects)

    def open(self, target: str) -> S3ReadHandle:
        path = self._path(target)
        committed = self._committed(path)
        if committed is None:
            raise CheckpointNotFoundError(f"{target}: not a committed checkpoint")
        manifest, meta, save_id = committed
        area = area_of(path, save_id)
        files = {
            m.path[len(area) + 1 :]: m.size
            for m in self.client.list_all(f"{area}/")
            if "/" not in m.path[len(area) + 1 :] and m.path[len(area) + 1 :] != MANIFEST_NAME
        }
        return S3ReadHandle(self.client, path, manifest, meta.etag, files, area, self.executor)

    def iter_checkpoints(self, root: str) -> Iterator[str]:
        """A depth-first walk by delimited listings: never below a checkpoint or a hidden name."""
        path = self._path(root)
        if path and self.client.head(f"{path}/{MANIFEST_NAME}") is not None:
            yield self.client.url(path)
            return
        prefixes, _ = self.client.list_dir(path)
        for child in sorted(prefixes, key=lambda p: p.split("/")):
            if not child.rpartition("/")[2].startswith("."):
                yield from self.iter_checkpoints(self.client.url(child))

    def _entries(self, path: str) -> list[tuple[Entry, str]]:
        """``list`` with each entry's ETag (a checkpoint's is its manifest's): what tokens hash."""
        committed = self._committed(path) if path else None
        if committed is not None:
            _manifest, meta, save_id = committed
            area = area_of(path, save_id)
            out = [
                (
                    Entry(
                        MANIFEST_NAME,
                        self.join(self.client.url(path), MANIFEST_NAME),
                        "document",
                        meta.modified,
                        meta.size,
                    ),
                    meta.etag,
                )
            ]
            for m in self.client.list_all(f"{area}/"):
                name = m.path[len(area) + 1 :]
                if "/" not in name and name != MANIFEST_NAME:
                    out.append(
                        (Entry(name, self.client.url(m.path), "document", meta.modified, m.size), m.etag)
                    )
            return sorted(out, key=lambda e: e[0].name)
        prefixes, objects = self.client.list_dir(path)
        # The saves' data area is the backend's own (as local staging directories are): not listed.
        prefixes = [p for p in prefixes if p.rpartition("/")[2] != SAVES_NAME]
        out = [
            (
                Entry(o.path.rpartition("/")[2], self.client.url(o.path), "document", o.modified, o.size),
                o.etag,
            )
            for o in objects
        ]

        def classify(child: str) -> tuple[Entry, str]:
            name = child.rpartition("/")[2]
            meta = None if name.startswith(".") else self.client.head(f"{child}/{MANIFEST_NAME}")
            if meta is None:
                return Entry(name, self.client.url(child), "directory", 0.0), ""
            return Entry(name, self.client.url(child), "checkpoint", meta.modified, meta.size), meta.etag

        if len(prefixes) > 1:
            out += list(self.executor().map(classify, prefixes))
        else:
            out += [classify(p) for p in prefixes]
        return sorted(out, key=lambda e: e[0].name)

    def list(self, prefix: str) -> list[Entry]:
        return [entry for entry, _ in self._entries(self._path(prefix))]

    def change_token(self, prefix: str) -> str | None:
        """A digest of the listing with every ETag (S3 times have one-second resolution, ETags
        change with every write): one LIST, plus a HEAD per child prefix."""
        path = self._path(prefix)
        entries = self._entries(path)
        if not entries and (not path or self.client.head(path) is None):
            return None
        text = json.dumps([(e.name, e.kind, e.size, tag) for e, tag in entries])
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()

    def delete(self, target: str) -> bool:
        """Deletes the manifest first (the checkpoint is gone at once), then its save's data."""
        path = self._path(target)
        committed = self._committed(path)
        if committed is None:
            return False
        self.client.delete([f"{path}/{MANIFEST_NAME}"])
        area = area_of(path, committed[2])
        self.client.delete([m.path for m in self.client.list_all(f"{area}/")])
        self.drop_strays(path)
        return True

    def drop_strays(self, path: str) -> None:
        """Deletes keys written into a checkpoint's prefix besides its manifest (they go with the
        checkpoint they were put into, as on local disk, where they live in its directory)."""
        manifest = f"{path}/{MANIFEST_NAME}"
        self.client.delete([m.path for m in self.client.list_all(f"{path}/") if m.path != manifest])

    def chunk_store(self, checkpoint: str) -> S3ChunkStore:
        parent = self._path(checkpoint).rpartition("/")[0]
        return S3ChunkStore(self, f"{parent}/{STORE_NAME}" if parent else STORE_NAME)

    def _sweep_saves(self, prefix: str, *, only: str | None = None) -> None:
        """Deletes the data of saves no manifest names, once older than the grace period."""
        base = "/".join(p for p in (prefix, SAVES_NAME, only) if p) + "/"
        areas: dict[tuple[str, str], list[ObjectMeta]] = {}
        root = "/".join(p for p in (prefix, SAVES_NAME) if p) + "/"
        for meta in self.client.list_all(base):
            name, _, rest = meta.path[len(root) :].partition("/")
            save_id, _, _ = rest.partition("/")
            areas.setdefault((name, save_id), []).append(meta)
        horizon = self.clock() - self.orphan_grace_seconds
        current: dict[str, str | None] = {}
        doomed: list[str] = []
        for (name, save_id), metas in sorted(areas.items()):
            if max(m.modified for m in metas) > horizon:
                continue  # a save may still be uploading (or a reader finishing an old version)
            if name not in current:
                target = "/".join(p for p in (prefix, name) if p)
                try:
                    committed = self._committed(target)
                except StorageError:
                    continue
                current[name] = committed[2] if committed else None
            if current[name] != save_id:
                doomed += [m.path for m in metas]
        self.client.delete(doomed)

    # -- documents and event logs ---------------------------------------------------------------
    def get(self, key: str, *, max_bytes: int) -> Document | None:
        found = self.client.get(self._path(key), max_bytes=max_bytes)
        return None if found is None else Document(found[0], found[1].etag)

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_version: str | None = None,
        if_absent: bool = False,
        durable: bool = True,
    ) -> str:
        """A PUT is atomic and durable when it returns; ``durable`` changes nothing here."""
        if if_version is not None and if_absent:
            raise ValueError("if_version and if_absent exclude each other")
        path = self._path(key)
        if not path:
            raise StorageError(errno.EISDIR, f"{key!r} is a bucket, not a document")
        mode: str | dict[str, str] = "overwrite"
        if if_version is not None:
            mode = {"e_tag": if_version}
        elif if_absent:
            mode = "create"
        try:
            return self.client.put(path, bytes(data), mode=mode)
        except DocumentConflictError:
            # Our own PUT may have landed with its answer lost (the retry then fails the
            # condition): the same bytes stored now mean it did.
            meta = self.client.head(path)
            found = None
            if meta is not None and meta.size == len(data):
                with contextlib.suppress(StorageError):  # changed again since the HEAD: not ours
                    found = self.client.get(path, max_bytes=len(data))
            if found is not None and found[0] == data:
                return found[1].etag
            if meta is None and if_version is not None:
                raise DocumentConflictError(errno.ENOENT, f"{key} was removed by another writer") from None
            raise

    def remove(self, key: str, *, if_version: str | None = None) -> bool:
        """With ``if_version``: compared by a HEAD, then deleted (S3 has no portable conditional
        delete; the window between the two is one round trip)."""
        path = self._path(key)
        meta = self.client.head(path)
        if meta is None:
            if if_version is not None:
                raise DocumentConflictError(errno.ENOENT, f"{key} was removed by another writer")
            return False
        if if_version is not None and meta.etag != if_version:
            raise DocumentConflictError(errno.ESTALE, f"{key} was changed by another writer")
        self.client.delete([path])
        return True

    def append(self, key: str, line: bytes) -> None:
        """Object stores have no append: read, add the line, write back if unchanged (CAS)."""
        if not line.endswith(b"\n"):
            raise ValueError(f"an event-log line ends in a newline: {line[-20:]!r}")
        path = self._path(key)
        for attempt in range(_APPEND_TRIES):
            found = self.client.get(path, max_bytes=1 << 40)
            try:
                if found is None:
                    self.client.put(path, line, mode="create")
                else:
                    self.client.put(path, found[0] + line, mode={"e_tag": found[1].etag})
                return
            except DocumentConflictError:
                time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise ConcurrentWriteError(errno.EAGAIN, f"{key}: {_APPEND_TRIES} appends lost to other writers")

    def read_lines(self, key: str, *, max_line: int) -> Iterator[bytes]:
        found = self.client.get(self._path(key), max_bytes=1 << 40)
        data = found[0] if found else b""
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            end = len(data) if end < 0 else end + 1
            if end - start <= max_line:
                yield data[start:end]
            start = end

    def recover(self, prefix: str) -> None:
        """Sweeps the data of dead saves directly under ``prefix`` (past the grace period)."""
        self._sweep_saves(self._path(prefix))

    # -- leases ---------------------------------------------------------------------------------
    def acquire_lease(self, key: str, *, owner: str, ttl_seconds: float) -> S3Lease:
        path = self._path(key)
        found = self.client.get(path, max_bytes=4096)
        now = self.clock()
        if found is not None:
            holder, expires = parse_lease(found[0])
            if expires > now:
                raise ConcurrentWriteError(
                    errno.EWOULDBLOCK, f"{key} is held by {holder} for {expires - now:.1f} s more"
                )
        expires = now + ttl_seconds
        record = lease_record(owner, expires)
        try:
            if found is None:
                etag = self.client.put(path, record, mode="create")
            else:
                etag = self.client.put(path, record, mode={"e_tag": found[1].etag})
        except DocumentConflictError as exc:
            raise ConcurrentWriteError(
                errno.EWOULDBLOCK, f"{key} was taken by another writer meanwhile"
            ) from exc
        return S3Lease(self, key, path, owner, ttl_seconds, etag, expires)

    # -- single published files -----------------------------------------------------------------
    def publish_file(self, target: str, action: str = "write") -> AbstractContextManager[BinaryIO]:
        return self._published(self._path(target), action)

    @contextmanager
    def _published(self, path: str, action: str) -> Iterator[BinaryIO]:
        # Spooled: a small report stays in memory, a multi-GiB export goes through a temporary
        # file and up as a multipart upload. One PUT: the object appears whole or not at all.
        with tempfile.SpooledTemporaryFile(max_size=64 << 20) as buffer:
            yield buffer  # type: ignore[misc]  # an exception in the block propagates: nothing stored
            buffer.seek(0)
            try:
                self.client.put(
                    path, buffer, part_bytes=self.part_bytes, max_concurrency=self.max_concurrency
                )
            except StorageError as exc:
                raise StorageError(
                    exc.errno or 0, f"cannot {action} {self.client.url(path)}: {exc.strerror}"
                ) from exc


def _typecheck() -> Storage:
    """mypy proves here that S3Storage is a Storage (structural typing, no runtime cost)."""
    return S3Storage("s3://bucket")
