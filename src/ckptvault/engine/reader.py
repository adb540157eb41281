"""Reading: manifest → headers → bytes, each checked against the layer above before use.

Trust flows downward: the manifest is parsed strictly; each data file's size must equal the
manifest's, its header must hash to the recorded header digest and describe exactly the tensors the
manifest lists (same dtype, shape, byte range) for this checkpoint id; only then is any tensor
buffer allocated, of a size already proven to fit in the file. Loading checks the digest of every
tensor it returns; :func:`verify_checkpoint` additionally re-hashes whole files and lists every
problem instead of stopping at the first.

What a load returns is exactly the bytes it verified: by default each tensor is read (``pread``)
into fresh anonymous memory and hashed there, so no later change to the file can alter it and no
truncation can turn an access into SIGBUS. File maps are an explicit opt-in (``mapped``). Every
allocation is charged to a :class:`~.budget.ByteBudget` first, and ``verify`` streams: it never
holds more than one block or chunk, and reads a chunk the manifest repeats only once.
"""

from __future__ import annotations

import mmap
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..config import MANIFEST_NAME
from ..errors import CorruptCheckpointError
from ..format.digest import PARALLEL_HASH_BYTES, digest_bytes, new_hasher
from ..format.manifest import Manifest, check_file_name, parse_manifest
from ..format.tensorfile import HeaderError, ParsedHeader, header_length, parse_header
from ..format.tree import LeafDecoder, TreeDecodeError, TreeDecoder
from ..storage.base import ChunkBackend, ReadHandle, Storage
from ..types import TensorEntry
from .budget import ByteBudget, limit_for, stored_bytes
from .chunks import read_chunked
from .fresh import fresh_bytes
from .overlap import read_and_hash
from .read_order import Run, batches, destinations, file_groups
from .sharded import direct_targets, place, read_whole
from .writer import NO_LEAVES

_READ_CHUNK = 64 * 1024 * 1024
_HASH_PIECE = 1024 * 1024  # read, then hash while still in cache (best of 256 KiB..4 MiB here)


class CheckpointReader:
    """An open, committed checkpoint. Not thread-safe to construct; reads may run in parallel."""

    def __init__(self, storage: Storage, path: str) -> None:
        self.path = path
        self.storage = storage
        self.handle: ReadHandle = storage.open(path)
        try:
            self.manifest: Manifest = parse_manifest(self.handle.read_manifest(), path=path)
        except BaseException:
            self.handle.close()
            raise
        self._headers: dict[str, ParsedHeader] = {}
        self._maps: dict[str, Any] = {}
        self._store: ChunkBackend | None = None
        self._by_file: dict[str, list[TensorEntry]] | None = None

    @property
    def algorithm(self) -> str:
        return self.manifest.digest_algorithm

    def tensors_in(self, file: str) -> list[TensorEntry]:
        """The tensors of one data file in offset order (indexed once: linear in the manifest)."""
        if self._by_file is None:
            index: dict[str, list[TensorEntry]] = {}
            for entry in self.manifest.tensors.values():
                if entry.chunks is None:
                    index.setdefault(entry.file, []).append(entry)
            for entries in index.values():
                entries.sort(key=lambda t: t.offsets)
            self._by_file = index
        return self._by_file.get(file, [])

    def _store_if_chunked(self) -> ChunkBackend | None:
        return self.store if any(t.chunks is not None for t in self.manifest.tensors.values()) else None

    def stored_bytes(self) -> int:
        """Bytes this checkpoint really holds on storage (files, distinct existing chunks)."""
        return stored_bytes(self.manifest, self.handle, self._store_if_chunked())

    def budget(self, max_bytes: int | None) -> ByteBudget:
        """The byte budget of one read of this checkpoint (see :mod:`.budget`)."""
        return limit_for(max_bytes, self.manifest, self.handle, self._store_if_chunked())

    @property
    def store(self) -> ChunkBackend:
        """The chunk store chunked tensors live in (beside the checkpoint)."""
        if self._store is None:
            self._store = self.storage.chunk_store(self.path)
        return self._store

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _corrupt(
        self, message: str, kind: str, *, file: str | None = None, tensor: str | None = None
    ) -> CorruptCheckpointError:
        return CorruptCheckpointError(message, path=self.path, file=file, tensor=tensor, kind=kind)

    # -- structure ----------------------------------------------------------------------------
    def check_listing(self) -> None:
        """Every listed file exists; nothing else lies in the checkpoint directory."""
        present = set(self.handle.file_names())
        listed = set(self.manifest.files) | {MANIFEST_NAME}
        for name in sorted(listed - present):
            raise self._corrupt("file listed in the manifest is missing", "missing-file", file=name)
        for name in sorted(present - listed):
            raise self._corrupt(
                "unexpected file not listed in the manifest (added or left behind)", "extra-file", file=name
            )

    def check_size(self, name: str) -> int:
        entry = self.manifest.files[name]
        size = self.handle.size(name)
        if size != entry.size:
            word = "truncated" if size < entry.size else "has extra bytes"
            kind = "truncated" if size < entry.size else "size-mismatch"
            raise self._corrupt(f"{word}: {size} bytes, manifest says {entry.size}", kind, file=name)
        return size

    def _header_bytes(self, name: str) -> tuple[int, bytes]:
        """A data file's size and header bytes, proven to be the ones the manifest recorded (file size,
        declared length and digest) without decoding them."""
        check_file_name(name, path=self.path)
        entry = self.manifest.files[name]
        size = self.check_size(name)
        try:
            length = header_length(self.handle.read(name, 0, min(8, size)), size)
        except HeaderError as exc:
            raise self._corrupt(str(exc), "bad-header", file=name) from exc
        if length != entry.header_size:
            raise self._corrupt(
                f"header is {length} bytes, manifest says {entry.header_size}", "bad-header", file=name
            )
        raw = self.handle.read(name, 8, length)
        if digest_bytes(self.manifest.digest_algorithm, raw) != entry.header_digest:
            raise self._corrupt("header digest mismatch (header bytes changed)", "digest-mismatch", file=name)
        return size, raw

    def data_start(self, name: str) -> int:
        """Where a data file's tensor bytes start, for reading single tensors (the lazy view).

        The header is decoded and cross-checked against the manifest on the file's first read, as a
        whole load does: the lazy and the eager reader must refuse the same files (a crafted header
        that disagrees with its manifest is refused by both). At 50,000 tensors that costs one
        decode of ~5 MB of header JSON, once per file (~0.1-0.2 s here); the cheaper proof by size,
        length and digest alone (:meth:`_header_bytes`) would let ``open`` accept what ``load``
        refuses."""
        return self.header(name).data_start

    def header(self, name: str) -> ParsedHeader:
        """The validated header of a data file, cross-checked against the manifest (cached)."""
        cached = self._headers.get(name)
        if cached is not None:
            return cached
        size, raw = self._header_bytes(name)
        try:
            header = parse_header(raw, size)
        except HeaderError as exc:
            raise self._corrupt(str(exc), "bad-header", file=name) from exc
        owner = header.metadata.get("checkpoint_id")
        if owner != self.manifest.checkpoint_id:
            raise self._corrupt(
                f"file belongs to checkpoint {str(owner)[:40]}, the manifest to "
                f"{self.manifest.checkpoint_id} (files from different checkpoints mixed)",
                "foreign-file",
                file=name,
            )
        expected = {t.name: t for t in self.tensors_in(name)}
        if set(header.entries) != set(expected):
            odd = sorted(set(header.entries) ^ set(expected))[:3]
            raise self._corrupt(
                f"header and manifest list different tensors (e.g. {odd})", "bad-header", file=name
            )
        for tname, t in expected.items():
            h = header.entries[tname]
            if (h.dtype, h.shape, h.offsets) != (t.dtype, t.shape, t.offsets):
                raise self._corrupt(
                    "header entry disagrees with the manifest", "bad-header", file=name, tensor=tname
                )
        self._headers[name] = header
        return header

    # -- tensors ------------------------------------------------------------------------------
    def mapping(self, file: str) -> Any:
        """The file's private copy-on-write map (cached); None where the backend cannot map."""
        if file not in self._maps:
            self._maps[file] = self.handle.mmap(file, copy_on_write=True)
        return self._maps[file]

    def fetch(
        self,
        name: str,
        *,
        verify: bool = True,
        mapped: bool = False,
        out: np.ndarray | None = None,
        all_cores: bool = False,
    ) -> np.ndarray:
        """A uint8 array with the stored bytes of one tensor, digest-checked if ``verify`` (hashed on
        all cores when ``all_cores`` and the tensor is big enough to gain from it).

        ``mapped`` returns a zero-copy view of the file's copy-on-write map (writes stay private);
        otherwise a fresh array (``out`` when given: :meth:`fetch_all` allocates on the calling
        thread) filled with ``pread``. A chunked tensor is always a fresh array, assembled from its
        chunks.
        """
        entry = self.manifest.tensors.get(name)
        if entry is None:
            whole = self.manifest.sharded.get(name)
            if whole is not None:  # pieces read into their places, each verified
                return read_whole(self.manifest, whole, lambda n, o: self.fetch(n, verify=verify, out=o))
            raise self._corrupt(
                f"tree references tensor {name[:80]!r} that the manifest does not list", "bad-manifest"
            )
        if entry.chunks is not None:
            return read_chunked(
                self.store, entry, algorithm=self.manifest.digest_algorithm, verify=verify, where=self.path
            )
        start = self.data_start(entry.file) + entry.offsets[0]
        if start + entry.nbytes > self.manifest.files[entry.file].size:  # size proven by data_start
            raise self._corrupt(
                "tensor's byte range runs past the end of its file",
                "bad-manifest",
                file=entry.file,
                tensor=name,
            )
        mapping = self.mapping(entry.file) if mapped and entry.nbytes else None
        if mapping is not None:
            buffer: np.ndarray = np.frombuffer(mapping, dtype=np.uint8, count=entry.nbytes, offset=start)
        else:
            buffer = fresh_bytes(entry.nbytes) if out is None else out
            if verify:
                # A whole load runs tensors side by side on every core already: each is read and
                # hashed piece by piece on its thread. A big tensor read alone (the lazy view) is read
                # on a helper thread while this one hashes what has landed (engine/overlap.py).
                overlapped = all_cores and entry.nbytes >= PARALLEL_HASH_BYTES
                self._read_hashed(entry, start, memoryview(buffer.data), overlapped)
                return buffer
            if entry.nbytes:
                self.handle.read_into(entry.file, start, memoryview(buffer.data))
        if verify:
            self.check_digest(entry, memoryview(buffer.data))
        return buffer

    def _read_hashed(self, entry: TensorEntry, start: int, out: memoryview, overlapped: bool) -> None:
        """Fills ``out`` and checks the digest of exactly the bytes now in ``out`` (what is returned
        is what was verified, whatever happens to the file afterwards)."""
        hasher = new_hasher(self.manifest.digest_algorithm)  # one thread: the pool runs tensors in parallel
        if overlapped:
            digest = read_and_hash(
                lambda lo, piece: self.handle.read_into(entry.file, start + lo, piece), out, hasher
            )
        else:
            for lo in range(0, len(out), _HASH_PIECE):
                piece = out[lo : lo + _HASH_PIECE]
                self.handle.read_into(entry.file, start + lo, piece)
                hasher.update(piece)
            digest = hasher.hexdigest()
        if digest != entry.digest:
            raise self._corrupt(
                "tensor bytes do not match their digest (bit rot or tampering)",
                "digest-mismatch",
                file=entry.file,
                tensor=entry.name,
            )

    def check_digest(self, entry: TensorEntry, data: memoryview) -> None:
        if digest_bytes(self.manifest.digest_algorithm, data) != entry.digest:
            raise self._corrupt(
                "tensor bytes do not match their digest (bit rot or tampering)",
                "digest-mismatch",
                file=entry.file,
                tensor=entry.name,
            )

    def fetch_all(
        self, *, verify: bool, threads: int, mapped: bool, budget: ByteBudget | None = None
    ) -> dict[str, np.ndarray]:
        """Every tensor's bytes, read (and hashed) in parallel; big tensors first to balance threads.
        A sharded tensor is returned whole (its pieces read into place, never mapped).

        The whole allocation is charged to ``budget`` before the first byte is read."""
        sharded = self.manifest.sharded
        if budget is not None:
            unmapped = sum(
                t.nbytes for t in self.manifest.tensors.values() if t.chunks is not None or not mapped
            )
            unmapped += sum(t.nbytes for t in sharded.values()) if mapped else 0
            budget.charge(unmapped, "loading this checkpoint's tensors")
        wholes = {name: fresh_bytes(entry.nbytes) for name, entry in sharded.items()}
        direct = direct_targets(self.manifest, wholes)
        result = self._fetch_stored(verify, threads, mapped, direct)
        for name, whole in wholes.items():
            place(self.manifest, sharded[name], whole, result)
            result[name] = whole
        return result

    def _fetch_stored(
        self, verify: bool, threads: int, mapped: bool, direct: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Every stored tensor's bytes (``direct``: pieces read into a sharded tensor's buffer)."""
        data_files = [n for n in self.manifest.files if self.manifest.files[n].header_size is not None]
        if mapped:
            for name in data_files:
                self.header(name)
                mapping = self.mapping(name)
                if mapping is not None and hasattr(mmap, "MADV_WILLNEED"):
                    mapping.madvise(mmap.MADV_WILLNEED)  # start read-ahead of the whole file now
        names = sorted(self.manifest.tensors, key=lambda n: -self.manifest.tensors[n].nbytes)
        # Destinations are allocated here, on the calling thread: glibc gives each reading thread
        # its own arena, whose memory a later load on another thread cannot reuse, so buffers
        # allocated by the pool would pay fresh page faults on every load (see fresh_bytes).
        outs: dict[str, np.ndarray] = dict(direct)
        runs: list[Run] = []
        if not mapped:
            fresh, runs = destinations(self.manifest.tensors, names, direct)
            outs.update(fresh)
            in_runs = {n for run in runs for n, _ in run.pieces}
            names = [n for n in names if n not in in_runs]

        def one(name: str) -> np.ndarray:
            return self.fetch(name, verify=verify, mapped=mapped and name not in direct, out=outs.get(name))

        def run_all(part: list[Run]) -> dict[str, np.ndarray]:
            got: dict[str, np.ndarray] = {}
            for run in part:
                got.update(self._read_run(run, verify))
            return got

        if threads <= 1 or len(names) + len(runs) < 2 or (mapped and not verify):
            for name in data_files:
                self.header(name)
            return {**run_all(runs), **{n: one(n) for n in names}}  # zero-copy, nothing to hash
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckptvault-read") as pool:
            # Headers first, side by side: on an object store each is a request (and the block
            # read ahead around it), which one thread would wait for file after file.
            list(pool.map(self.header, data_files))
            out: dict[str, np.ndarray] = {}
            ran = pool.map(lambda run: self._read_run(run, verify), runs)  # side by side with the rest
            groups = file_groups(self.manifest.tensors, names)
            if len(groups) < threads:  # few files: tensors dealt out to the threads, big first
                dealt = batches(names, threads * 4)
                for batch, arrays in zip(dealt, pool.map(lambda b: [one(n) for n in b], dealt), strict=True):
                    out.update(zip(batch, arrays, strict=True))
            else:  # else whole files per thread (see file_groups)
                for part in pool.map(lambda group: {n: one(n) for n in group}, groups):
                    out.update(part)
            for part in ran:
                out.update(part)
            return out

    def _read_run(self, run: Run, verify: bool) -> dict[str, np.ndarray]:
        """Neighbouring small tensors of one data file in one read (see read_order.Run), each then
        digest-checked in the memory returned. The file's header was decoded and cross-checked
        first (fetch_all), so the run lies inside the file; checked again here all the same."""
        start = self.data_start(run.file) + run.offset
        if start + run.buffer.nbytes > self.manifest.files[run.file].size:
            raise self._corrupt("tensor bytes run past the end of their file", "bad-manifest", file=run.file)
        if run.buffer.nbytes:
            self.handle.read_into(run.file, start, memoryview(run.buffer.data))
        if verify:
            for name, piece in run.pieces:
                self.check_digest(self.manifest.tensors[name], memoryview(piece.data))
        return dict(run.pieces)

    def read_file(self, name: str) -> bytes:
        """A whole non-data file of the checkpoint (probe, program), size and digest checked."""
        entry = self.manifest.files.get(name)
        if entry is None or entry.header_size is not None:
            raise KeyError(name)
        check_file_name(name, path=self.path)
        self.check_size(name)
        data = self.handle.read(name, 0, entry.size)
        if digest_bytes(self.manifest.digest_algorithm, data) != entry.digest:
            raise self._corrupt("file digest mismatch", "digest-mismatch", file=name)
        return data

    def check_sidecars(self) -> None:
        for name, entry in self.manifest.files.items():
            if entry.header_size is None:
                self.check_size(name)
                check_whole_file_digest(self, name)

    # -- decoding -----------------------------------------------------------------------------
    def decode_tree(self, blobs: LeafDecoder, node: Any = None, path: str = "state") -> Any:
        try:
            return TreeDecoder(blobs).decode(self.manifest.tree if node is None else node, path)
        except TreeDecodeError as exc:
            raise self._corrupt(f"state tree: {exc}", "bad-manifest", file=MANIFEST_NAME) from exc

    def decode_metadata(self) -> dict[str, Any]:
        try:
            value = TreeDecoder(NO_LEAVES).decode(self.manifest.metadata, "metadata")
        except (TreeDecodeError, ValueError) as exc:
            raise self._corrupt(f"metadata: {exc}", "bad-manifest", file=MANIFEST_NAME) from exc
        if not isinstance(value, dict):
            raise self._corrupt("metadata must be a dict", "bad-manifest", file=MANIFEST_NAME)
        return value


def check_whole_file_digest(reader: CheckpointReader, name: str) -> int:
    entry = reader.manifest.files[name]
    hasher = new_hasher(reader.manifest.digest_algorithm, size_hint=entry.size)
    buffer = bytearray(min(_READ_CHUNK, max(entry.size, 1)))
    view = memoryview(buffer)
    offset = 0
    while offset < entry.size:
        chunk = view[: min(len(view), entry.size - offset)]
        reader.handle.read_into(name, offset, chunk)
        hasher.update(chunk)
        offset += len(chunk)
    if hasher.hexdigest() != entry.digest:
        raise CorruptCheckpointError(
            "file digest mismatch", path=reader.path, file=name, kind="digest-mismatch"
        )
    return entry.size
