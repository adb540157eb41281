"""L1: the local-disk backend of the :class:`~ckptvault.storage.base.Storage` protocol.

Its mechanisms live in sibling modules, one per part of the protocol: ``local_write``
(transactions: staging directory, fsync, manifest last, rename/``renameat2`` as the commit),
``local_join`` (other processes' participants in a save, by the staging directory's name),
``local_read`` (reads through descriptors that never follow links), ``local_docs`` (documents with
compare-and-swap, event logs, leases as record locks), ``chunkstore`` (the run's chunk store) and
``local_common`` (staging names and the sweep of dead writers' leftovers). docs/format.md's "local
backend" section describes them for someone reading a run directory by hand.

``LocalStorage(root=...)`` is rooted at a directory the user named: below it, no link is ever
followed and missing directories are created; a key outside the root is opened as named.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

from ..config import MANIFEST_NAME, Settings
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from .atomic_file import atomic_output
from .base import Entry, EntryKind
from .chunkstore import ChunkStore
from .local_common import HOST_TAG, STAGING_MARK, is_committed, storage_error

# Re-exported for existing importers; their homes are local_common / safeopen.
from .local_common import exchange_paths as exchange_paths
from .local_common import sweep_staging as sweep_staging
from .local_docs import LocalDocuments
from .local_join import LocalParticipant
from .local_read import LocalReadHandle
from .local_write import LocalWriteTransaction
from .safeopen import fsync_dir as fsync_dir

__all__ = ["HOST_TAG", "STAGING_MARK", "LocalStorage"]

_OPEN_RETRIES = 5


class LocalStorage(LocalDocuments):
    """The local-disk backend; keys are plain file-system paths."""

    file_bytes: int | None = None

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, settings: Settings | None = None
    ) -> None:
        """``settings`` (the O_DIRECT choices) default to the environment's, read here, once: a
        backend never consults the environment in the middle of a write."""
        self.root = Path(os.path.abspath(root)) if root is not None else None
        self.settings = settings if settings is not None else Settings.from_env()

    def join(self, prefix: str, *names: str) -> str:
        return os.path.join(prefix, *names)

    # -- checkpoints ----------------------------------------------------------------------------
    def begin(self, target: str, *, overwrite: bool) -> LocalWriteTransaction:
        return LocalWriteTransaction(Path(target).absolute(), overwrite=overwrite, settings=self.settings)

    def join_transaction(self, target: str, token: str) -> LocalParticipant:
        """A participant writing into the staging directory ``token`` names (local_join)."""
        return LocalParticipant(Path(target).absolute(), token, settings=self.settings)

    def open(self, target: str) -> LocalReadHandle:
        # An overwrite can swap the directory out and delete it between our opening it and its
        # manifest: the path then names the new checkpoint, so open again instead of failing.
        for _ in range(_OPEN_RETRIES):
            try:
                return LocalReadHandle(Path(target))
            except CheckpointNotFoundError as exc:
                if not isinstance(exc.__cause__, CorruptCheckpointError) or not is_committed(Path(target)):
                    raise
        return LocalReadHandle(Path(target))

    def iter_checkpoints(self, root: str) -> Iterator[str]:
        """Committed checkpoints under ``root`` (itself included), skipping staging and hidden dirs."""
        base = Path(root)
        if is_committed(base):
            yield str(base)
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if MANIFEST_NAME in filenames and dirpath != str(base):
                dirnames[:] = []
                yield dirpath

    def list(self, prefix: str) -> list[Entry]:
        """Children of ``prefix``; links are never followed (a linked child is left out, and below
        the backend's root a linked directory on the way to ``prefix`` is refused) and a staging
        directory is listed as a plain directory, never as a checkpoint."""
        try:
            dir_fd = self._parent_fd(os.path.join(prefix, "_"), create=False)  # the parent of a child: prefix
        except (FileNotFoundError, NotADirectoryError):
            return []
        except StorageError:
            raise
        except OSError as exc:
            raise storage_error("cannot list", prefix, exc) from exc
        try:
            return sorted(self._entries(prefix, dir_fd), key=lambda e: e.name)
        except OSError as exc:
            raise storage_error("cannot list", prefix, exc) from exc
        finally:
            os.close(dir_fd)

    def _entries(self, prefix: str, dir_fd: int) -> Iterator[Entry]:
        for name in os.listdir(dir_fd):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted since the listing
            kind: EntryKind
            if stat.S_ISREG(st.st_mode):
                kind = "document"
            elif not stat.S_ISDIR(st.st_mode):
                continue  # links, FIFOs, sockets: never ours
            else:
                kind = "directory"
                if STAGING_MARK not in name:
                    try:
                        manifest = os.stat(f"{name}/{MANIFEST_NAME}", dir_fd=dir_fd, follow_symlinks=False)
                    except OSError:
                        pass
                    else:
                        if stat.S_ISREG(manifest.st_mode):
                            kind, st = "checkpoint", manifest
            yield Entry(
                name, os.path.join(prefix, name), kind, st.st_mtime, st.st_size if kind != "directory" else 0
            )

    def change_token(self, prefix: str) -> str | None:
        """The directory's identity and modification time: every entry added, renamed (a commit,
        an overwrite's swap, a document replaced) or removed under it changes its mtime."""
        try:
            st = os.stat(prefix)
        except OSError:
            return None
        return f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"

    def delete(self, target: str) -> bool:
        """Renames the checkpoint to a hidden staging name first (one step: it is never seen half
        deleted), then removes it; a crash in between leaves a leftover the next save sweeps."""
        source = Path(target)
        trash = source.with_name(
            f".{source.name}{STAGING_MARK}{HOST_TAG}.{os.getpid()}.del{secrets.token_hex(4)}"
        )
        try:
            os.rename(source, trash)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise storage_error("cannot delete", source, exc) from exc
        if trash.is_symlink():
            trash.unlink()  # a planted link is removed itself, never what it points at
        else:
            shutil.rmtree(trash, ignore_errors=True)
        return True

    def chunk_store(self, checkpoint: str) -> ChunkStore:
        return ChunkStore.for_checkpoint(checkpoint, direct_io=self.settings.direct_io)

    def publish_file(self, target: str, action: str = "write") -> AbstractContextManager[BinaryIO]:
        path = Path(target)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(f"cannot {action}", path, exc) from exc
        return atomic_output(path, action)
