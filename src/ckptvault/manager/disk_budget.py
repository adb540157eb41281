"""L3: how many bytes a run's checkpoints hold on its storage -- for a mirrored run's local budget.

Why from the manifests: the storage protocol has no "disk usage" call (an object store has none
either), and incremental checkpoints share chunks, so summing each checkpoint's size would count a
shared chunk once per checkpoint and make deleting one look like it frees bytes it does not. A run
holds its checkpoints' files plus each *distinct* chunk they reference; that is what
:meth:`LocalSizes.total` adds up. Manifests never change under a checkpoint id, so each is read once.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..engine.manifests import read_manifest
from ..engine.rundir import RunDirectory
from ..errors import CheckpointError
from ..policy import CheckpointRecord

_Facts = tuple[int, dict[tuple[str, str], int]]  # file bytes, stored size per (digest, codec)


class LocalSizes:
    """The stored bytes of a set of a run's checkpoints (see the module docstring); a checkpoint
    whose manifest cannot be read counts as 0 bytes (retention deals with it, not the budget)."""

    def __init__(self, run: RunDirectory) -> None:
        self.run = run
        self._facts: dict[tuple[str, str], _Facts] = {}

    def facts(self, record: CheckpointRecord) -> _Facts:
        key = (record.name, record.checkpoint_id)
        cached = self._facts.get(key)
        if cached is not None:
            return cached
        try:
            manifest, _ = read_manifest(self.run.storage, self.run.checkpoint(record.name))
        except (CheckpointError, OSError):
            return 0, {}
        chunks = {
            (c.digest, c.codec): c.stored_len for t in manifest.tensors.values() for c in t.chunks or ()
        }
        facts = (sum(f.size for f in manifest.files.values()), chunks)
        if record.checkpoint_id == manifest.checkpoint_id:
            self._facts[key] = facts
        return facts

    def total(self, records: Iterable[CheckpointRecord]) -> int:
        files = 0
        chunks: dict[tuple[str, str], int] = {}
        for record in records:
            size, used = self.facts(record)
            files += size
            chunks.update(used)
        return files + sum(chunks.values())
