"""A stored tensor's bytes as a stream of verified blocks, in memory bounded by one block or chunk.

``verify`` and ``diff`` must not materialise a whole tensor: the manifest, not the disk, decides how
large a tensor claims to be. A data-file tensor is read in ``BLOCK_BYTES`` pieces through one
incremental hasher; a chunked tensor one chunk at a time (at most ``MAX_CHUNK_BYTES`` by the
format), each chunk checked against its own digest before its bytes are used. A chunk referenced
many times is read, decoded and hashed once by :func:`verify_chunked`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from ..errors import CorruptCheckpointError
from ..format import codec
from ..format.digest import chunked_tensor_digest, digest_bytes, new_hasher
from ..format.tensorfile import ParsedHeader
from ..storage.base import ChunkBackend, ReadHandle
from ..types import ChunkRef, TensorEntry

BLOCK_BYTES = 8 * 1024 * 1024


class TensorSource(Protocol):
    """What streaming needs of an open checkpoint (a :class:`~.reader.CheckpointReader`)."""

    path: str
    handle: ReadHandle

    @property
    def store(self) -> ChunkBackend: ...

    @property
    def algorithm(self) -> str: ...

    def header(self, name: str) -> ParsedHeader: ...


def read_chunk(
    store: ChunkBackend,
    ref: ChunkRef,
    *,
    algorithm: str,
    where: str | None,
    tensor: str | None,
    out: np.ndarray | None = None,
    verify: bool = True,
) -> np.ndarray:
    """One chunk's raw bytes, decoded (into ``out`` when given) and, if ``verify``, checked against
    its digest. A chunk that does not decode or match is reported to the store, so the next save
    writes a fresh copy instead of referencing it again."""
    stored = store.read(ref.digest, ref.codec, ref.stored_len, where=where, tensor=tensor)
    if ref.codec == "raw":
        raw = np.frombuffer(stored, dtype=np.uint8)
        if out is None:
            out = raw
        else:
            out[:] = raw
    else:
        if out is None:
            out = np.empty(ref.raw_len, dtype=np.uint8)
        try:
            codec.decode_into(stored, out)
        except codec.CodecError as exc:
            store.report_bad(ref.digest, ref.codec)
            raise CorruptCheckpointError(
                f"chunk {ref.digest[:16]}….{ref.codec} does not decode: {exc}",
                path=where,
                tensor=tensor,
                kind="bad-chunk",
            ) from exc
    if verify and digest_bytes(algorithm, memoryview(out.data)) != ref.digest:
        store.report_bad(ref.digest, ref.codec)
        raise CorruptCheckpointError(
            f"chunk {ref.digest[:16]}….{ref.codec} does not match its digest (bit rot or tampering)",
            path=where,
            tensor=tensor,
            kind="digest-mismatch",
        )
    return out


def _check_chunk_list(entry: TensorEntry, algorithm: str, where: str | None) -> None:
    refs = entry.chunks or ()
    if chunked_tensor_digest(algorithm, entry.nbytes, [r.digest for r in refs]) != entry.digest:
        raise CorruptCheckpointError(
            "chunk list does not match the tensor digest",
            path=where,
            tensor=entry.name,
            kind="digest-mismatch",
        )


def verify_chunked(
    store: ChunkBackend,
    entry: TensorEntry,
    *,
    algorithm: str,
    where: str | None,
    checked: dict[tuple[str, str, int, int], CorruptCheckpointError | None],
) -> None:
    """Checks a chunked tensor reading each distinct chunk once (``checked`` spans a whole verify):
    work follows the chunks stored, not how often the manifest repeats them."""
    _check_chunk_list(entry, algorithm, where)
    for ref in entry.chunks or ():
        key = (ref.digest, ref.codec, ref.stored_len, ref.raw_len)
        if key not in checked:
            try:
                read_chunk(store, ref, algorithm=algorithm, where=where, tensor=entry.name)
                checked[key] = None
            except CorruptCheckpointError as exc:
                checked[key] = exc
        failure = checked[key]
        if failure is not None:
            raise CorruptCheckpointError(
                failure.reason, path=where, tensor=entry.name, kind=failure.kind, file=failure.file
            )


def iter_stored_bytes(source: TensorSource, entry: TensorEntry) -> Iterator[np.ndarray]:
    """The tensor's stored bytes in order, as uint8 blocks; raises a typed error at the first (or,
    for a data-file tensor, after the last) block that disagrees with its digest."""
    algorithm = source.algorithm
    if entry.chunks is not None:
        _check_chunk_list(entry, algorithm, source.path)
        for ref in entry.chunks:
            yield read_chunk(source.store, ref, algorithm=algorithm, where=source.path, tensor=entry.name)
        return
    header = source.header(entry.file)
    start = header.data_start + entry.offsets[0]
    hasher = new_hasher(algorithm, size_hint=entry.nbytes)
    done = 0
    while done < entry.nbytes:
        block = np.empty(min(BLOCK_BYTES, entry.nbytes - done), dtype=np.uint8)
        source.handle.read_into(entry.file, start + done, memoryview(block.data))
        hasher.update(memoryview(block.data))
        done += block.size
        if done == entry.nbytes and hasher.hexdigest() != entry.digest:
            break
        yield block
    if hasher.hexdigest() != entry.digest:
        raise CorruptCheckpointError(
            "tensor bytes do not match their digest (bit rot or tampering)",
            path=source.path,
            file=entry.file,
            tensor=entry.name,
            kind="digest-mismatch",
        )
