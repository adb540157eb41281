"""Lightning checkpoints as ckptvault checkpoints: ``Trainer(plugins=[VaultCheckpointIO()])``.

Lightning hands every checkpoint it writes (``ModelCheckpoint``, ``trainer.save_checkpoint``) to the
strategy's :class:`~lightning.fabric.plugins.io.checkpoint_io.CheckpointIO`; the default one
``torch.save``-s the dict into one pickle file. :class:`VaultCheckpointIO` stores the same dict
(``state_dict``, ``optimizer_states``, ``lr_schedulers``, ``loops``, ``callbacks``,
``hyper_parameters``, the AMP scaler, ``epoch``/``global_step``, ``pytorch-lightning_version``) with
:func:`ckptvault.save` instead: the ``.ckpt`` path Lightning chooses becomes a checkpoint
*directory* of that name, committed atomically and checksummed, and nothing is pickled.

Why the pieces are as they are:

* **Atomic names.** A save replaces ``last.ckpt`` by an atomic swap (``overwrite=True``, as
  ``torch.save`` overwrites), and a half-written checkpoint lives under a hidden staging name, so
  ``ckpt_path="last"`` (Lightning lists ``last*.ckpt`` in the checkpoint directory and takes the
  newest) can only ever find committed checkpoints, even after a SIGKILL mid-save.
* **No pickle.** Values ckptvault cannot encode safely raise :class:`~ckptvault.UnsupportedStateError`
  naming their path (``state/hyper_parameters/fn``). Lightning's own ``AttributeDict``,
  ``argparse.Namespace`` and OmegaConf containers in the hyper-parameters are turned into plain
  dicts first, and ``pathlib`` paths into strings (they come back as ``dict`` / ``str``).
* **Verified loads.** :meth:`load_checkpoint` reads with every byte checked; tampering raises
  :class:`~ckptvault.CorruptCheckpointError` instead of resuming from damaged state.
* **Safe removal.** :meth:`remove_checkpoint` (top-k pruning) deletes only committed checkpoints, through
  the storage layer (renamed away first, a symlink unlinked itself, never followed).
* **Async.** ``async_save=True`` saves through the plugin's own background writer (the pipeline of
  :func:`ckptvault.save_async`): the call returns once the tensors are copied to host staging
  memory. Lightning writes the top-k file and ``last.ckpt`` back to back and then prunes, so small
  checkpoints (up to ``QUEUE_BYTES`` staged) queue behind the one being committed, in memory of their
  own, instead of waiting for its fsyncs; pruning is queued behind them too, so an old checkpoint
  is deleted only after the new ones are committed, and not at all when one of them failed (at
  most ``MAX_IN_FLIGHT`` jobs wait; a larger state waits for the writer to be idle and is staged in
  the reused buffer). ``wait``/``teardown`` return or raise only once every queued job is done. A
  background failure
  is raised at the next save, load, removal or :meth:`teardown` (the semantics of Lightning's
  ``AsyncCheckpointIO``, without its extra clone of every tensor).

Sharded strategies (FSDP with ``state_dict_type="sharded"``, ``ModelParallelStrategy``) write
distributed checkpoints themselves and never call a ``CheckpointIO``; :func:`check_strategy` refuses
them and points at ``ckptvault.distributed.StorageWriter`` (docs/distributed.md). Lightning is
imported with this module only (``pip install 'ckptvault[lightning]'``).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from .. import api
from ..engine.background import BackgroundWriter
from ..engine.staging import StagingBuffer
from ..errors import CheckpointNotFoundError
from ..storage.foreign import present, remove_link, resolved_link

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ckptvault.integrations.lightning needs Lightning: pip install 'ckptvault[lightning]'"
    ) from exc

__all__ = ["ShardedStrategyError", "VaultCheckpointIO", "check_strategy", "plain_hparams"]

log = logging.getLogger(__name__)

SHARDED_HINT = (
    "ckptvault's Lightning plugin stores full (unsharded) checkpoints; for sharded state use "
    "torch.distributed.checkpoint with ckptvault.distributed.StorageWriter / StorageReader "
    "(docs/distributed.md)"
)

# Async: staged states up to this size queue behind the save being committed; beyond it (or with
# MAX_IN_FLIGHT jobs unfinished) the next save waits. 4 x 64 MiB bounds the extra staging memory.
QUEUE_BYTES = 64 * 1024 * 1024
MAX_IN_FLIGHT = 4

# Containers that only *hold* plain values, so converting them to a dict loses nothing but the type.
_NAMESPACE_TYPES: tuple[type, ...] = (argparse.Namespace,)


class ShardedStrategyError(ValueError):
    """The strategy shards the checkpoint across ranks; this plugin cannot store that state."""


def check_strategy(strategy: Any) -> None:
    """Raises :class:`ShardedStrategyError` for a strategy that bypasses ``CheckpointIO``.

    FSDP with ``state_dict_type="sharded"`` and ``ModelParallelStrategy`` save through
    ``torch.distributed.checkpoint`` on every rank and never call the plugin, so it would silently not
    be used; FSDP with ``state_dict_type="full"`` gathers the state on rank 0 and goes through it.
    """
    name = type(strategy).__name__
    if name == "ModelParallelStrategy" or (
        name == "FSDPStrategy" and getattr(strategy, "_state_dict_type", "full") == "sharded"
    ):
        raise ShardedStrategyError(f"{name} saves sharded checkpoints itself: {SHARDED_HINT}")


def _refuse_sharded_tensors(checkpoint: Mapping[str, Any]) -> None:
    """A DTensor/ShardedTensor reached us (a strategy we do not know): refuse with the way out."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        return
    for key, value in state.items():
        if type(value).__name__ in ("DTensor", "ShardedTensor"):
            raise ShardedStrategyError(f"state_dict[{key!r}] is a {type(value).__name__}: {SHARDED_HINT}")


def _is_omegaconf(value: Any) -> bool:
    return type(value).__module__.startswith("omegaconf")


def plain_hparams(value: Any) -> Any:
    """``value`` with the well-known safe containers replaced by plain ones (the same object when
    nothing needed converting, so tensors keep their identity and shared storage).

    ``AttributeDict`` and other exact ``dict`` subclasses become ``dict`` (``OrderedDict`` is kept),
    ``argparse.Namespace`` becomes ``dict(vars(ns))``, an OmegaConf config becomes
    ``OmegaConf.to_container(resolve=True)`` and a ``pathlib`` path its string.
    """
    if isinstance(value, PurePath):
        return os.fspath(value)
    if isinstance(value, _NAMESPACE_TYPES):
        return plain_hparams(dict(vars(value)))
    if _is_omegaconf(value):
        from omegaconf import OmegaConf

        return plain_hparams(OmegaConf.to_container(value, resolve=True))
    kind = type(value)
    if isinstance(value, dict):
        items = {k: plain_hparams(v) for k, v in value.items()}
        if kind in (dict, OrderedDict) and all(items[k] is value[k] for k in value):
            return value
        if kind is OrderedDict or (isinstance(value, OrderedDict) and hasattr(value, "_metadata")):
            converted: dict[Any, Any] = OrderedDict(items)
            if hasattr(value, "_metadata"):
                converted._metadata = value._metadata  # type: ignore[attr-defined]
            return converted
        return items
    if kind in (list, tuple):
        converted_seq = [plain_hparams(v) for v in value]
        if all(a is b for a, b in zip(converted_seq, value, strict=True)):
            return value
        return kind(converted_seq)
    return value


def _local_path(path: str) -> str | None:
    """The filesystem path for a local location (``file://`` stripped), None for object storage."""
    if path.startswith("file://"):
        return path[len("file://") :]
    return None if "://" in path else path


class VaultCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that writes verified, pickle-free ckptvault checkpoints.

    ``incremental`` / ``compression`` are :func:`ckptvault.save`'s (chunks shared through the
    ``.ckptvault-store`` beside the checkpoints, so top-k copies of unchanged tensors cost nothing);
    ``async_save`` saves in the background (see the module's notes); ``validate`` is ``save``'s level
    (``"checksum"`` or ``"readback"``); ``max_staging_bytes`` caps async staging memory.
    """

    def __init__(
        self,
        *,
        incremental: bool = False,
        compression: str | None = None,
        async_save: bool = False,
        validate: str = "checksum",
        max_staging_bytes: int | None = None,
    ) -> None:
        self.incremental = incremental
        self.compression = compression
        self.async_save = async_save
        self.validate = validate
        self.max_staging_bytes = max_staging_bytes
        self._writer: BackgroundWriter | None = None  # created by the first async save
        self._staging = StagingBuffer(max_staging_bytes)

    # -- saving -------------------------------------------------------------------------------------
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Commits ``checkpoint`` at ``path`` (a directory), replacing a checkpoint already there
        atomically. Raises :class:`~ckptvault.UnsupportedStateError` naming an unencodable value."""
        if storage_options is not None:
            raise TypeError(
                "VaultCheckpointIO.save_checkpoint got storage_options; it takes none "
                f"(got {storage_options!r}): pass ckptvault options to the plugin's constructor"
            )
        _refuse_sharded_tensors(checkpoint)
        state = plain_hparams(checkpoint)
        target = os.fspath(path)
        step = checkpoint.get("global_step")
        metadata: dict[str, Any] = {"lightning": {"epoch": checkpoint.get("epoch")}}
        if isinstance(step, int):
            metadata["step"] = step
        options: dict[str, Any] = {
            "metadata": metadata,
            "overwrite": True,
            "incremental": self.incremental,
            "compression": self.compression,
            "validate": self.validate,
        }
        if not self.async_save:
            api.save(target, state, **options)
            return
        if self._writer is None:
            self._writer = BackgroundWriter(queue_bytes=QUEUE_BYTES, max_in_flight=MAX_IN_FLIGHT)
        self._writer.submit_save(api.save_request(target, **options), state, self._staging)

    def wait(self) -> None:
        """Blocks until every background save and removal is done; raises a failure nobody saw."""
        if self._writer is not None:
            self._writer.wait_idle()

    # -- loading and removing -----------------------------------------------------------------------
    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint's dict, every byte verified first (``weights_only`` is moot: nothing in a
        ckptvault checkpoint is executed). ``map_location`` is a device or a dict of devices; None
        loads onto the CPU as Lightning's default does. A ``last.ckpt`` symlink is followed."""
        self.wait()  # resuming from the checkpoint still being written must see it committed
        if callable(map_location):
            raise TypeError("VaultCheckpointIO.load_checkpoint takes a device or a dict, not a function")
        target = os.fspath(path)
        local = _local_path(target)
        linked = resolved_link(local) if local is not None else None
        if linked is not None:
            target = linked
        state = api.load(target, map_location="cpu" if map_location is None else map_location)
        if not isinstance(state, dict):
            raise CheckpointNotFoundError(f"{target} is a ckptvault checkpoint but not a Lightning one")
        return state

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Deletes the committed checkpoint at ``path`` (a symlink: the link itself). Anything that is
        not a ckptvault checkpoint is left alone with a warning: pruning never deletes foreign files.
        With ``async_save`` the removal is queued behind the saves in flight and skipped when one of
        them failed (see the module's notes)."""
        target = os.fspath(path)
        if self._writer is None:
            _remove_now(target)
            return
        before = self._writer.jobs()

        def prune() -> None:
            # The jobs before this one ran first (one worker, in order). If one of them failed, the
            # checkpoint that was to replace this one may not exist: keep it (the failure surfaces).
            if not any(job.failed() for job in before):
                _remove_now(target)

        self._writer.submit(target, prune)

    def teardown(self) -> None:
        """Finishes the save in flight (Lightning calls this at the end of fit) and raises its error."""
        self.wait()


def _remove_now(target: str) -> None:
    local = _local_path(target)
    if local is not None and remove_link(local):
        return
    storage, where = api.storage_for(target)
    try:
        api.info(target)
    except CheckpointNotFoundError:
        if local is None or present(local):
            log.warning("not removing %s: it is not a committed ckptvault checkpoint", target)
        return
    storage.delete(where)
