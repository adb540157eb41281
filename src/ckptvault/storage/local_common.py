"""Mechanisms the local-disk backend's modules share: staging names, the host tag, typed errors,
the atomic swap (``renameat2``) and the sweep of dead writers' staging directories.

Staging directories are ``.<name>.ckptvault-tmp.<host>.<pid>.<random>``; each is ``flock``-ed by its
writer for its whole life, so the next save in the same directory can tell dead leftovers (lock
free, process gone) from live saves and sweeps only the dead ones.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import shutil
import socket
import time
from pathlib import Path

from ..config import MANIFEST_NAME
from ..errors import StorageError

STAGING_MARK = ".ckptvault-tmp."
# A staging directory whose owner is alive but has not locked it yet is younger than this.
_UNLOCKED_GRACE_SECONDS = 60.0
_RENAME_EXCHANGE = 2
HOST_TAG = hashlib.blake2s(socket.gethostname().encode(), digest_size=4).hexdigest()


def storage_error(action: str, path: Path | str, exc: OSError) -> StorageError:
    err = StorageError(exc.errno or 0, f"{action} {path}: {exc.strerror or exc}")
    err.__cause__ = exc
    return err


def _load_renameat2() -> object | None:
    """libc's renameat2, which Python does not expose; None where the platform lacks it."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        func = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swaps two paths; False when the platform or file system cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)  # type: ignore[operator]
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def is_committed(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_staging(parent: Path) -> list[Path]:
    """Removes staging directories of dead writers in ``parent``; returns what it removed."""
    removed: list[Path] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(".") or STAGING_MARK not in name:
            continue
        path = parent / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            host, _, pid_text = name.rsplit(STAGING_MARK, 1)[1].partition(".")
            pid = int(pid_text.split(".")[0]) if pid_text.split(".")[0].isdigit() else -1
            young = time.time() - os.fstat(fd).st_mtime < _UNLOCKED_GRACE_SECONDS
            if host == HOST_TAG and _pid_alive(pid) and young:
                continue  # a live writer (maybe another thread of ours) created it a moment ago
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
