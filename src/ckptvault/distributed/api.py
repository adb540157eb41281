"""``save`` and ``load`` for distributed states: DCP with ckptvault's storage layer, and the
clean-up DCP leaves to its caller.

Every rank calls them with its own (sharded) state dict. Over plain ``dcp.save`` they add: the
staging area of a save that failed anywhere -- a rank raised, a rank died, a collective timed out --
is removed at once instead of at the next save; DCP's ``CheckpointException`` (a ``BaseException``,
which ``except Exception`` misses) becomes a :class:`~ckptvault.errors.CheckpointError` naming each
failed rank; and the coordinator gets the committed manifest back.
"""

from __future__ import annotations

import os
from typing import Any, cast

from ..config import Settings
from ..engine.chunks import HintCache
from ..format.manifest import Manifest
from .commit import DistributedCheckpointError
from .reader import StorageReader
from .writer import DEFAULT_PIECE_BYTES, StorageWriter


def save(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    process_group: Any = None,
    planner: Any = None,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    incremental: bool = False,
    compression: str | None = None,
    chunk_bytes: int | None = None,
    hints: HintCache | None = None,
) -> Manifest | None:
    """Saves ``state_dict`` from every rank as one checkpoint at ``path``; returns the committed
    manifest on the coordinator (rank 0 of ``process_group``), None elsewhere. Outside an
    initialised process group it saves from this one process.

    ``incremental``/``compression``/``chunk_bytes`` as for :func:`ckptvault.save`: each rank puts
    its large pieces in the run's chunk store, so what did not change since an earlier checkpoint
    of the run is not written again; ``hints`` is this rank's memory of its last save (the
    manager's), which also skips hashing what a version counter proves unchanged."""
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from ..api import chunk_options

    chunking = chunk_options(incremental, compression, chunk_bytes)
    writer = StorageWriter(
        path, metadata=metadata, overwrite=overwrite, piece_bytes=piece_bytes, chunking=chunking, hints=hints
    )
    try:  # our writer follows DCP's StorageWriter interface without importing torch to subclass it
        dcp_save(state_dict, storage_writer=cast(Any, writer), process_group=process_group, planner=planner)
    except BaseException as exc:
        writer.abort()
        if hints is not None:
            hints.clear()  # what it remembers may no longer be in the store
        raise _typed(exc, f"saving {os.fspath(path)}") from exc
    if hints is not None:  # committed on every rank: DCP raised nowhere
        hints.remember(writer.last_chunked, writer.last_entries, Settings.from_env().digest)
    return writer.committed


class PendingDistributedSave:
    """A distributed save running in DCP's background thread (:func:`save_async`): the state was
    already copied to host memory when this was returned. ``wait`` re-raises a failure (after
    removing the save's staging area) and returns the manifest on the coordinator."""

    def __init__(self, future: Any, writer: StorageWriter, hints: HintCache | None, path: str) -> None:
        self._future = future
        self._writer = writer
        self._hints = hints
        self._path = path

    def done(self) -> bool:
        return bool(self._future.done())

    def wait(self) -> Manifest | None:
        try:
            self._future.result()
        except BaseException as exc:
            self._writer.abort()
            if self._hints is not None:
                self._hints.clear()
            raise _typed(exc, f"saving {self._path}") from exc
        if self._hints is not None:
            self._hints.remember(
                self._writer.last_chunked, self._writer.last_entries, Settings.from_env().digest
            )
        return self._writer.committed


def save_async(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    process_group: Any = None,
    incremental: bool = False,
    compression: str | None = None,
    chunk_bytes: int | None = None,
    hints: HintCache | None = None,
) -> PendingDistributedSave:
    """:func:`save` through ``dcp.async_save``: returns once DCP has copied the state to host
    memory; hashing, writing and the commit run in a background thread. Give it a process group of
    its own (a gloo group): the training loop's collectives must not interleave with the save's."""
    from torch.distributed.checkpoint.state_dict_saver import async_save

    from ..api import chunk_options

    chunking = chunk_options(incremental, compression, chunk_bytes)
    writer = StorageWriter(path, metadata=metadata, overwrite=overwrite, chunking=chunking, hints=hints)
    try:
        future = async_save(state_dict, storage_writer=cast(Any, writer), process_group=process_group)
    except BaseException as exc:
        writer.abort()
        raise _typed(exc, f"saving {os.fspath(path)}") from exc
    return PendingDistributedSave(future, writer, hints, os.fspath(path))


def load(
    state_dict: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    process_group: Any = None,
    planner: Any = None,
    verify: bool = True,
) -> None:
    """Loads the checkpoint at ``path`` into ``state_dict`` in place, on every rank, resharding to
    the tensors' current layout (``verify``: each stored block read is digest-checked)."""
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    reader = StorageReader(path, verify=verify)
    try:
        dcp_load(state_dict, storage_reader=cast(Any, reader), process_group=process_group, planner=planner)
    except BaseException as exc:
        raise _typed(exc, f"loading {os.fspath(path)}") from exc
    finally:
        reader.close()


def _typed(exc: BaseException, what: str) -> BaseException:
    """DCP's CheckpointException as our error (each rank's failure as text); others unchanged."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(exc, CheckpointException):
        return exc
    failures: dict[int, str] = {}
    for rank, failure in exc.failures.items():
        inner = failure[0] if isinstance(failure, tuple) and failure else failure
        if isinstance(inner, DistributedCheckpointError):  # the coordinator's report of the ranks
            failures.update(inner.failures)
        else:
            failures[rank] = _describe(failure)
    first = next(iter(failures.values()), "unknown failure")
    return DistributedCheckpointError(f"{what} failed on rank(s) {sorted(failures)}: {first}", failures)


def _describe(failure: Any) -> str:
    if isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
        failure = failure[0]  # DCP wraps (exception, traceback)
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    return str(failure)[:500]
