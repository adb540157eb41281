"""The object-store backend's checkpoint transactions, read handles and leases (see :mod:`.s3` and
docs/format.md §14).

A save writes its data files under a name no other save uses -- ``<parent>/.ckptvault-saves/
<name>/<save id>/<file>`` -- and commits by creating ``<target>/manifest.json`` with
``If-None-Match: *`` (or replacing it, for an overwrite), the save id in the object's metadata.
No rename anywhere: until that one PUT succeeds nothing is visible, and two writers can never both
commit one checkpoint. Other processes may write into a save's area (participants, :mod:`.s3_join`):
reading the transaction's ``token`` puts the area's join marker, which they check, commit removes
before the manifest's PUT and abort deletes with everything else in the area.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import secrets
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Protocol

from ..config import MANIFEST_NAME, MAX_MANIFEST_BYTES
from ..errors import (
    CheckpointExistsError,
    ConcurrentWriteError,
    CorruptCheckpointError,
    DocumentConflictError,
    StorageError,
)
from .s3_blocks import BlockCache
from .s3_client import BucketOwner, ObjectClient

SAVES_NAME = ".ckptvault-saves"
SAVE_ATTRIBUTE = "ckptvault-save"
#: In a shared save's area while participants may join it (nested: never listed as a file).
JOIN_MARKER = ".ckptvault-join/open"
SAVE_ID = re.compile(r"^[0-9a-f]{32}$")
_RANGE_BYTES = 16 << 20  # one ranged GET; larger reads go as parallel ranges


def area_of(target: str, save_id: str | None) -> str:
    """Where the data files of ``target``'s save ``save_id`` live (``target`` itself for a
    checkpoint copied up by another tool, whose manifest carries no save id)."""
    if save_id is None:
        return target
    parent, _, name = target.rpartition("/")
    return "/".join(p for p in (parent, SAVES_NAME, name, save_id) if p)


def save_id_of(attributes: dict[str, str], where: str) -> str | None:
    """The save id a manifest names; a malformed one is refused (it could name another key)."""
    value = attributes.get(SAVE_ATTRIBUTE)
    if value is None:
        return None
    if not SAVE_ID.fullmatch(value):
        raise CorruptCheckpointError(
            f"manifest names save {value[:70]!r}, not a save id", path=where, kind="bad-manifest"
        )
    return value


def check_file_name(name: str, target: str) -> None:
    """A data file's name: one key component, never the manifest (the commit writes that)."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise StorageError(errno.EINVAL, f"{name!r} is not a file name")
    if name == MANIFEST_NAME:
        raise StorageError(errno.EEXIST, f"{target}/{name} is the commit's to write")


class Uploader(Protocol):
    """What a file reports to: the coordinator's transaction or a participant (:mod:`.s3_join`)."""

    client: ObjectClient

    @property
    def finished(self) -> bool: ...
    def _closed(self, name: str) -> None: ...


class S3WritableFile:
    """One data file, streamed as a multipart upload (parts of ``part_bytes``, several in flight);
    durable when ``close`` returns. ``abort`` cancels the upload (no dangling parts)."""

    def __init__(self, txn: Uploader, name: str, path: str, writer: Any) -> None:
        self._txn = txn
        self._name = name
        self._path = path
        self._writer: Any | None = writer

    def write(self, data: memoryview | bytes, /) -> None:
        if self._writer is None or self._txn.finished:
            raise StorageError(errno.EBADF, f"{self._name} is closed")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1 or not view.contiguous:
            view = view.cast("B") if view.contiguous else memoryview(view.tobytes())
        try:
            # A copy: the client keeps a reference to what it is given until the part is sent,
            # and callers reuse their buffers as soon as write() returns (the protocol's promise).
            self._writer.write(bytes(view))
        except Exception as exc:
            raise self._txn.client.error(exc, self._path, "write") from exc

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as exc:
            raise self._txn.client.error(exc, self._path, "finish writing") from exc
        self._txn._closed(self._name)

    def abort(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            # Leaving the writer's context with an exception aborts its multipart upload; one that
            # cannot be aborted expires by the bucket's lifecycle rule (docs/format.md §14).
            with contextlib.suppress(Exception):
                writer.__exit__(RuntimeError, RuntimeError("save aborted"), None)


class S3Transaction:
    """A save: data under a fresh save id, then the manifest's conditional create (the commit)."""

    def __init__(self, storage: BucketOwner, target: str, overwrite: bool) -> None:
        self.storage = storage
        self.client: ObjectClient = storage.client
        self.target = target
        self.overwrite = overwrite
        self.save_id = secrets.token_hex(16)
        self.area = area_of(target, self.save_id)
        self._open: dict[str, S3WritableFile] = {}
        self._written: set[str] = set()
        self._shared = False  # the token was read: participants may write into the area
        self.finished = False

    @property
    def token(self) -> str:
        """The save id, for participants. The first read puts the area's join marker (one small
        PUT; a save never shared pays nothing) and from then on abort lists the whole area."""
        if not self._shared:
            if self.finished:
                raise StorageError(errno.EBADF, "transaction already finished")
            self._shared = True  # before the PUT: one that fails may still have landed
            self.client.put(f"{self.area}/{JOIN_MARKER}", b"", mode="overwrite")
        return self.save_id

    def create(self, name: str, *, size_hint: int = 0) -> S3WritableFile:
        if self.finished:
            raise StorageError(errno.EBADF, "transaction already finished")
        check_file_name(name, self.target)
        if name in self._written or name in self._open:
            raise StorageError(errno.EEXIST, f"{self.target}/{name} was already created")
        path = f"{self.area}/{name}"
        if self._shared and self.client.head(path) is not None:  # a participant's
            raise StorageError(errno.EEXIST, f"{self.client.url(path)} was already created")
        part = self.storage.part_bytes
        writer = self.client.open_writer(path, part_bytes=part, max_concurrency=self.storage.max_concurrency)
        file = self._open[name] = S3WritableFile(self, name, path, writer)
        return file

    def _closed(self, name: str) -> None:
        self._open.pop(name, None)
        self._written.add(name)

    def commit(self, manifest: bytes, *, wait_files: Callable[[], None] | None = None) -> None:
        if wait_files is not None:
            wait_files()
        if self.finished:
            raise StorageError(0, "transaction already finished")
        if self._open:
            names = sorted(self._open)
            self.abort()
            raise StorageError(errno.EBUSY, f"{names} not closed before the commit")
        if self._shared:
            try:  # no participant joins or creates from here on (they find no marker: ENOENT)
                self.client.delete([f"{self.area}/{JOIN_MARKER}"])
            except StorageError:
                self.abort()
                raise
        key = f"{self.target}/{MANIFEST_NAME}"
        attributes = {SAVE_ATTRIBUTE: self.save_id, "Content-Type": "application/json"}
        try:
            self.client.put(
                key, bytes(manifest), mode="overwrite" if self.overwrite else "create", attributes=attributes
            )
        except DocumentConflictError as exc:
            if self._landed():  # our own PUT took effect; its answer was lost and the retry refused
                self.finished = True
                return
            self.abort()
            raise CheckpointExistsError(
                f"{self.client.url(self.target)} was committed by another writer meanwhile"
            ) from exc
        except StorageError as exc:
            self.finished = True
            if self._landed():
                return
            # The PUT may still be on its way (a timeout or a broken connection): its data stays,
            # so a manifest landing later names whole files; recover() removes them after the
            # grace period if it never does.
            self._written.clear()
            raise StorageError(
                exc.errno or errno.EIO,
                f"{exc.strerror}; the commit of {self.client.url(self.target)} did not answer: the "
                "checkpoint appears whole later or never",
            ) from exc
        self.finished = True
        if self.overwrite:
            self.storage.drop_strays(self.target)

    def _landed(self) -> bool:
        """True when the manifest now stored names this save (the commit happened)."""
        try:
            found = self.client.get(f"{self.target}/{MANIFEST_NAME}", max_bytes=MAX_MANIFEST_BYTES)
        except StorageError:
            return False
        return found is not None and found[2].get(SAVE_ATTRIBUTE) == self.save_id

    def abort(self) -> None:
        """Cancels open uploads and deletes what this save wrote -- every object in the area once
        it was shared (participants' files, the join marker) -- unless the manifest names this save
        (a commit whose answer was lost): then nothing is touched. A participant's upload finishing
        after the listing is left to the sweep of dead saves (recover(), the next save)."""
        for file in list(self._open.values()):
            file.abort()
        self._open.clear()
        was_finished, self.finished = self.finished, True
        if was_finished or not (self._written or self._shared) or self._landed():
            return
        doomed = [f"{self.area}/{name}" for name in sorted(self._written)]
        self._written.clear()
        if self._shared:
            with contextlib.suppress(StorageError):  # unlisted: at least our own files go
                doomed = [m.path for m in self.client.list_all(f"{self.area}/")]
        with contextlib.suppress(StorageError):  # else the next save or recover() sweeps them
            self.client.delete(doomed)


class S3ReadHandle:
    """One committed checkpoint as it was when opened: its manifest bytes and ETag, its save's
    files and sizes. Large reads go as parallel ranged GETs."""

    def __init__(
        self,
        client: ObjectClient,
        target: str,
        manifest: bytes,
        etag: str,
        files: dict[str, int],
        area: str,
        pool: Callable[[], Executor],
    ) -> None:
        self.client = client
        self.target = target
        self._manifest: bytes | None = manifest
        self._etag = etag
        self._files = files
        self._area = area
        self._pool = pool
        self._cache = BlockCache(self._fetch, pool)

    def _check(self, name: str) -> int:
        if self._manifest is None:
            raise StorageError(errno.EBADF, f"{self.client.url(self.target)}: read handle is closed")
        if name == MANIFEST_NAME:
            return len(self._manifest)
        size = self._files.get(name)
        if size is None:
            raise CorruptCheckpointError(
                "file listed in the manifest is missing",
                path=self.client.url(self.target),
                file=name,
                kind="missing-file",
            )
        return size

    def read_manifest(self) -> bytes:
        self._check(MANIFEST_NAME)
        assert self._manifest is not None
        return self._manifest

    def file_names(self) -> list[str]:
        self._check(MANIFEST_NAME)
        return sorted([*self._files, MANIFEST_NAME])

    def size(self, name: str) -> int:
        return self._check(name)

    def read(self, name: str, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(name, offset, memoryview(buffer))
        return bytes(buffer)

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        size = self._check(name)
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        if offset < 0 or offset + len(view) > size:
            raise CorruptCheckpointError(
                f"file ends at byte {size}, expected {offset + len(view)}",
                path=self.client.url(self.target),
                file=name,
                kind="truncated",
            )
        if not len(view):
            return
        if name == MANIFEST_NAME:
            assert self._manifest is not None
            view[:] = self._manifest[offset : offset + len(view)]
            return
        if len(view) < self._cache.block:
            self._cache.read_into(name, size, offset, view)
            return
        starts = range(0, len(view), _RANGE_BYTES)

        def fetch(start: int) -> None:
            length = min(_RANGE_BYTES, len(view) - start)
            view[start : start + length] = self._fetch(name, offset + start, length)

        for future in [self._pool().submit(fetch, s) for s in starts]:
            future.result()

    def _fetch(self, name: str, start: int, length: int) -> memoryview:
        data = self.client.get_range(f"{self._area}/{name}", start, length)
        if len(data) != length:
            raise CorruptCheckpointError(
                f"{len(data)} bytes came back for {length} asked at {start}",
                path=self.client.url(self.target),
                file=name,
                kind="truncated",
            )
        return data

    def mmap(self, name: str, *, copy_on_write: bool = False) -> None:
        """Always None (objects cannot be mapped): callers read instead."""
        self._check(name)

    def is_stale(self) -> bool:
        meta = self.client.head(f"{self.target}/{MANIFEST_NAME}")
        return meta is None or meta.etag != self._etag

    def close(self) -> None:
        self._manifest = None
        self._cache.clear()


class S3Lease:
    """A lease object ``{"owner", "expires", "nonce"}`` changed only by compare-and-swap on its
    ETag: renewing a lease someone else took over fails, and releasing writes ``expires: 0``
    (a conditional delete is not portable) so a taker never loses to a late release."""

    def __init__(
        self, storage: BucketOwner, key: str, path: str, owner: str, ttl: float, etag: str, expires: float
    ):
        self._storage = storage
        self.key = key
        self.owner = owner
        self._path = path
        self._ttl = ttl
        self._etag: str | None = etag
        self._expires = expires

    @property
    def expires(self) -> float:
        return self._expires

    def renew(self) -> None:
        if self._etag is None:
            raise ConcurrentWriteError(errno.ENOLCK, f"the lease of {self.key} was released")
        expires = self._storage.clock() + self._ttl
        try:
            self._etag = self._storage.client.put(
                self._path, lease_record(self.owner, expires), mode={"e_tag": self._etag}
            )
        except DocumentConflictError as exc:
            self._etag = None
            raise ConcurrentWriteError(
                errno.ENOLCK,
                f"the lease of {self.key} was lost: taken by {lease_holder(self._storage, self._path)}",
            ) from exc
        self._expires = expires

    def release(self) -> None:
        etag, self._etag = self._etag, None
        if etag is None:
            return
        with contextlib.suppress(StorageError):  # lost or unreachable: it lapses at its expiry
            self._storage.client.put(self._path, lease_record(self.owner, 0.0), mode={"e_tag": etag})


def lease_record(owner: str, expires: float) -> bytes:
    return json.dumps({"owner": owner, "expires": expires, "nonce": secrets.token_hex(8)}).encode()


def parse_lease(data: bytes) -> tuple[str, float]:
    """(owner, expires) of a stored lease; a damaged one reads as expired (never as held forever)."""
    try:
        doc = json.loads(data)
        owner, expires = doc["owner"], float(doc["expires"])
        if not isinstance(owner, str):
            raise TypeError(owner)
    except (ValueError, TypeError, KeyError):
        return "a damaged lease record", 0.0
    return owner[:200], expires


def lease_holder(storage: BucketOwner, path: str) -> str:
    try:
        found = storage.client.get(path, max_bytes=4096)
    except StorageError:
        return "another writer"
    return parse_lease(found[0])[0] if found else "nobody (released)"
