"""The storage protocol: every operation the library performs on storage, and nothing more.

This is the one door (docs/format.md, "Run layout"): nothing above ``storage/`` touches a file, a
directory, a lock or an object any other way, so a new backend (an object store, a test double, a
fault injector) is one new class, not a rewrite. Keys are strings the backend resolves: paths for
:class:`~ckptvault.storage.local.LocalStorage`, ``bucket/prefix`` keys for an object store. A key
names either a *checkpoint* (a directory-like unit published atomically), a *document* (one small
file), an *event log*, a *lease*, or a *chunk store*; ``join`` builds child keys.

1. **Checkpoint transactions** -- a writer uses them in exactly this order::

       txn = storage.begin(target, overwrite=...)    # private staging area; sweeps dead leftovers
       f = txn.create(name); f.write(...); f.close()    # each file durable when close() returns
       txn.commit(manifest_bytes)                     # manifest written last: the commit point
       # or txn.abort() on any failure: nothing becomes visible

   A save may be written by several processes (the ranks of a torch.distributed job): the
   transaction from ``begin`` -- the *coordinator* -- hands its ``token`` to the others, each calls
   ``storage.join_transaction(target, token)`` and writes its own files into the same staging area
   through that *participant*; once every rank's files are durable (their ``close`` returned) the
   coordinator alone commits, publishing them all in its one atomic step.

2. **Reads** -- :meth:`Storage.open` gives a :class:`ReadHandle` on a committed checkpoint: whole and
   ranged reads, an optional map. ``close`` closes its files; maps it handed out stay valid.
3. **Listing and deletion** -- :meth:`Storage.list` shows a prefix's children, committed checkpoints
   only (a staging area or a half-deleted checkpoint is never listed as one);
   :meth:`Storage.change_token` is a cheap token that changes when the listing may have changed (the
   catalog's sync skips what did not); :meth:`Storage.delete` removes a checkpoint so that it is
   never half visible, idempotently.
4. **Documents with compare-and-swap** -- run.json, the run index, pins, registry entries and aliases,
   validation results: :meth:`Storage.get` returns ``(bytes, version)``; :meth:`Storage.put` with
   ``if_version=`` or ``if_absent=True`` raises :class:`~ckptvault.errors.DocumentConflictError`
   when another writer got there first. Reads are bounded (``max_bytes``): a document is untrusted.
5. **Event logs** -- :meth:`Storage.append` adds one line; :meth:`Storage.read_lines` yields the
   lines, each bounded, damaged ones included (the caller decides what a line means).
6. **Leases** -- :meth:`Storage.acquire_lease` for run ownership (one writer per run): owner, expiry,
   renewal; a second writer gets :class:`~ckptvault.errors.ConcurrentWriteError` naming the holder.
7. **Chunk stores** -- :meth:`Storage.chunk_store` gives the content-addressed store of the run a
   checkpoint belongs to (:class:`ChunkBackend`): put-if-absent by digest, find/has, read, sweep.
8. **Single published files** -- :meth:`Storage.publish_file` writes one file outside any run (an
   export, a report) that appears whole or not at all.

A backend instance may be *rooted* at a location the user named (``LocalStorage(root=...)``): below
it a local backend never follows a link and creates missing directories itself.

Backends map a failure of the medium to :class:`~ckptvault.errors.StorageError` and are configured
by constructor arguments (``storage.resolve`` maps a URL to one), never by the environment in the
middle of a write.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Literal, Protocol

EntryKind = Literal["checkpoint", "document", "directory"]


@dataclass(frozen=True)
class Document:
    """A small document's bytes and the version a compare-and-swap ``put`` names."""

    data: bytes
    version: str


@dataclass(frozen=True)
class Entry:
    """One child of a listed prefix. ``modified`` is seconds since the epoch and ``size`` bytes: a
    document's own; a checkpoint's manifest's (its commit time and size); 0 for a directory.
    ``key`` can be handed to the other calls."""

    name: str
    key: str
    kind: EntryKind
    modified: float
    size: int = 0


@dataclass(frozen=True)
class SweepReport:
    """What one sweep of a chunk store found and did."""

    live_chunks: int
    deleted_chunks: int
    freed_bytes: int
    deleted_temporary: int


class WritableFile(Protocol):
    def write(self, data: memoryview | bytes, /) -> None:
        """Writes all of ``data`` (no short writes surface to the caller). The caller may reuse
        ``data``'s buffer as soon as this returns: a backend that sends later keeps a copy."""

    def close(self) -> None:
        """Makes the file durable (fsync or equivalent) and releases it."""


class WriteTransaction(Protocol):
    """A save in progress: the *coordinator* ``begin`` returned, or a *participant* from
    ``join_transaction`` writing into the coordinator's staging area (a multi-rank save: every rank
    writes its own files, the coordinator commits once all of them are durable)."""

    @property
    def token(self) -> str:
        """Names this transaction's staging area: opaque, printable ASCII of at most 200
        characters, safe to send to other processes, which pass it to
        :meth:`Storage.join_transaction`. A participant's is its coordinator's. (An object store
        may record on first read that the area is shared, so read it only to share it.)"""
        ...

    def create(self, name: str, *, size_hint: int = 0) -> WritableFile:
        """A new file; ``size_hint`` (its expected size) lets a backend pick a write path. A name
        already in the staging area (written by anyone) raises StorageError EEXIST where the
        backend can tell (a participant's only best effort on an object store)."""

    def commit(self, manifest: bytes, *, wait_files: Callable[[], None] | None = None) -> None:
        """Writes the manifest last and publishes the checkpoint atomically and durably, with
        every file in the staging area, participants' included. Every created file is closed
        first, or by ``wait_files``: the caller's wait for files it is still closing (fsyncing) in
        the background, which the commit calls before it publishes -- a backend may make the
        manifest durable meanwhile, so a save pays one round of fsyncs, not two.
        CheckpointExistsError when another writer committed the target meanwhile (and this one
        was not an overwrite). A participant's raises StorageError EPERM and changes nothing:
        only the transaction that began the save commits it."""

    def abort(self) -> None:
        """Discards everything written; safe to call more than once, after a failed commit, and
        after a successful one (then it does nothing). The coordinator's discards participants'
        files too; a participant's only its own, best effort (never raising for an area gone)."""


class ReadHandle(Protocol):
    def read_manifest(self) -> bytes: ...
    def file_names(self) -> list[str]:
        """Every file of the checkpoint, the manifest included, sorted."""

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


class Lease(Protocol):
    """Ownership of a key (a run) until ``expires``; renew before then or lose it."""

    key: str
    owner: str

    @property
    def expires(self) -> float:
        """When the lease lapses (seconds since the epoch; ``inf`` where the backend ties it to the
        holding process instead, as local disk does)."""

    def renew(self) -> None:
        """Extends the lease; raises ConcurrentWriteError if it was lost (expired and taken)."""

    def release(self) -> None:
        """Gives the lease up, only while this holder still has it; idempotent."""


class ChunkBackend(Protocol):
    """One run's content-addressed chunk store (incremental saves). Thread-safe: a save puts chunks
    from a thread pool. Names are ``<digest>.<codec>``; nothing outside the store is touched."""

    def exists(self) -> bool:
        """True when the store was ever created (a sweep of a run without one creates nothing); a
        store that is not what this library creates (a link, on local disk) raises StorageError."""

    def find(self, digest: str, raw_len: int) -> tuple[str, int] | None:
        """An existing, whole-looking chunk of this content as ``(codec, stored size)``."""

    def has(self, digest: str, codec: str, stored_len: int) -> bool: ...

    def put(self, digest: str, codec: str, data: memoryview | bytes) -> int:
        """Stores one chunk durably under its final name (replacing a damaged copy); its size."""

    def sync(self) -> None:
        """Makes every chunk put since the last call durable (called before the manifest commits)."""

    def read(
        self, digest: str, codec: str, stored_len: int, *, where: str | None = None, tensor: str | None = None
    ) -> bytearray:
        """The stored bytes of one chunk; a missing or wrong-sized one raises CorruptCheckpointError."""

    def report_bad(self, digest: str, codec: str) -> None:
        """Marks the copy now stored under this name as damaged: never referenced again."""

    def locked(self, *, exclusive: bool) -> AbstractContextManager[None]:
        """The store's lease: shared while a save adds chunks, exclusive while a sweep runs."""

    def sweep(self, live: set[str], *, dry_run: bool = False) -> SweepReport:
        """Deletes chunks whose digest is not in ``live`` and temporary leftovers; call it holding
        ``locked(exclusive=True)``. Never deletes a file it did not create."""


class Storage(Protocol):
    #: The largest data file a save should write here (None: no preference). An object store
    #: serves many mid-sized objects in parallel better than one huge one; a disk does not care.
    file_bytes: int | None

    # -- naming -------------------------------------------------------------------------------
    def join(self, prefix: str, *names: str) -> str:
        """The key of ``names`` under ``prefix`` (a path join on disk, ``/`` on object stores)."""

    # -- checkpoints: write, read, list, delete -------------------------------------------------
    def begin(self, target: str, *, overwrite: bool) -> WriteTransaction:
        """A private staging area for ``target``. CheckpointExistsError when ``target`` is committed
        and not ``overwrite``, or is a non-empty prefix that is not a checkpoint."""

    def join_transaction(self, target: str, token: str) -> WriteTransaction:
        """A participant in the save of ``target`` that ``begin`` started (in any process) and whose
        ``token`` this is: its files land in the same staging area, durable when their ``close``
        returns; the coordinator publishes them with its commit (see :class:`WriteTransaction`).

        Why: a multi-rank save writes each rank's shards from that rank, never through one
        process. The token comes over the network, so it is untrusted input: a malformed one (wrong
        shape, path separators, naming another target's staging area, a link, not a directory)
        raises StorageError EINVAL and touches nothing; one whose area is gone (the save was aborted
        or committed, or its dead writer's leftovers swept) raises StorageError ENOENT, here or at
        ``create`` (on an object store a token is a bare save id that cannot name another target's
        area: there a foreign one is unknown, ENOENT). A participant never locks or sweeps."""

    def open(self, target: str) -> ReadHandle: ...

    def iter_checkpoints(self, root: str) -> Iterator[str]:
        """Every committed checkpoint under ``root`` (itself included): a depth-first walk with
        sorted children, never below another checkpoint nor through a hidden (``.``) name."""

    def list(self, prefix: str) -> list[Entry]:
        """The children of ``prefix`` (empty when it does not exist): committed checkpoints,
        documents and directories, hidden names (``.``) included; staging areas are never shown as
        checkpoints."""

    def change_token(self, prefix: str) -> str | None:
        """A token that differs whenever ``list(prefix)`` may differ; None if ``prefix`` is gone."""

    def delete(self, target: str) -> bool:
        """Removes a committed checkpoint, never leaving it half visible; False if it was absent."""

    def chunk_store(self, checkpoint: str) -> ChunkBackend:
        """The chunk store of the run ``checkpoint`` belongs to (created on first put); any key
        directly in the run names the same store (garbage collection passes the store's own)."""

    # -- small documents ------------------------------------------------------------------------
    def get(self, key: str, *, max_bytes: int) -> Document | None:
        """The document, or None when absent; larger than ``max_bytes`` raises StorageError, as
        does a key that names something other than a document."""

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_version: str | None = None,
        if_absent: bool = False,
        durable: bool = True,
    ) -> str:
        """Replaces the document atomically (creating missing parents) and returns its new version.
        ``if_version`` / ``if_absent`` (at most one) make it conditional: DocumentConflictError when
        the condition fails. A version is opaque; identical bytes may share one (a compare-and-swap
        detects changed content, not intervening writes). ``durable=False`` may skip the flush for
        derived data a crash may lose."""

    def remove(self, key: str, *, if_version: str | None = None) -> bool:
        """Deletes the document; False if it was absent. With ``if_version``, a changed or absent
        document raises DocumentConflictError."""

    # -- event logs -----------------------------------------------------------------------------
    def append(self, key: str, line: bytes) -> None:
        """Appends one line (``line`` ends in a newline) to the log at ``key``, creating it."""

    def read_lines(self, key: str, *, max_line: int) -> Iterator[bytes]:
        """The log's lines as stored, oldest first, newline included (a torn last line has none);
        a line of more than ``max_line`` bytes, newline included, is skipped unread."""

    # -- leases -----------------------------------------------------------------------------------
    def acquire_lease(self, key: str, *, owner: str, ttl_seconds: float) -> Lease:
        """Ownership of ``key``; ConcurrentWriteError (naming the holder) when another holds it."""

    def recover(self, prefix: str) -> None:
        """Removes what writers killed mid-``put`` left directly under ``prefix`` (temporary
        documents); a put in progress is never disturbed, so any writer may call it, lease or not."""

    # -- single files outside runs --------------------------------------------------------------
    def publish_file(self, target: str, action: str = "write") -> AbstractContextManager[BinaryIO]:
        """A file written through the handle appears at ``target`` (parents created) whole and
        durable on a clean exit of the block, and not at all on an exception."""
