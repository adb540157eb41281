"""Local-disk reads of one committed checkpoint, through descriptors that never follow links."""

from __future__ import annotations

import errno
import mmap
import os
import stat
from pathlib import Path

from ..config import MANIFEST_NAME, MAX_MANIFEST_BYTES
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from .local_common import STAGING_MARK, storage_error


class LocalReadHandle:
    """Reads files of one committed checkpoint; refuses symlinks and anything not a regular file.

    Every file is opened relative to a descriptor of the checkpoint directory taken once, so a
    reader stays on one checkpoint even if an overwrite swaps another into its path meanwhile.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        if STAGING_MARK in target.name:
            raise CheckpointNotFoundError(f"{target}: staging area of an unfinished save, never a checkpoint")
        try:
            self._dir_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise CheckpointNotFoundError(f"{target}: no such checkpoint directory") from exc
        except OSError as exc:
            raise storage_error("cannot open", target, exc) from exc
        self._fds: dict[str, int] = {}
        try:
            self._fd(MANIFEST_NAME)
        except CorruptCheckpointError as exc:
            self.close()
            if exc.kind != "missing-file":
                raise
            raise CheckpointNotFoundError(
                f"{target}: not a committed checkpoint (no {MANIFEST_NAME})"
            ) from exc

    def is_stale(self) -> bool:
        """True when the path now names another directory than the one this handle reads."""
        try:
            now, ours = os.stat(self.target), os.fstat(self._dir_fd)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino)

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is not None:
            return fd
        path = self.target / name
        try:
            # O_NONBLOCK: opening a FIFO planted in place of a file must not wait for a writer.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(name, flags, dir_fd=self._dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeCheckpointError(
                    "is a symlink; checkpoints never follow links", path=str(self.target), file=name
                ) from exc
            if exc.errno == errno.ENOENT:
                raise CorruptCheckpointError(
                    "file listed in the manifest is missing",
                    path=str(self.target),
                    file=name,
                    kind="missing-file",
                ) from exc
            raise storage_error("cannot open", path, exc) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafeCheckpointError("is not a regular file", path=str(self.target), file=name)
        os.set_blocking(fd, True)
        self._fds[name] = fd
        return fd

    def read_manifest(self) -> bytes:
        fd = self._fd(MANIFEST_NAME)
        size = os.fstat(fd).st_size
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"manifest of {size} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit",
                path=str(self.target),
                file=MANIFEST_NAME,
                kind="bad-manifest",
            )
        return self.read(MANIFEST_NAME, 0, size)

    def file_names(self) -> list[str]:
        return sorted(os.listdir(self._dir_fd))

    def size(self, name: str) -> int:
        return os.fstat(self._fd(name)).st_size

    def read(self, name: str, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(name, offset, memoryview(buffer))
        return bytes(buffer)

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        fd = self._fd(name)
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        done = 0
        try:
            while done < len(view):
                got = os.preadv(fd, [view[done : done + (1 << 30)]], offset + done)
                if got == 0:
                    raise CorruptCheckpointError(
                        f"file ends at byte {offset + done}, expected {offset + len(view)}",
                        path=str(self.target),
                        file=name,
                        kind="truncated",
                    )
                done += got
        except OSError as exc:
            raise storage_error("cannot read", self.target / name, exc) from exc

    def mmap(self, name: str, *, copy_on_write: bool = False) -> mmap.mmap | None:
        fd = self._fd(name)
        if os.fstat(fd).st_size == 0:
            return None
        return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY if copy_on_write else mmap.ACCESS_READ)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
