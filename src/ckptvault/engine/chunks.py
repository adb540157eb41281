"""Chunked tensors: incremental (deduplicated) and compressed storage of large tensors.

A tensor of at least ``min_bytes`` is cut into fixed ``chunk_bytes`` pieces. Each piece is named by
the digest of its bytes and stored once in the run's chunk store
(:mod:`ckptvault.storage.chunkstore`); a checkpoint lists the pieces of each such tensor. So a
frozen backbone, an embedding table of which 1% of the rows moved, or an EMA copy that did not
change costs a checkpoint only the chunks that differ.

Finding what changed costs a hash of every byte, unless a cheaper proof exists. For torch tensors
the :class:`HintCache` of a manager remembers, per tensor, the storage object (weakly), its geometry
and torch's version counter, which every in-place operation on the tensor or its views bumps. When
all are equal at the next save, and a sample of the bytes still hashes the same, the tensor is not
re-hashed, not staged and not written. The version counter misses writes through ``.data`` and
through other libraries' raw pointers; the sample catches whole-tensor rewrites of that kind but
not every sparse one, so ``trust_version_counter=False`` always hashes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CorruptCheckpointError, StorageError
from ..format import codec
from ..format.digest import chunked_tensor_digest, digest_bytes
from ..format.dtypes import SAFETENSORS_ITEMSIZE
from ..storage.base import ChunkBackend
from ..types import ChunkRef, TensorEntry
from .arrays import Blob
from .arrays import version_key as version_key  # its old home; kept importable
from .feed import PieceFeed
from .fresh import fresh_bytes
from .streams import read_chunk

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024  # measured: 4 MiB files write as fast as one big file with 4 threads
# Smaller tensors stay in the checkpoint's data file, which every save writes and every mirror
# upload sends whole, changed or not: at a quarter chunk (1 MiB) that was 2-4% of a realistic
# state, re-sent each time (benchmarks/s3_checkpoint.py --parts 3). From 64 KiB a tensor is worth
# its own chunk file; below it (biases and norms) the per-chunk put costs more than it saves.
MIN_CHUNKED_BYTES = 64 * 1024
_SAMPLE_WINDOWS = 32
_SAMPLE_WIDTH = 128


@dataclass(frozen=True)
class ChunkOptions:
    """How a save chunks its large tensors. ``compression``: None, "auto", "zstd" or "lz4"."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    min_bytes: int = MIN_CHUNKED_BYTES
    compression: str | None = None

    def __post_init__(self) -> None:
        if self.chunk_bytes < 4096 or self.chunk_bytes % 64:
            raise ValueError(f"chunk_bytes must be a multiple of 64 and >= 4096, got {self.chunk_bytes}")
        if self.compression is not None and self.compression not in codec.COMPRESSION_CHOICES:
            raise ValueError(
                f"compression must be one of {codec.COMPRESSION_CHOICES} or None, got {self.compression!r}"
            )


@dataclass
class ChunkedBlob:
    """A large blob of a plan and what the hint cache knows about it."""

    blob: Blob
    nbytes: int
    sample: str | None  # digest of sampled bytes, for tensors with a version key
    reuse: TensorEntry | None = None  # the previous save's entry when the tensor is unchanged


def sample_digest(data: memoryview) -> str:
    """A cheap digest of a few spread-out windows of the bytes (about 4 KiB whatever the size)."""
    array = np.frombuffer(data, dtype=np.uint8)
    if array.size <= _SAMPLE_WINDOWS * _SAMPLE_WIDTH:
        return digest_bytes("blake3", array.tobytes())
    starts = np.linspace(0, array.size - _SAMPLE_WIDTH, _SAMPLE_WINDOWS, dtype=np.int64)
    picked = array[starts[:, None] + np.arange(_SAMPLE_WIDTH)[None, :]]
    return digest_bytes("blake3", picked.tobytes())


@dataclass
class _Hint:
    key: tuple[Any, ...]
    sample: str
    entry: TensorEntry
    algorithm: str  # digests of another algorithm cannot be reused


@dataclass
class HintCache:
    """Per-manager memory of the last committed save's chunked tensors (see module docstring)."""

    records: dict[str, _Hint] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def lookup(
        self, blob: Blob, sample: str | None, store: ChunkBackend, algorithm: str
    ) -> TensorEntry | None:
        record = self.records.get(blob.name)
        if record is None or blob.version_key is None or sample is None or record.algorithm != algorithm:
            return None
        entry = record.entry
        same = (
            record.key == blob.version_key
            and record.sample == sample
            and entry.dtype == blob.dtype
            and entry.shape == blob.shape
            and all(store.has(c.digest, c.codec, c.stored_len) for c in entry.chunks or ())
        )
        if not same:
            return None
        return entry

    def remember(self, chunked: list[ChunkedBlob], entries: dict[str, TensorEntry], algorithm: str) -> None:
        """After a successful commit: what the next save may skip."""
        fresh: dict[str, _Hint] = {}
        for item in chunked:
            key = item.blob.version_key
            if key is not None and item.sample is not None and item.blob.name in entries:
                fresh[item.blob.name] = _Hint(key, item.sample, entries[item.blob.name], algorithm)
        self.records = fresh

    def clear(self) -> None:
        self.records.clear()


def split_blobs(
    blobs: list[Blob], options: ChunkOptions, hints: HintCache | None, store: ChunkBackend, algorithm: str
) -> tuple[list[Blob], list[ChunkedBlob]]:
    """Separates the blobs that go to the chunk store, and finds those a hint proves unchanged."""
    small: list[Blob] = []
    chunked: list[ChunkedBlob] = []
    for blob in blobs:
        if blob.nbytes < options.min_bytes or blob.nbytes == 0:
            small.append(blob)
            continue
        sample = sample_digest(blob.data) if blob.version_key is not None else None
        reuse = hints.lookup(blob, sample, store, algorithm) if hints is not None else None
        if hints is not None:
            if reuse is None:
                hints.misses += 1
            else:
                hints.hits += 1
        chunked.append(ChunkedBlob(blob, blob.nbytes, sample, reuse))
    return small, chunked


def write_chunked(
    store: ChunkBackend,
    chunked: list[ChunkedBlob],
    *,
    algorithm: str,
    options: ChunkOptions,
    threads: int,
    feed: PieceFeed | None = None,
) -> tuple[dict[str, TensorEntry], int]:
    """Puts every new chunk in the store; returns the tensor entries and the bytes written.

    Runs under the store's shared lock (taken by the caller), so chunks it finds cannot be
    collected before the manifest that references them is committed.
    """
    entries: dict[str, TensorEntry] = {}
    written = 0
    jobs: list[tuple[ChunkedBlob, list[Any]]] = []
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ckptvault-chunk") as pool:
        for item in chunked:
            blob = item.blob
            if item.reuse is not None:
                for ref in item.reuse.chunks or ():
                    if not store.has(ref.digest, ref.codec, ref.stored_len):
                        raise StorageError(
                            0,
                            f"chunk {ref.digest[:16]} of unchanged tensor {blob.name!r} vanished "
                            "from the chunk store (was it garbage-collected by another process?)",
                        )
                entries[blob.name] = item.reuse
                continue
            data = np.frombuffer(blob.data, dtype=np.uint8)
            itemsize = SAFETENSORS_ITEMSIZE[blob.dtype]
            methods = (
                codec.choose_methods(data[: codec.SAMPLE_BYTES], itemsize, options.compression)
                if options.compression and feed is None
                else None
            )
            step = options.chunk_bytes
            if feed is None:
                futures = [
                    pool.submit(_put_chunk, store, algorithm, data[i : i + step], itemsize, methods)
                    for i in range(0, data.size, step)
                ]
            else:  # staged in pieces (each a whole number of chunks): finish a piece before the next
                futures = []
                for piece in feed.pieces(blob):
                    part = np.frombuffer(piece, dtype=np.uint8)
                    if options.compression and not futures:  # blob.data is the live state: not read
                        methods = codec.choose_methods(
                            part[: codec.SAMPLE_BYTES], itemsize, options.compression
                        )
                    batch = [
                        pool.submit(_put_chunk, store, algorithm, part[i : i + step], itemsize, methods)
                        for i in range(0, part.size, step)
                    ]
                    for future in batch:
                        future.result()
                    futures += batch
            jobs.append((item, futures))
        for item, futures in jobs:
            refs = []
            for future in futures:
                ref, wrote = future.result()
                refs.append(ref)
                written += wrote
            blob = item.blob
            entries[blob.name] = TensorEntry(
                blob.name,
                "",
                blob.dtype,
                blob.shape,
                (0, item.nbytes),
                chunked_tensor_digest(algorithm, item.nbytes, [r.digest for r in refs]),
                tuple(refs),
            )
    store.sync()
    return entries, written


def _put_chunk(
    store: ChunkBackend, algorithm: str, piece: np.ndarray, itemsize: int, methods: tuple[int, ...] | None
) -> tuple[ChunkRef, int]:
    digest = digest_bytes(algorithm, memoryview(piece.data))
    found = store.find(digest, piece.size)
    if found is not None:
        return ChunkRef(digest, piece.size, found[1], found[0]), 0
    if methods is not None and any(methods):
        frame = codec.encode(piece, itemsize, methods)
        if len(frame) < piece.size:
            name = codec.codec_name(methods)
            return ChunkRef(digest, piece.size, store.put(digest, name, frame), name), len(frame)
    return ChunkRef(digest, piece.size, store.put(digest, "raw", memoryview(piece.data)), "raw"), piece.size


def read_chunked(
    store: ChunkBackend,
    entry: TensorEntry,
    *,
    algorithm: str,
    verify: bool,
    where: str | None,
    threads: int = 2,
) -> np.ndarray:
    """A chunked tensor's bytes, each chunk decoded into place and (if ``verify``) digest-checked."""
    try:
        out = fresh_bytes(entry.nbytes)
    except MemoryError as exc:  # the size is the manifest's word: 1024 tiny chunks can claim a TiB
        raise CorruptCheckpointError(
            f"the manifest promises {entry.nbytes} bytes for this tensor, more than can be allocated",
            path=where,
            tensor=entry.name,
            kind="bad-manifest",
        ) from exc
    refs = list(entry.chunks or ())
    starts = np.cumsum([0] + [r.raw_len for r in refs[:-1]]).tolist()

    def one(ref: ChunkRef, cursor: int) -> None:
        target = out[cursor : cursor + ref.raw_len]
        read_chunk(store, ref, algorithm=algorithm, where=where, tensor=entry.name, out=target, verify=verify)

    if len(refs) > 1 and threads > 1:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckptvault-read") as pool:
            list(pool.map(one, refs, starts))
    else:
        for ref, cursor in zip(refs, starts, strict=True):
            one(ref, cursor)
    if verify and chunked_tensor_digest(algorithm, entry.nbytes, [r.digest for r in refs]) != entry.digest:
        raise CorruptCheckpointError(
            "chunk list does not match the tensor digest",
            path=where,
            tensor=entry.name,
            kind="digest-mismatch",
        )
    return out
