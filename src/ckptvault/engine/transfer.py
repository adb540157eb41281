"""L2: copying one committed checkpoint from one storage to another, verified, with the protocol.

Two-tier runs need it both ways: the manager's mirror uploads each local checkpoint to an object
store, and ``restore`` on a fresh machine pulls the newest one back. One function serves both,
written against the :class:`~ckptvault.storage.base.Storage` protocol only, so any pair of backends
works (local disk -> object store, object store -> local disk, one directory -> another).

What makes the copy safe to rely on:

* **the protocol's commit order** -- every data file is written into a ``dst.begin(...)``
  transaction, the chunks the destination's store lacks are put and synced, and the manifest's
  bytes, unchanged, are committed last. Any failure aborts: nothing becomes visible, and a retry
  starts clean. The destination store's shared lock is held from the first chunk to the commit,
  so a garbage collection there cannot free a chunk the new manifest is about to reference;
* **verification of exactly the bytes written** -- each part is hashed from the same buffer that is
  written, against the manifest: a data file's length prefix, header and every tensor range (the
  header itself is first checked the way every read checks it, :meth:`CheckpointReader.header`), and
  the file digest combined from them as ``verify`` does; a sidecar's whole-file digest; each copied
  chunk through the engine's :func:`~ckptvault.engine.streams.read_chunk` (decoded and
  digest-checked) before its stored bytes are put. A source that rotted fails the copy with a
  :class:`~ckptvault.errors.CorruptCheckpointError` instead of spreading;
* **incremental transfer** -- chunks are content-addressed, so a chunk the destination already has
  (same digest, codec and size) is skipped: after a small change only the changed chunks travel;
* **idempotence** -- a destination already holding a committed checkpoint with the same manifest
  bytes is left alone (``CopyReport.already_present``).

Reads are bounded parts (``part_bytes``) read with ``read_into`` into a small pool of reused buffers;
up to ``threads`` ranged reads (parts of files, chunks) are in flight at once, while one thread
hashes and writes each file's parts in order. Memory is about ``2 * threads * part_bytes`` plus
``threads`` chunks.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass

from ..config import MANIFEST_NAME
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..format.digest import Hasher, chunked_tensor_digest, data_file_digest, new_hasher
from ..format.manifest import parse_manifest
from ..format.tensorfile import HeaderError, header_length
from ..storage.base import ChunkBackend, ReadHandle, Storage, SweepReport, WritableFile, WriteTransaction
from ..types import ChunkRef
from .reader import CheckpointReader
from .streams import read_chunk

DEFAULT_PART_BYTES = 8 * 1024 * 1024
DEFAULT_THREADS = 4
Progress = Callable[[int], None]


@dataclass(frozen=True)
class CopyReport:
    """What one :func:`copy_checkpoint` did. ``bytes_copied`` counts file bytes and stored chunk bytes
    written to the destination; ``bytes_skipped`` the stored bytes of chunks it already had."""

    source: str
    destination: str
    checkpoint_id: str
    files: int
    bytes_copied: int
    chunks_copied: int
    chunks_skipped: int
    bytes_skipped: int
    seconds: float
    already_present: bool = False


def copy_checkpoint(
    src: Storage,
    src_key: str,
    dst: Storage,
    dst_key: str,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    part_bytes: int = DEFAULT_PART_BYTES,
    threads: int = DEFAULT_THREADS,
) -> CopyReport:
    """Copies the committed checkpoint ``src_key`` of ``src`` to ``dst_key`` of ``dst`` (see the
    module docstring): verified, incremental, committed last, nothing visible on failure.

    ``overwrite`` replaces a different committed checkpoint at ``dst_key`` (otherwise
    CheckpointExistsError); an identical one is never rewritten. ``progress`` is called with the
    bytes each copied part or chunk added. Raises CheckpointNotFoundError for a missing source,
    CorruptCheckpointError when the source's bytes disagree with its manifest, StorageError when
    either medium fails.
    """
    if part_bytes < 4096 or threads < 1:
        raise ValueError(f"part_bytes must be >= 4096 and threads >= 1, got {part_bytes} and {threads}")
    started = time.perf_counter()
    with CheckpointReader(src, src_key) as reader:
        manifest_bytes = reader.handle.read_manifest()
        if parse_manifest(manifest_bytes, path=src_key) != reader.manifest:  # replaced between reads
            raise CheckpointNotFoundError(f"{src_key} was replaced while being copied; copy it again")
        counts = _Counts(reader.manifest.checkpoint_id)
        if _holds(dst, dst_key, manifest_bytes):
            return counts.report(src_key, dst_key, started, already_present=True)
        chunked = any(t.chunks is not None for t in reader.manifest.tensors.values())
        dst_store = dst.chunk_store(dst_key) if chunked else None
        txn = dst.begin(dst_key, overwrite=overwrite)
        try:
            lock: AbstractContextManager[None] = (
                dst_store.locked(exclusive=False) if dst_store is not None else contextlib.nullcontext()
            )
            pool = ThreadPoolExecutor(threads, thread_name_prefix="ckptvault-copy")
            with lock:
                try:
                    pending = _copy_chunks(reader, dst_store, pool, counts) if dst_store is not None else []
                    _copy_files(reader, txn, pool, counts, part_bytes, 2 * threads, progress)
                    for future, stored in pending:
                        future.result()
                        counts.chunk_copied(stored)
                        if progress is not None:
                            progress(stored)
                finally:  # on a failure, reads not started yet are not worth starting
                    pool.shutdown(wait=True, cancel_futures=True)
                if dst_store is not None:
                    dst_store.sync()
                txn.commit(manifest_bytes)
        except BaseException:
            with contextlib.suppress(Exception):
                txn.abort()
            raise
    return counts.report(src_key, dst_key, started)


def _holds(dst: Storage, key: str, manifest_bytes: bytes) -> bool:
    """Whether ``dst`` already has a committed checkpoint at ``key`` with exactly these manifest
    bytes (what the protocol committed after its data: nothing to do)."""
    try:
        handle = dst.open(key)
    except CheckpointNotFoundError:
        return False
    try:
        return handle.read_manifest() == manifest_bytes
    except CorruptCheckpointError:
        return False  # a damaged destination manifest: replaced (with overwrite) by the copy
    finally:
        handle.close()


class _Counts:
    """The running totals of one copy (updated on the calling thread only)."""

    def __init__(self, checkpoint_id: str) -> None:
        self.checkpoint_id = checkpoint_id
        self.files = self.bytes_copied = self.chunks_copied = self.chunks_skipped = self.bytes_skipped = 0

    def chunk_copied(self, stored: int) -> None:
        self.chunks_copied += 1
        self.bytes_copied += stored

    def report(self, src: str, dst: str, started: float, *, already_present: bool = False) -> CopyReport:
        return CopyReport(
            src,
            dst,
            self.checkpoint_id,
            self.files,
            self.bytes_copied,
            self.chunks_copied,
            self.chunks_skipped,
            self.bytes_skipped,
            time.perf_counter() - started,
            already_present,
        )


# -- chunks -----------------------------------------------------------------------------------------
def _copy_chunks(
    reader: CheckpointReader, dst_store: ChunkBackend, pool: ThreadPoolExecutor, counts: _Counts
) -> list[tuple[Future[None], int]]:
    """Submits a copy of every distinct referenced chunk ``dst_store`` lacks; returns the futures
    with each chunk's stored size. Each tensor's chunk list is checked against its digest first."""
    algorithm = reader.algorithm
    seen: set[tuple[str, str, int]] = set()
    pending: list[tuple[Future[None], int]] = []
    for entry in reader.manifest.tensors.values():
        if entry.chunks is None:
            continue
        if chunked_tensor_digest(algorithm, entry.nbytes, [c.digest for c in entry.chunks]) != entry.digest:
            raise CorruptCheckpointError(
                "chunk list does not match the tensor digest",
                path=reader.path,
                tensor=entry.name,
                kind="digest-mismatch",
            )
        for ref in entry.chunks:
            key = (ref.digest, ref.codec, ref.stored_len)
            if key in seen:
                continue
            seen.add(key)
            if dst_store.has(ref.digest, ref.codec, ref.stored_len):
                counts.chunks_skipped += 1
                counts.bytes_skipped += ref.stored_len
                continue
            future = pool.submit(_copy_chunk, reader, dst_store, ref, entry.name)
            pending.append((future, ref.stored_len))
    return pending


def _copy_chunk(reader: CheckpointReader, dst_store: ChunkBackend, ref: ChunkRef, tensor: str) -> None:
    """One chunk: read and verified by the engine's own chunk read, then its stored bytes put."""
    captured = _Captured(reader.store)
    read_chunk(captured, ref, algorithm=reader.algorithm, where=reader.path, tensor=tensor)
    assert captured.stored is not None  # read_chunk reads before it verifies
    dst_store.put(ref.digest, ref.codec, memoryview(captured.stored))


class _Captured:
    """A chunk store that keeps the stored bytes of the chunk read through it: what
    :func:`read_chunk` verified is exactly what the copy then puts (no second read, no second
    verifier)."""

    def __init__(self, inner: ChunkBackend) -> None:
        self.inner = inner
        self.stored: bytearray | None = None

    def exists(self) -> bool:
        return self.inner.exists()

    def find(self, digest: str, raw_len: int) -> tuple[str, int] | None:
        return self.inner.find(digest, raw_len)

    def has(self, digest: str, codec: str, stored_len: int) -> bool:
        return self.inner.has(digest, codec, stored_len)

    def put(self, digest: str, codec: str, data: memoryview | bytes) -> int:
        return self.inner.put(digest, codec, data)

    def sync(self) -> None:
        self.inner.sync()

    def read(
        self, digest: str, codec: str, stored_len: int, *, where: str | None = None, tensor: str | None = None
    ) -> bytearray:
        self.stored = self.inner.read(digest, codec, stored_len, where=where, tensor=tensor)
        return self.stored  # read_chunk only reads it (decodes from it, or hashes a raw one in place)

    def report_bad(self, digest: str, codec: str) -> None:
        self.inner.report_bad(digest, codec)

    def locked(self, *, exclusive: bool) -> AbstractContextManager[None]:
        return self.inner.locked(exclusive=exclusive)

    def sweep(self, live: set[str], *, dry_run: bool = False) -> SweepReport:
        return self.inner.sweep(live, dry_run=dry_run)


# -- files ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Segment:
    start: int
    end: int
    digest: str
    tensor: str | None  # None: the header (data files) or the whole file (sidecars)


class _FileCheck:
    """The digests one file's bytes must match, fed in order as they stream past.

    A data file is its 8-byte header length, its header and its tensors' bytes, densely: each range
    is hashed on its own and the file digest is recombined from them (what ``verify`` checks); any
    other file has one whole-file digest. Built after :meth:`CheckpointReader.header` validated the
    header against the manifest, so the ranges are the manifest's, proven to fit the file."""

    def __init__(self, reader: CheckpointReader, name: str) -> None:
        entry = reader.manifest.files[name]
        self.reader = reader
        self.name = name
        self.size = entry.size
        self.header_size = entry.header_size
        if entry.header_size is None:
            reader.check_size(name)
            segments = [_Segment(0, entry.size, entry.digest, None)]
        else:
            reader.header(name)
            start = 8 + entry.header_size
            segments = [_Segment(8, start, str(entry.header_digest), None)]
            tensors = reader.tensors_in(name)
            segments += [
                _Segment(start + t.offsets[0], start + t.offsets[1], t.digest, t.name) for t in tensors
            ]
            combined = data_file_digest(
                reader.algorithm, entry.size, str(entry.header_digest), [t.digest for t in tensors]
            )
            if combined != entry.digest or any(a.end != b.start for a, b in itertools.pairwise(segments)):
                raise self._corrupt("file digest disagrees with its parts", None)
            if segments[-1].end != entry.size:
                raise self._corrupt("tensor bytes do not fill the file", None)
        self.segments = segments
        self.hashers: list[Hasher] = [
            new_hasher(reader.algorithm, size_hint=s.end - s.start) for s in segments
        ]
        self.prefix = bytearray()
        self._first = 0

    def _corrupt(self, message: str, tensor: str | None) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            message, path=self.reader.path, file=self.name, tensor=tensor, kind="digest-mismatch"
        )

    def update(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        if self.header_size is not None and offset < 8:
            self.prefix += data[: 8 - offset]
        while self._first < len(self.segments) and self.segments[self._first].end <= offset:
            self._first += 1
        for i in range(self._first, len(self.segments)):
            segment = self.segments[i]
            if segment.start >= end:
                break
            lo, hi = max(segment.start, offset), min(segment.end, end)
            if hi > lo:
                self.hashers[i].update(data[lo - offset : hi - offset])

    def finish(self) -> None:
        if self.header_size is not None:
            try:
                declared = header_length(bytes(self.prefix), self.size)
            except HeaderError as exc:
                raise self._corrupt(str(exc), None) from exc
            if declared != self.header_size:
                raise self._corrupt(f"header is {declared} bytes, manifest says {self.header_size}", None)
        for segment, hasher in zip(self.segments, self.hashers, strict=True):
            if hasher.hexdigest() != segment.digest:
                what = (
                    "tensor bytes" if segment.tensor else "header" if self.header_size is not None else "file"
                )
                raise self._corrupt(
                    f"{what} do not match their digest (bit rot or tampering)", segment.tensor
                )


def _parts(reader: CheckpointReader, part_bytes: int) -> Iterator[tuple[str, int, int]]:
    for name in sorted(reader.manifest.files):
        size = reader.manifest.files[name].size
        for offset in range(0, size, part_bytes):
            yield name, offset, min(part_bytes, size - offset)


def _read_part(handle: ReadHandle, name: str, offset: int, buffer: memoryview) -> memoryview:
    handle.read_into(name, offset, buffer)
    return buffer


def _copy_files(
    reader: CheckpointReader,
    txn: WriteTransaction,
    pool: ThreadPoolExecutor,
    counts: _Counts,
    part_bytes: int,
    window: int,
    progress: Progress | None,
) -> None:
    """Every listed file, its parts read ``window`` at a time ahead (ranged reads in parallel, into
    reused buffers) and hashed and written in order on this thread."""
    names = sorted(reader.manifest.files)
    if MANIFEST_NAME in names:  # parse_manifest refuses it; never write the manifest as data
        raise CorruptCheckpointError("the manifest lists itself", path=reader.path, kind="bad-manifest")
    checks = {name: _FileCheck(reader, name) for name in names}
    free: list[bytearray] = []
    inflight: deque[tuple[str, int, bytearray, Future[memoryview]]] = deque()
    parts = _parts(reader, part_bytes)
    current: tuple[str, WritableFile] | None = None
    done: set[str] = set()

    def submit() -> bool:
        part = next(parts, None)
        if part is None:
            return False
        name, offset, length = part
        buffer = free.pop() if free else bytearray(part_bytes)
        view = memoryview(buffer)[:length]
        inflight.append((name, offset, buffer, pool.submit(_read_part, reader.handle, name, offset, view)))
        return True

    def open_file(name: str) -> WritableFile:
        for earlier in names[: names.index(name)]:  # empty files have no parts: create them in turn
            if earlier not in done:
                close_file(earlier, txn.create(earlier, size_hint=0))
        return txn.create(name, size_hint=reader.manifest.files[name].size)

    def close_file(name: str, file: WritableFile) -> None:
        checks[name].finish()
        file.close()
        done.add(name)
        counts.files += 1

    while len(inflight) < window and submit():
        pass
    while inflight:
        name, offset, buffer, future = inflight.popleft()
        view = future.result()
        if current is None or current[0] != name:
            if current is not None:
                close_file(*current)
            current = (name, open_file(name))
        checks[name].update(offset, view)
        current[1].write(view)
        counts.bytes_copied += len(view)
        if progress is not None:
            progress(len(view))
        free.append(buffer)
        submit()
    if current is not None:
        close_file(*current)
    for name in names:
        if name not in done:
            close_file(name, txn.create(name, size_hint=0))
