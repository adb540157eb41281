"""L1: one standalone file written whole or not at all (a temporary file beside it, fsynced, renamed
into place), for outputs that are not checkpoints: an exported safetensors, ``.pt`` or ONNX file, a
report picture, the fingerprint digest cache.

It lives in ``storage/`` because it is a file operation: nothing above this layer calls ``os``. It is
the one atomic writer of the package (issue 14), so the temporary name, the fsync order and the
error wording are decided here once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import CheckpointError, StorageError
from .safeopen import fsync_dir


def temp_beside(target: Path) -> Path:
    """A fresh hidden name in ``target``'s directory: same file system, so the final rename is atomic."""
    return target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")


def publish_file(temp: Path, target: Path, *, durable: bool = True, data_synced: bool = False) -> None:
    """Renames the finished ``temp`` onto ``target``; with ``durable``, ``temp``'s bytes are fsynced
    first (unless the writer already did: ``data_synced``) and the directory after, so the new name
    survives a power cut (the rename alone does not)."""
    if durable and not data_synced:
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
    os.replace(temp, target)
    if durable:
        fsync_dir(target.parent)  # the rename itself is durable only once its directory is


@contextlib.contextmanager
def atomic_path(target: Path, action: str = "write", *, durable: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside ``target`` for the caller to write (for writers that want a
    path, like ``torch.save`` followed by a load-back check); on a clean exit it is published onto
    ``target`` (:func:`publish_file`).

    On any failure the temporary file is removed, so a crash or an error never leaves a partial
    ``target``; an :class:`OSError` (from the caller's writes too) becomes a :class:`StorageError`
    saying ``cannot <action> <target>``, unless it already is a :class:`CheckpointError`.
    """
    with _staged(target, action, durable, data_synced=False) as temp:
        yield temp


@contextlib.contextmanager
def atomic_output(
    target: Path, action: str = "write", *, durable: bool = True, private: bool = False
) -> Iterator[BinaryIO]:
    """Yields a binary handle; on a clean exit its bytes are fsynced and renamed onto ``target``.

    Failures as for :func:`atomic_path`. ``durable=False`` skips both fsyncs, for a file whose loss
    costs only time (a cache): it is still never seen half-written. ``private`` creates it readable
    by its owner only (mode 0600), for a file that lists the user's paths.
    """
    mode = 0o600 if private else 0o666

    def opener(path: str, flags: int) -> int:
        return os.open(path, flags, mode)

    with (
        _staged(target, action, durable, data_synced=True) as temp,
        open(temp, "wb", opener=opener) as handle,
    ):
        yield handle
        handle.flush()
        if durable:
            os.fsync(handle.fileno())


@contextlib.contextmanager
def _staged(target: Path, action: str, durable: bool, *, data_synced: bool) -> Iterator[Path]:
    temp = temp_beside(target)
    try:
        yield temp
        publish_file(temp, target, durable=durable, data_synced=data_synced)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, CheckpointError):
            raise
        raise StorageError(exc.errno or 0, f"cannot {action} {target}: {exc}") from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_atomically(
    target: Path, data: bytes, action: str = "write", *, durable: bool = True, private: bool = False
) -> None:
    """``data`` as the whole new content of ``target``, in one rename (see :func:`atomic_output`)."""
    with atomic_output(target, action, durable=durable, private=private) as handle:
        handle.write(data)
