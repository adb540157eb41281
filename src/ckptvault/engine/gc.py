"""L2: garbage collection of a run's chunk store, through the storage protocol only.

It takes the store's lease exclusively, so no save is between its first chunk and its commit; it
marks every chunk any committed manifest of the run names and sweeps the rest. Killed at any point
it has deleted only unreferenced chunks: the mark is complete before the first deletion and no
writer can add a reference while it holds the lease (docs/format.md §11.2).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

from ..config import MAX_MANIFEST_BYTES
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError, typed_os_errors
from ..storage.base import Storage
from ..storage.resolve import storage_for
from .rundir import STORE_NAME

_HEX64_ANYWHERE = re.compile(rb"[0-9a-f]{64}")


@dataclass(frozen=True)
class GcReport:
    """What one garbage collection found and did."""

    checkpoints: int
    live_chunks: int
    deleted_chunks: int
    freed_bytes: int
    deleted_temporary: int


def live_digests(storage: Storage, run: str) -> tuple[set[str], int]:
    """Every digest any committed manifest in ``run`` mentions, and how many manifests there were.

    Deliberately conservative: it collects every 64-hex-digit token of each manifest's text, so a
    chunk is kept if anything names it, and a manifest too damaged to parse still protects every
    chunk it mentions. Every committed checkpoint of the run counts, whatever its name (``save``
    into a run directory shares the store too). A manifest that cannot be read whole refuses the
    collection: what it names is unknown, so nothing may be deleted.
    """
    live: set[str] = set()
    count = 0
    for entry in storage.list(run):
        if entry.kind != "checkpoint" or entry.name.startswith("."):
            continue
        if entry.size > MAX_MANIFEST_BYTES:
            raise StorageError(
                errno.EFBIG, f"{entry.key} has a manifest larger than any can be; refusing to collect garbage"
            )
        try:
            handle = storage.open(entry.key)
        except CheckpointNotFoundError:
            continue  # deleted since the listing (retention holds no store lease): it needs nothing
        try:
            text = handle.read_manifest()
        except CorruptCheckpointError as exc:
            raise StorageError(
                errno.EFBIG, f"cannot read the manifest of {entry.key} ({exc}); refusing to collect garbage"
            ) from exc
        finally:
            handle.close()
        live.update(m.decode() for m in _HEX64_ANYWHERE.findall(text))
        count += 1
    return live, count


@typed_os_errors
def collect_garbage(
    run_dir: str | os.PathLike[str], *, dry_run: bool = False, storage: Storage | None = None
) -> GcReport:
    """Deletes every chunk of the run's store that no committed checkpoint references.

    Safe against concurrent saves (it waits for them through the store's lease) and against being
    killed (see the module docstring). A run without a store is left as it is.
    """
    run = os.fspath(run_dir)
    if storage is None:
        storage = storage_for(run)[0]
    store = storage.chunk_store(storage.join(run, STORE_NAME))
    if not store.exists():  # a symlinked store raises: never swept
        return GcReport(0, 0, 0, 0, 0)
    with store.locked(exclusive=True):
        live, checkpoints = live_digests(storage, run)
        swept = store.sweep(live, dry_run=dry_run)
    return GcReport(
        checkpoints, swept.live_chunks, swept.deleted_chunks, swept.freed_bytes, swept.deleted_temporary
    )
