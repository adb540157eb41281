"""L3: how the manager writes a checkpoint -- what goes into it, and the save pipeline it goes through.

The manager builds the metadata every checkpoint of a run carries (step, epoch, scope, why it was
saved, the run's provenance, the step's metrics) and, for full validation, the probe file; then it
saves through the library's one save pipeline (:class:`~ckptvault.engine.background.SaveRequest`):
synchronously via :func:`ckptvault.api.save`, or staged now and committed in the background by a
:class:`~ckptvault.engine.background.BackgroundWriter`. Both write through the run's own storage, so
the checkpoint lands where the run's documents are, on whatever backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import api, validation
from ..engine.background import BackgroundWriter, PendingSave
from ..engine.checkpoint_info import info_from_manifest
from ..engine.chunks import HintCache
from ..engine.rundir import RunDirectory
from ..engine.staging import StagingBuffer
from ..training.state import TrainState
from ..types import CheckpointInfo


def checkpoint_metadata(
    run: Mapping[str, Any], state: TrainState, scope: str, reason: str, committed_at: float, metrics: Any
) -> dict[str, Any]:
    """The manifest metadata of one checkpoint of a run (the sidecar's fields among them)."""
    return {
        "step": state.step,
        "epoch": state.epoch,
        "scope": scope,
        "reason": reason,
        "committed_at": committed_at,
        "run_id": run.get("run_id"),
        "git": run.get("git"),
        "config": run.get("config"),
        "data_version": run.get("data_version"),
        "metrics": metrics,
    }


def architecture_files(
    state: TrainState, metadata: dict[str, Any], validate: str, metrics: Any
) -> dict[str, bytes]:
    """Records the model's architecture in ``metadata`` and returns the probe file full validation
    compares against (empty when there is nothing to rebuild or probe)."""
    extra: dict[str, bytes] = {}
    if state.architecture is None:
        return extra
    metadata["architecture"] = state.architecture.to_metadata()
    if validate == "full" and state.probe is not None:
        (model,) = state.parts["model"].values()
        extra[validation.PROBE_FILE] = validation.make_probe_file(model, state.probe, metrics)
        # Started at the first save that will need it (not for runs that never make a probe):
        # its one torch import overlaps this save and the steps before its validation.
        validation.start_server()
    return extra


class RunSaver:
    """Saves the checkpoints of one run: sync, or async with one save in flight and a reused
    staging buffer; incremental/compressed through the run's chunk store, with the hint cache
    that skips tensors unchanged since the last save. Both ways take the same options and go
    through :func:`ckptvault.api.save_request`, into the run's own storage."""

    def __init__(
        self,
        run: RunDirectory,
        *,
        async_save: bool,
        max_staging_bytes: int | None,
        incremental: bool,
        compression: str | None,
        chunk_bytes: int | None,
        trust_version_counter: bool,
    ) -> None:
        self.run = run
        self.writer = BackgroundWriter() if async_save else None
        chunked = api.chunk_options(incremental, compression, chunk_bytes) is not None
        self.hints = HintCache() if chunked and trust_version_counter else None
        self.options: dict[str, Any] = {
            "incremental": incremental,
            "compression": compression,
            "chunk_bytes": chunk_bytes,
            "hints": self.hints,
        }
        self.staging = StagingBuffer(max_staging_bytes)

    def save(
        self, name: str, tree: Any, metadata: dict[str, Any], extra: dict[str, bytes], *, background: bool
    ) -> CheckpointInfo | PendingSave:
        """Saves ``tree`` as checkpoint ``name`` (replacing one of that name): the committed info,
        or with ``background`` on an async saver the pending save (staged, not yet committed)."""
        target = self.run.checkpoint(name)
        where: dict[str, Any] = {
            "metadata": metadata,
            "overwrite": True,
            "extra_files": extra,
            "storage": self.run.storage,
        }
        if background and self.writer is not None:
            request = api.save_request(target, **where, **self.options)
            return self.writer.submit_save(request, tree, self.staging)
        return api.save(target, tree, **where, **self.options)

    def save_sharded(
        self, name: str, tree: Any, metadata: dict[str, Any], *, group: Any = None
    ) -> CheckpointInfo | ShardedPending | None:
        """Every rank's part of ``tree`` as checkpoint ``name`` (replacing one of that name), through
        :mod:`ckptvault.distributed`; the committed info on the coordinator, None elsewhere. On an
        async saver with a ``group`` of its own for the save's collectives: DCP's background save,
        returned pending once the state is copied to host memory."""
        from ..distributed.api import save as save_distributed
        from ..distributed.api import save_async

        target = self.run.checkpoint(name)
        if group is not None and self.writer is not None:
            pending = save_async(
                tree, target, metadata=metadata, overwrite=True, process_group=group, **self.options
            )
            return ShardedPending(pending, target, metadata)
        manifest = save_distributed(tree, target, metadata=metadata, overwrite=True, **self.options)
        return info_from_manifest(target, manifest, metadata) if manifest is not None else None

    def shutdown(self) -> None:
        if self.writer is not None:
            self.writer.shutdown()


class ShardedPending:
    """A distributed save in flight, as the manager waits for it: ``wait`` gives the committed
    info on the coordinator (None on other ranks) or re-raises the save's failure."""

    def __init__(self, pending: Any, target: str, metadata: dict[str, Any]) -> None:
        self._pending = pending
        self._target = target
        self._metadata = metadata

    def done(self) -> bool:
        return bool(self._pending.done())

    def wait(self) -> CheckpointInfo | None:
        manifest = self._pending.wait()
        return info_from_manifest(self._target, manifest, self._metadata) if manifest is not None else None
