"""Saving: plan → write → commit.

Order of work for one save (each step finishes before the next begins)::

    1. encode the state: tree + blobs (no bytes copied for contiguous CPU tensors)
    2. plan shards: blobs sorted by element size (keeps data aligned), packed into files
    3. begin a storage transaction (staging area; sweeps dead writers' leftovers)
    4. per file: write header and blobs while a second thread hashes the same memory, one pass
       (the file digest is combined from the tensor digests); hashing overlaps the writes
    5. each file's fsync starts in the background the moment its last byte is written, so the
       device flushes while we hash and write the rest; all must succeed before step 6
    6. commit the manifest (the single commit point)

With chunking (incremental or compressed saves), large tensors skip steps 2 and 4: their chunks go
to the run's chunk store first (new chunks only, each fsynced, their directories synced), under the
store's shared lock, which is held until the manifest is committed.

Any failure aborts the transaction: nothing half-written ever becomes visible.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import MANIFEST_NAME, Settings
from ..errors import CheckpointError, StorageError
from ..format.digest import data_file_digest, digest_bytes, new_hasher
from ..format.dtypes import SAFETENSORS_ITEMSIZE
from ..format.manifest import CHUNKED_TENSORS, Manifest, check_file_name
from ..format.strictjson import dumps
from ..format.tensorfile import build_header
from ..format.tree import TreeEncoder
from ..storage.base import ChunkBackend, Storage, WritableFile, WriteTransaction
from ..storage.pools import shared_pool, wait_all
from ..storage.resolve import storage_for
from ..types import FileEntry, TensorEntry
from .arrays import Blob, BlobCollector
from .chunks import ChunkedBlob, ChunkOptions, HintCache, split_blobs, write_chunked
from .feed import PieceFeed
from .sidecar import build_sidecar, sidecar_name


@dataclass(frozen=True)
class SavePlan:
    """What one save will write: the encoded tree and the blobs of each data file, in order.

    A plan is independent of the live state except through its blobs' memory: once the blobs are
    copied (:func:`ckptvault.engine.staging.stage_plan`) the state may change while the plan is
    committed in the background.
    """

    tree: Any
    metadata_tree: Any
    metadata: dict[str, Any]
    shards: list[list[Blob]]
    step: int
    checkpoint_id: str
    created_at: str
    chunked: list[ChunkedBlob] = dataclasses.field(default_factory=list)
    hints: HintCache | None = None
    chunking: ChunkOptions | None = None
    feed: PieceFeed | None = None  # set when the state was too big to stage at once
    # Opaque files stored in the checkpoint beside the data (validation probe, exported program).
    extra_files: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def write_order(self) -> list[Blob]:
        """The blobs a commit reads, in the order it reads them (staging follows this order)."""
        fresh = [c.blob for c in self.chunked if c.reuse is None]
        return fresh + [b for i, shard in enumerate(self.shards) if shard or i == 0 for b in shard]

    @property
    def tensor_bytes(self) -> int:
        return sum(b.nbytes for shard in self.shards for b in shard) + sum(c.nbytes for c in self.chunked)


class _NoLeaves:
    """Leaf codec for metadata: plain values only, never tensors."""

    def encode_leaf(self, value: Any, path: str, name: str) -> dict[str, Any] | None:
        return None

    def decode_leaf(self, node: dict[str, Any], path: str) -> Any:
        raise ValueError(f"{path}: metadata cannot hold arrays or tensors")


NO_LEAVES = _NoLeaves()
_STEP_SUFFIX = re.compile(r"(\d+)$")


def resolve_step(target: str, metadata: dict[str, Any]) -> int:
    """The step a checkpoint is filed under: ``metadata['step']``, else digits ending the name."""
    step = metadata.get("step")
    if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
        return step
    match = _STEP_SUFFIX.search(Path(target).name)
    return int(match.group(1)) if match else 0


def _backend(storage: Storage | None, target: str) -> Storage:
    return storage if storage is not None else storage_for(target)[0]


def plan_save(
    target: str,
    state: Any,
    metadata: dict[str, Any] | None,
    settings: Settings,
    *,
    chunking: ChunkOptions | None = None,
    hints: HintCache | None = None,
    extra_files: dict[str, bytes] | None = None,
    storage: Storage | None = None,
) -> SavePlan:
    """Encodes the state and decides where every blob goes. With ``chunking``, large tensors go to
    the run's chunk store, and ``hints`` (a manager's memory of its last save) skips the unchanged."""
    metadata = dict(metadata or {})
    collector = BlobCollector()
    tree = TreeEncoder(collector).encode(state, "state")
    blobs = collector.finalize()
    chunked: list[ChunkedBlob] = []
    if chunking is not None:
        blobs, chunked = split_blobs(
            blobs, chunking, hints, _backend(storage, target).chunk_store(target), settings.digest
        )
    metadata_tree = TreeEncoder(NO_LEAVES).encode(metadata, "metadata")
    # Larger element sizes first keeps every tensor aligned to its element size in the file.
    ordered = sorted(blobs, key=lambda b: -SAFETENSORS_ITEMSIZE[b.dtype])
    shards: list[list[Blob]] = [[]]
    filled = 0
    preferred = _backend(storage, target).file_bytes
    limit = min(settings.shard_bytes, preferred) if preferred else settings.shard_bytes
    for blob in ordered:
        if shards[-1] and filled + blob.nbytes > limit:
            shards.append([])
            filled = 0
        shards[-1].append(blob)
        filled += blob.nbytes
    return SavePlan(
        tree,
        metadata_tree,
        copy.deepcopy(metadata),
        shards,
        resolve_step(target, metadata),
        uuid.uuid4().hex,
        datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        chunked,
        hints,
        chunking,
        extra_files=_checked_extra_files(extra_files or {}, resolve_step(target, metadata)),
    )


def _checked_extra_files(files: dict[str, bytes], step: int) -> dict[str, bytes]:
    reserved = {MANIFEST_NAME, sidecar_name(step)}
    for name in files:
        check_file_name(name)
        if name in reserved or name.startswith("data-"):
            raise ValueError(f"extra file name {name!r} is reserved for the checkpoint's own files")
    return {name: bytes(data) for name, data in files.items()}


def data_file_name(index: int) -> str:
    return f"data-{index:05d}.safetensors"


def write_data_file(
    syncing: Syncer,
    txn: WriteTransaction,
    name: str,
    blobs: list[Blob],
    checkpoint_id: str,
    algorithm: str,
    hasher_pool: ThreadPoolExecutor,
    feed: PieceFeed | None = None,
) -> tuple[FileEntry, list[TensorEntry]]:
    header = build_header(
        [(b.name, b.dtype, b.shape, b.nbytes) for b in blobs],
        {"format": "ckptvault", "checkpoint_id": checkpoint_id},
    )
    total = len(header) + sum(b.nbytes for b in blobs)
    header_digest = digest_bytes(algorithm, header[8:])

    def hash_all() -> list[str]:
        return [digest_bytes(algorithm, blob.data) for blob in blobs]

    out = txn.create(name, size_hint=total)
    out.write(header)
    # A failed write still waits for the hash reading the same bytes (``finally``): a staged piece
    # is released, and the pool is shared, only once nothing reads it any more.
    if feed is None:
        hashing: Future[list[str]] = hasher_pool.submit(hash_all)
        try:
            for blob in blobs:
                out.write(blob.data)
        finally:
            wait_futures([hashing])
        tensor_digests = hashing.result()
    else:  # staged in pieces: each piece is written while the hash thread reads it, then released
        tensor_digests = []
        for blob in blobs:
            hasher = new_hasher(algorithm, size_hint=blob.nbytes)
            for piece in feed.pieces(blob):
                hashed = hasher_pool.submit(hasher.update, piece)
                try:
                    out.write(piece)
                finally:
                    wait_futures([hashed])
                hashed.result()
            tensor_digests.append(hasher.hexdigest())
    syncing.start(out)
    file_digest = data_file_digest(algorithm, total, header_digest, tensor_digests)
    entries: list[TensorEntry] = []
    cursor = 0
    for blob, digest in zip(blobs, tensor_digests, strict=True):
        entries.append(
            TensorEntry(blob.name, name, blob.dtype, blob.shape, (cursor, cursor + blob.nbytes), digest)
        )
        cursor += blob.nbytes
    return FileEntry(name, total, file_digest, len(header) - 8, header_digest), entries


class Syncer:
    """Closes (fsyncs) written files in the background; ``wait`` re-raises the first failure.

    A failed fsync fails the save: the data may be lost, so it is never retried as success.
    """

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._futures: list[Future[None]] = []

    def start(self, handle: WritableFile) -> None:
        self._futures.append(self._pool.submit(handle.close))

    def wait(self) -> None:
        """Waits for every close started, then raises the first failure."""
        wait_all(self._futures)

    def settle(self) -> None:
        """Waits for every close started, raising nothing (the path of a save already failing)."""
        wait_futures(self._futures)


def write_checkpoint(
    storage: Storage,
    target: str,
    state: Any,
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    settings: Settings | None = None,
    chunking: ChunkOptions | None = None,
    hints: HintCache | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Manifest:
    """Saves ``state`` at ``target`` and returns the committed manifest."""
    settings = settings or Settings.from_env()
    plan = plan_save(
        target,
        state,
        metadata,
        settings,
        chunking=chunking,
        hints=hints,
        extra_files=extra_files,
        storage=storage,
    )
    return commit_plan(storage, target, plan, overwrite=overwrite, settings=settings)


def commit_plan(
    storage: Storage,
    target: str,
    plan: SavePlan,
    *,
    overwrite: bool = False,
    settings: Settings | None = None,
) -> Manifest:
    """Writes, hashes, fsyncs and commits a planned save (the part an async save runs in the
    background); returns the committed manifest. Nothing is visible unless it returns."""
    settings = settings or Settings.from_env()
    store = storage.chunk_store(target) if plan.chunked else None
    # The shared store lock spans the first chunk to the commit: garbage collection waits for it.
    with store.locked(exclusive=False) if store is not None else nullcontext():
        try:
            manifest = _commit_locked(storage, target, plan, store, overwrite, settings)
        except BaseException as exc:
            if plan.feed is not None:
                plan.feed.fail(exc)  # wakes a loop still staging into the feed
            if plan.hints is not None:
                plan.hints.clear()  # what the cache remembers may no longer be in the store
            raise
    if plan.hints is not None:
        plan.hints.remember(plan.chunked, manifest.tensors, manifest.digest_algorithm)
    return manifest


# Test hook: a function that rewrites a plan just before its bytes are hashed and written, used to
# simulate a serialization bug (wrong bytes with consistent digests) that only full validation can
# catch. None in production; ckptvault.testing sets it.
serialization_hook: Callable[[SavePlan], SavePlan] | None = None


def _commit_locked(
    storage: Storage,
    target: str,
    plan: SavePlan,
    store: ChunkBackend | None,
    overwrite: bool,
    settings: Settings,
) -> Manifest:
    if serialization_hook is not None:
        plan = serialization_hook(plan)
    checkpoint_id, created_at, metadata = plan.checkpoint_id, plan.created_at, plan.metadata
    algorithm = settings.digest
    txn = storage.begin(target, overwrite=overwrite)
    try:
        files: dict[str, FileEntry] = {}
        tensors: dict[str, TensorEntry] = {}
        if store is not None:
            chunk_entries, _ = write_chunked(
                store,
                plan.chunked,
                algorithm=algorithm,
                options=plan.chunking or ChunkOptions(),
                threads=settings.io_threads,
                feed=plan.feed,
            )
            tensors.update(chunk_entries)
        # Hashing and fsyncs run on the process's long-lived pools (no thread start per save).
        # Every fsync started here is waited for before an abort (``finally``), so an abort never
        # races a thread still using the transaction's files; the commit waits for them
        # (``wait_files``) while the manifest and staging directory are made durable beside them.
        syncing = Syncer(shared_pool("sync"))
        try:
            hash_pool = shared_pool("hash")
            for index, shard in enumerate(plan.shards):
                if not shard and index > 0:
                    continue
                entry, shard_tensors = write_data_file(
                    syncing, txn, data_file_name(index), shard, checkpoint_id, algorithm, hash_pool, plan.feed
                )
                files[entry.name] = entry
                tensors.update((t.name, t) for t in shard_tensors)
            sidecar = dumps(
                build_sidecar(
                    checkpoint_id=checkpoint_id,
                    step=plan.step,
                    created_at=created_at,
                    metadata=metadata,
                    tensors=len(tensors),
                    tensor_bytes=plan.tensor_bytes,
                ),
                indent=2,
            )
            name = sidecar_name(plan.step)
            out = txn.create(name)
            out.write(sidecar)
            syncing.start(out)
            files[name] = FileEntry(name, len(sidecar), digest_bytes(algorithm, sidecar))
            for name, data in plan.extra_files.items():
                out = txn.create(name, size_hint=len(data))
                out.write(data)
                syncing.start(out)
                files[name] = FileEntry(name, len(data), digest_bytes(algorithm, data))
            manifest = Manifest(
                checkpoint_id=checkpoint_id,
                created_at=created_at,
                step=plan.step,
                digest_algorithm=algorithm,
                files=files,
                tensors=tensors,
                tree=plan.tree,
                metadata=plan.metadata_tree,
                required_features=(CHUNKED_TENSORS,) if plan.chunked else (),
            )
            txn.commit(manifest.to_json(), wait_files=syncing.wait)
        finally:
            syncing.settle()
    except BaseException as exc:
        txn.abort()
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise StorageError(exc.errno or 0, f"saving {target} failed: {exc}") from exc
        raise
    return manifest
