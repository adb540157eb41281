"""``StorageWriter``: torch.distributed.checkpoint's save, written as a ckptvault checkpoint.

DCP decides who writes what (its planners, dedup of replicated tensors); this class decides how the
bytes land, in the order DCP calls it (docs/distributed.md)::

    all ranks     set_up_storage_writer, prepare_local_plan
    coordinator   prepare_global_plan: begins the storage transaction (the staging area), and hands
                  every rank a ticket -- the transaction's token, the checkpoint id, the target --
                  inside the plan DCP scatters: every rank agrees before writing a byte
    all ranks     write_data: joins the transaction and writes its pieces into its own safetensors
                  files, each tensor digest-checked and each file durable (fsynced) before returning
    coordinator   finish: with every rank's results (DCP gathers them after all ranks returned),
                  writes the tree of non-tensor values, ``dcp.json`` and the sidecar, and commits
                  the manifest -- the single commit point

A rank that fails inside ``write_data`` does not raise there: it deletes its files and reports the
failure in its results, so the coordinator's ``finish`` still runs, aborts the whole transaction
(every rank's files) and raises -- DCP then raises on every rank. A rank that dies takes the
collective down instead; :func:`ckptvault.distributed.save` aborts then, and otherwise the staging
area is swept by the next save or ``gc``. Nothing is visible until the manifest is.

The writer is picklable (DCP's process-based ``async_save`` ships it to a subprocess): only the
target and options travel, never a transaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..config import Settings
from ..engine.arrays import BlobCollector
from ..engine.chunks import ChunkedBlob, ChunkOptions, HintCache, split_blobs, write_chunked
from ..errors import StorageError, UnsupportedStateError
from ..format.dtypes import SAFETENSORS_ITEMSIZE
from ..format.manifest import Manifest, check_file_name
from ..format.tree import TreeEncoder
from ..storage.base import Storage, WriteTransaction
from ..storage.pools import shared_pool
from ..storage.resolve import storage_for
from ..types import FileEntry, TensorEntry
from .arrays_io import encode_piece
from .commit import DistributedCheckpointError, Piece, RankFailure, RankResult, commit_checkpoint
from .portable import portable

# Measured (benchmarks/distributed.py, 2 and 4 ranks on 2 cores): 4 MiB blocks save ~5-10% faster
# than 16 MiB ones -- each block is hashed on one thread, so ranks do not oversubscribe the cores
# with blake3's thread pool -- and a resharding rank over-reads at most 4 MiB at each edge.
DEFAULT_PIECE_BYTES = 4 * 1024 * 1024
FILES_FQN = "\x00ckptvault-files"  # the index of the one result that lists a rank's files


@dataclass(frozen=True)
class Ticket:
    """What the coordinator gives each rank before anything is written (rides DCP's scatter)."""

    target: str
    token: str
    checkpoint_id: str
    rank: int


class StorageWriter:
    """DCP ``StorageWriter`` writing a ckptvault checkpoint at ``path`` (a directory or a URL).

    ``piece_bytes`` caps each stored row block (a rank resharding on load reads, and verifies, only
    the blocks it needs); ``metadata`` is the checkpoint's user metadata (step, metrics...);
    ``overwrite`` replaces a committed checkpoint at ``path``. ``chunking`` (incremental or
    compressed saves, :class:`~ckptvault.engine.chunks.ChunkOptions`) puts each rank's large pieces
    in the run's chunk store, where a piece unchanged since an earlier save costs nothing;
    ``hints`` (this process's :class:`~ckptvault.engine.chunks.HintCache`) skips hashing those a
    version counter proves unchanged. After a save, ``last_chunked`` and ``last_entries`` hold what
    this rank stored (for ``hints.remember`` once the save is known committed).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
        piece_bytes: int = DEFAULT_PIECE_BYTES,
        chunking: ChunkOptions | None = None,
        hints: HintCache | None = None,
    ) -> None:
        if piece_bytes < 4096:
            raise ValueError(f"piece_bytes must be >= 4096, got {piece_bytes}")
        self.path = os.fspath(path)
        self.metadata = dict(metadata or {})
        self.overwrite = overwrite
        self.piece_bytes = piece_bytes
        self.is_coordinator = False
        self.rank = 0
        self._txn: WriteTransaction | None = None
        self._checkpoint_id = ""
        self.committed: Manifest | None = None  # the last commit's manifest (coordinator only)
        self.chunking = chunking
        self.hints = hints
        self.last_chunked: list[ChunkedBlob] = []
        self.last_entries: dict[str, TensorEntry] = {}
        self._held = contextlib.ExitStack()  # the chunk store's shared lock, begin to commit

    # -- pickling: a writer travels without its live parts ---------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_txn=None, committed=None, hints=None, last_chunked=[], last_entries={}, _held=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._held = contextlib.ExitStack()

    # -- DCP's interface -------------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self.abort()

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0) or 0)

    def storage_meta(self) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        return StorageMeta(checkpoint_id=self.path, save_id=None)

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        storage, key = self._storage()
        self.abort()  # an earlier save of this writer that never finished
        if self.chunking is not None:  # garbage collection waits until the commit (or abort)
            self._held.enter_context(storage.chunk_store(key).locked(exclusive=False))
        self._txn = storage.begin(key, overwrite=self.overwrite)
        self._checkpoint_id = checkpoint_id = uuid.uuid4().hex
        return [
            dataclasses.replace(plan, storage_data=Ticket(key, self._txn.token, checkpoint_id, i))
            for i, plan in enumerate(plans)
        ]

    def write_data(self, plan: Any, planner: Any) -> Any:
        import torch
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.storage import WriteResult

        future: Any = torch.futures.Future()  # what DCP waits on
        ticket = plan.storage_data
        txn: WriteTransaction | None = None
        try:
            if not isinstance(ticket, Ticket):
                raise StorageError(
                    0, "the global plan carries no ckptvault ticket (not our prepare_global_plan)"
                )
            storage, key = self._storage()
            if ticket.target != key:
                raise StorageError(
                    0, f"rank {ticket.rank} saves to {key}, the coordinator to {ticket.target}"
                )
            txn = self._txn if self.is_coordinator else storage.join_transaction(key, ticket.token)
            assert txn is not None
            result = self._write(plan, planner, storage, txn, ticket)
        except Exception as exc:  # reported to the coordinator, which aborts everything
            if txn is not None and not self.is_coordinator:
                txn.abort()
            failure = RankFailure(getattr(ticket, "rank", self.rank), f"{type(exc).__name__}: {exc}")
            future.set_result([WriteResult(MetadataIndex(FILES_FQN), 0, failure)])
            return future
        results = [WriteResult(MetadataIndex(FILES_FQN), 0, result)]
        results += [WriteResult(item.index, 0, None) for item in plan.items]
        future.set_result(results)
        return future

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:
        txn, self._txn = self._txn, None
        if txn is None:
            raise StorageError(0, "finish() without a transaction: prepare_global_plan did not run here")
        try:
            ranks = [r.storage_data for rank in results for r in rank if r.index.fqn == FILES_FQN]
            failed = [r for r in ranks if isinstance(r, RankFailure)]
            if failed:
                raise DistributedCheckpointError(
                    f"saving {self.path} failed on rank(s) {[f.rank for f in failed]}: {failed[0].message}",
                    {f.rank: f.message for f in failed},
                )
            self.committed = commit_checkpoint(
                txn,
                self.path,
                self._checkpoint_id,
                created_now(),
                metadata,
                ranks,
                self.metadata,
                Settings.from_env(),
            )
        except BaseException as exc:
            txn.abort()
            raise portable(exc) from exc  # DCP pickles it to every other rank
        finally:
            self._held.close()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    # -- ours ------------------------------------------------------------------------------------
    def abort(self) -> None:
        """Aborts a transaction this writer began and never finished (its staging area and every
        rank's files in it are removed). Safe to call any time."""
        txn, self._txn = self._txn, None
        try:
            if txn is not None:
                txn.abort()
        finally:
            self._held.close()

    def _storage(self) -> tuple[Storage, str]:
        return storage_for(self.path)

    def _write(
        self, plan: Any, planner: Any, storage: Storage, txn: WriteTransaction, ticket: Ticket
    ) -> RankResult:
        from torch.distributed.checkpoint.planner import WriteItemType

        settings = Settings.from_env()
        pieces: list[Piece] = []
        values: dict[str, Any] = {}
        blobs = []
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                lookup = getattr(planner, "lookup_object", None)
                if lookup is None:
                    raise UnsupportedStateError(
                        fqn,
                        "this planner gives non-tensor values only as pickled bytes; use DCP's default one",
                    )
                values[fqn] = value = lookup(item.index)
                # Encoded once here only to refuse what cannot be stored while the failure can
                # still travel in this rank's results (the coordinator encodes it for real).
                TreeEncoder(BlobCollector()).encode(value, fqn)
                continue
            tensor = planner.resolve_data(item)
            for offsets, blob in encode_piece(item, tensor, self.piece_bytes):
                pieces.append(Piece(fqn, offsets, blob.name))
                blobs.append(blob)
        chunked: list[ChunkedBlob] = []
        by_name: dict[str, TensorEntry] = {}
        if self.chunking is not None:  # large pieces into the run's chunk store, new chunks only
            store = storage.chunk_store(ticket.target)
            blobs, chunked = split_blobs(blobs, self.chunking, self.hints, store, settings.digest)
            by_name, _ = write_chunked(
                store, chunked, algorithm=settings.digest, options=self.chunking, threads=settings.io_threads
            )
        files, entries = _write_files(storage, txn, blobs, ticket, settings)
        by_name.update((e.name, e) for e in entries)
        self.last_chunked, self.last_entries = chunked, by_name
        return RankResult(
            ticket.rank,
            tuple(files),
            tuple(dataclasses.replace(p, entry=by_name[p.name]) for p in pieces),
            values,
        )


def _write_files(
    storage: Storage, txn: WriteTransaction, blobs: list[Any], ticket: Ticket, settings: Settings
) -> tuple[list[FileEntry], list[TensorEntry]]:
    """This rank's blobs in safetensors files of at most the shard size, each written while a
    second thread hashes it and fsynced in the background; durable when this returns."""
    from ..engine.writer import Syncer, write_data_file

    preferred = storage.file_bytes
    limit = min(settings.shard_bytes, preferred) if preferred else settings.shard_bytes
    ordered = sorted(blobs, key=lambda b: -SAFETENSORS_ITEMSIZE[b.dtype])
    groups: list[list[Any]] = []
    filled = math.inf
    for blob in ordered:
        if filled + blob.nbytes > limit:
            groups.append([])
            filled = 0
        groups[-1].append(blob)
        filled += blob.nbytes
    files: list[FileEntry] = []
    entries: list[TensorEntry] = []
    syncing = Syncer(shared_pool("sync"))
    hash_pool = shared_pool("hash")
    try:
        for index, group in enumerate(groups):
            name = check_file_name(f"data-r{ticket.rank:05d}-{index:05d}.safetensors")
            entry, tensors = write_data_file(
                syncing, txn, name, group, ticket.checkpoint_id, settings.digest, hash_pool
            )
            files.append(entry)
            entries += tensors
        syncing.wait()
    finally:
        syncing.settle()  # every fsync done before an abort touches the files
    return files, entries


def created_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
