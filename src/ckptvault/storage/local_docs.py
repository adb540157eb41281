"""The local backend's small documents, event logs and leases (storage protocol items 4-6).

* **Documents** are replaced by renaming a private temporary file over them inside a directory held
  by descriptor (``safeopen``): a reader sees the old or the new bytes. Their version is a digest of
  their bytes, so a version needs no extra file and survives copying a run directory; a conditional
  put compares and replaces under an exclusive ``flock`` of that directory descriptor, which every
  put takes (readers never lock: the rename is atomic).
* **Event logs** are appended with ``O_APPEND`` (one ``write`` per line: lines of concurrent
  appenders never interleave within a line on a local file system).
* **Leases** are POSIX record locks (``lockf``), not ``flock``: a flock belongs to the open file,
  which forked DataLoader workers share, so a SIGKILLed trainer's workers would keep the run locked;
  a record lock belongs to the process and dies with it -- the lease's expiry is the holder's death.
  Record locks do not exclude a second lock in the same process, hence the in-process registry.

Below the backend's ``root`` (the directory the user named), every directory is opened without
following links and created if missing; a key outside any root has its parent opened as named.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConcurrentWriteError, DocumentConflictError, StorageError
from .base import Document
from .local_common import storage_error
from .safeopen import (
    UnsafeFileError,
    open_dir,
    open_file,
    read_fd,
    replace_in_dir,
    sweep_dead_temporaries,
    unlock_close,
)

_LEASED: dict[str, str] = {}  # key -> owner, of leases this process holds (record locks do not exclude us)
_LEASED_LOCK = threading.Lock()


def _open(key: str, flags: int, *, dir_fd: int) -> int:
    """``safeopen.open_file`` of the key's last component in ``dir_fd``; a refusal names the key."""
    try:
        return open_file(Path(key).name, flags, dir_fd=dir_fd)
    except UnsafeFileError as exc:
        raise UnsafeFileError(exc.errno or 0, f"{key}: {exc.strerror or exc}") from exc


def version_of(data: bytes) -> str:
    """A document's version: a digest of its bytes (equal bytes, equal version; no extra file)."""
    return hashlib.blake2b(data, digest_size=12).hexdigest()


class _Rooted:
    """Opens the parent directory of a key: below ``root`` through real directories only."""

    root: Path | None

    def _parent_fd(self, key: str, *, create: bool) -> int:
        path = Path(os.path.abspath(key)) if self.root is not None else Path(key)
        if self.root is not None and path.parent.is_relative_to(self.root):
            if create:  # a new run: its directory appears with its first document or lease
                self.root.mkdir(parents=True, exist_ok=True)
            return open_dir(self.root, path.parent.relative_to(self.root), create=create)
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


class LocalDocuments(_Rooted):
    """Documents, logs and leases of :class:`~ckptvault.storage.local.LocalStorage`."""

    def _parent(self, key: str, *, create: bool) -> int | None:
        """The key's parent directory by descriptor; None when it does not exist (and ``create``
        is off); a refused link stays an UnsafeFileError, other failures become StorageError."""
        try:
            return self._parent_fd(key, create=create)
        except FileNotFoundError:
            if create:
                raise StorageError(errno.ENOENT, f"cannot create the directory of {key}") from None
            return None
        except StorageError:
            raise
        except OSError as exc:
            raise storage_error("cannot open the directory of", key, exc) from exc

    # -- documents ----------------------------------------------------------------------------
    def get(self, key: str, *, max_bytes: int) -> Document | None:
        dir_fd = self._parent(key, create=False)
        if dir_fd is None:
            return None
        try:
            fd = _open(key, os.O_RDONLY, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except StorageError:
            raise  # already typed (a refused link, a lost compare-and-swap)
        except OSError as exc:
            raise storage_error("cannot open", key, exc) from exc
        finally:
            os.close(dir_fd)
        try:
            data = read_fd(fd, key, cap=max_bytes)
        finally:
            os.close(fd)
        return Document(data, version_of(data))

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_version: str | None = None,
        if_absent: bool = False,
        durable: bool = True,
    ) -> str:
        name = Path(key).name
        dir_fd = self._parent(key, create=True)
        assert dir_fd is not None  # created
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)  # released below
            if if_version is not None or if_absent:
                self._check_condition(key, dir_fd, if_version, if_absent)
            replace_in_dir(dir_fd, name, data, durable=durable)
        except StorageError:
            raise  # already typed (a refused link, a lost compare-and-swap)
        except OSError as exc:
            raise storage_error("cannot write", key, exc) from exc
        finally:
            unlock_close(dir_fd)
        return version_of(data)

    @staticmethod
    def _check_condition(key: str, dir_fd: int, if_version: str | None, if_absent: bool) -> None:
        try:
            fd = _open(key, os.O_RDONLY, dir_fd=dir_fd)
        except FileNotFoundError:
            if if_version is not None:
                raise DocumentConflictError(errno.ENOENT, f"{key} was removed by another writer") from None
            return
        try:
            current = read_fd(fd, key)
        finally:
            os.close(fd)
        if if_absent:
            raise DocumentConflictError(errno.EEXIST, f"{key} was created by another writer")
        if version_of(current) != if_version:
            raise DocumentConflictError(errno.ESTALE, f"{key} was changed by another writer")

    def remove(self, key: str, *, if_version: str | None = None) -> bool:
        dir_fd = self._parent(key, create=False)
        if dir_fd is None:
            return False
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            if if_version is not None:
                self._check_condition(key, dir_fd, if_version, False)
            try:
                os.unlink(Path(key).name, dir_fd=dir_fd)
            except FileNotFoundError:
                return False
            except StorageError:
                raise  # already typed (a refused link, a lost compare-and-swap)
            except OSError as exc:
                raise storage_error("cannot remove", key, exc) from exc
            return True
        finally:
            unlock_close(dir_fd)

    def recover(self, prefix: str) -> None:
        try:
            dir_fd = self._parent_fd(os.path.join(prefix, "x"), create=False)
        except OSError:
            return  # nothing there (or not a real directory): nothing of ours to remove
        try:
            sweep_dead_temporaries(dir_fd)
        except OSError as exc:
            raise storage_error("cannot clean up", prefix, exc) from exc
        finally:
            os.close(dir_fd)

    # -- event logs -----------------------------------------------------------------------------
    def append(self, key: str, line: bytes) -> None:
        try:
            dir_fd = self._parent_fd(key, create=True)
            try:
                fd = _open(key, os.O_WRONLY | os.O_APPEND | os.O_CREAT, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except StorageError:
            raise  # already typed (a refused link, a lost compare-and-swap)
        except OSError as exc:
            raise storage_error("cannot append to", key, exc) from exc

    def read_lines(self, key: str, *, max_line: int) -> Iterator[bytes]:
        try:
            dir_fd = self._parent_fd(key, create=False)
            try:
                fd = _open(key, os.O_RDONLY, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except FileNotFoundError:
            return
        except StorageError:
            raise  # already typed (a refused link, a lost compare-and-swap)
        except OSError as exc:
            raise storage_error("cannot read", key, exc) from exc
        with os.fdopen(fd, "rb") as handle:
            while line := handle.readline(max_line + 1):
                if len(line) > max_line:
                    while line and not line.endswith(b"\n"):  # skip the rest of the over-long line
                        line = handle.readline(max_line)
                    continue
                yield line

    # -- leases -----------------------------------------------------------------------------------
    def acquire_lease(self, key: str, *, owner: str, ttl_seconds: float) -> LocalLease:
        ident = os.path.realpath(key)
        with _LEASED_LOCK:
            if ident in _LEASED:
                raise ConcurrentWriteError(
                    errno.EWOULDBLOCK, f"{key} is held by {_LEASED[ident]} (in this process)"
                )
            try:
                dir_fd = self._parent_fd(key, create=True)
                try:
                    fd = _open(key, os.O_RDWR | os.O_CREAT, dir_fd=dir_fd)
                finally:
                    os.close(dir_fd)
            except StorageError:
                raise  # already typed (a refused link, a lost compare-and-swap)
            except OSError as exc:
                raise storage_error("cannot open", key, exc) from exc
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except StorageError:
                raise  # already typed (a refused link, a lost compare-and-swap)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise storage_error("cannot lock", key, exc) from exc
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConcurrentWriteError(errno.EWOULDBLOCK, f"{key} is held by {holder}") from None
            _LEASED[ident] = owner
        with contextlib.suppress(OSError):  # who holds it: a note for humans, not worth failing for
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{owner}\n".encode(), 0)
        return LocalLease(key, owner, fd, ident)


@dataclass
class LocalLease:
    """A record lock held until :meth:`release` or the holder's death (no clock involved)."""

    key: str
    owner: str
    _fd: int = field(repr=False)
    _ident: str = field(repr=False)

    @property
    def expires(self) -> float:
        return float("inf")

    def renew(self) -> None:
        if self._fd < 0:
            raise ConcurrentWriteError(errno.ENOLCK, f"the lease of {self.key} was released")

    def release(self) -> None:
        if self._fd < 0:
            return
        os.close(self._fd)  # closing the only descriptor releases the record lock
        self._fd = -1
        with _LEASED_LOCK:
            _LEASED.pop(self._ident, None)
