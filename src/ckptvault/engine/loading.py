"""Loading a whole checkpoint: strict structure first, then every tensor into verified memory.

The tree is checked against the stored sizes and the byte budget (:mod:`.budget`) before a single
tensor byte is read, so a hostile manifest is refused before it costs I/O or memory; then every
tensor is read (and hashed) in parallel and the tree decoded over those bytes.
"""

from __future__ import annotations

from typing import Any

from ..errors import CorruptCheckpointError
from ..storage.base import Storage
from .arrays import BlobReader
from .leaves import LeafChecker, stored_nbytes_of
from .reader import CheckpointReader

_REPLACED_RETRIES = 5


def read_checkpoint(
    storage: Storage,
    path: str,
    *,
    map_location: Any,
    verify: bool,
    threads: int,
    mapped: bool,
    max_bytes: int | None = None,
) -> Any:
    """Loads a whole checkpoint. When an overwrite replaces it mid-read (files of the old one vanish
    under us), the load starts again on the new one instead of failing.

    Refuses with :class:`~ckptvault.errors.ResourceLimitError` before allocating when the tensors
    (or any one logical tensor, views included) exceed ``max_bytes`` (default: see :mod:`.budget`).
    """
    for attempt in range(_REPLACED_RETRIES + 1):
        with CheckpointReader(storage, path) as reader:
            try:
                if verify:
                    reader.check_listing()
                    reader.check_sidecars()
                budget = reader.budget(max_bytes)
                reader.decode_tree(LeafChecker(stored_nbytes_of(reader.manifest), budget.limit))
                data = reader.fetch_all(verify=verify, threads=threads, mapped=mapped, budget=budget)
                return reader.decode_tree(BlobReader(data.__getitem__, map_location, budget.limit))
            except CorruptCheckpointError:
                if attempt == _REPLACED_RETRIES or not reader.handle.is_stale():
                    raise
    raise AssertionError("unreachable")
