"""How many bytes a read may allocate, decode or compare: bounded by what is stored, or a cap.

A manifest *declares* sizes; only some of them are backed by bytes on disk. One 4 MiB chunk can be
referenced a million times, a compressed chunk can expand ~30,000-fold, a stride-0 view of four
bytes can claim a TiB. Readers therefore charge every allocation (and every logical tensor they
compare or hand out) to a :class:`ByteBudget` *before* making it, and refuse with
:class:`~ckptvault.errors.ResourceLimitError` past its limit.

The default limit is ``max(DEFAULT_MAX_BYTES, bytes actually stored)``: a checkpoint can always be
loaded whole however large it is (its data files and the distinct chunks it references exist on
disk, so loading them is proportional to the storage the user already pays for), while the
*amplification* a hostile manifest can buy is at most 64 GiB — enough for an honest state whose
chunks dedup or compress well (zero-initialised tables, frozen copies), small enough to refuse
before the machine swaps. Callers pass ``max_bytes=`` to raise or lower it.
"""

from __future__ import annotations

from ..errors import CheckpointError, ResourceLimitError
from ..format.manifest import Manifest
from ..storage.base import ChunkBackend, ReadHandle

DEFAULT_MAX_BYTES = 64 * 1024**3


class ByteBudget:
    """A running total of bytes charged against ``limit``; thread-compatible, not thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def check(self, nbytes: int, what: str) -> None:
        """Refuses ``nbytes`` more without charging them (for views that allocate nothing)."""
        if nbytes > self.limit - self.used:
            raise ResourceLimitError(what, needed=self.used + nbytes, limit=self.limit)

    def charge(self, nbytes: int, what: str) -> None:
        self.check(nbytes, what)
        self.used += nbytes


def default_limit(stored: int) -> int:
    return max(DEFAULT_MAX_BYTES, stored)


def stored_bytes(manifest: Manifest, handle: ReadHandle, store: ChunkBackend | None) -> int:
    """Bytes this checkpoint really has on storage: its files (as they are, not as the manifest
    says) plus every distinct chunk it references that exists with the recorded size."""
    total = 0
    for name in manifest.files:
        try:
            total += min(handle.size(name), manifest.files[name].size)
        except (OSError, CheckpointError):
            continue  # a missing file adds nothing; reading it fails with its own typed error
    if store is None:
        return total
    seen: set[tuple[str, str]] = set()
    for entry in manifest.tensors.values():
        for ref in entry.chunks or ():
            key = (ref.digest, ref.codec)
            if key in seen:
                continue
            seen.add(key)
            try:
                if store.has(ref.digest, ref.codec, ref.stored_len):
                    total += ref.stored_len
            except (OSError, CheckpointError):
                continue
    return total


def limit_for(
    max_bytes: int | None, manifest: Manifest, handle: ReadHandle, store: ChunkBackend | None
) -> ByteBudget:
    """The budget of one read: the caller's ``max_bytes``, else the default over what is stored."""
    if max_bytes is not None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        return ByteBudget(max_bytes)
    return ByteBudget(default_limit(stored_bytes(manifest, handle, store)))
