"""Opening the files beside checkpoints without trusting the directory they lie in.

A run directory, a chunk store and a registry are inputs a stranger may have crafted (a run copied
from a shared disk, an unpacked archive): its ``run.json`` can be a symlink to the user's
``~/.bashrc``, its lock file a FIFO, its ``.ckptvault-store`` a symlink to another project's
directory. The library only ever *names* such files; these helpers are what it opens them with, so
that naming a hostile one is harmless:

* never through a symbolic link in the last component (``O_NOFOLLOW``), and, below a directory the
  caller named, never through a symlinked directory either (:func:`open_dir` walks each component
  with ``O_DIRECTORY | O_NOFOLLOW`` and later opens are relative to the descriptor it returns);
* never blocking: every open is ``O_NONBLOCK`` (a FIFO or a device opens at once), and anything
  that is not a regular file is refused after ``fstat`` before a byte is read or written;
* never allocating more than the file holds, nor more than a cap (:func:`read_file`);
* writes replace a file by renaming a private temporary file over it (:func:`replace_in_dir`),
  inside a directory held by descriptor: a symlink planted at the destination is replaced, never
  written through, and nothing is created outside the directory checked.

A refusal is :class:`UnsafeFileError` -- a :class:`~ckptvault.errors.StorageError`, hence also an
``OSError``: callers that already treat an unreadable bookkeeping file as "skip it" or "refuse to
act" (retention, the run index, the event log) keep doing so, and public entry points surface it
as a typed ``CheckpointError``. Only the directory the caller names (the run directory, the
catalog root) is followed: the user chose it, symlinks and all.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
from contextlib import suppress
from pathlib import Path

from ..errors import UnsafeFileError as UnsafeFileError  # re-exported: where the storage modules take it

# No bookkeeping document (run.json, index, pins, registry entry, validation result) comes near this;
# a file larger than it is hostile or damaged and is refused before anything is allocated.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
_READ_BLOCK = 1 << 20

PathArg = str | os.PathLike[str]


def _refuse(code: int, path: PathArg, why: str) -> UnsafeFileError:
    return UnsafeFileError(code, f"{os.fspath(path)} {why}; refusing to use it")


def open_file(path: PathArg, flags: int, mode: int = 0o644, *, dir_fd: int | None = None) -> int:
    """A descriptor of the regular file ``path`` (relative to ``dir_fd`` when given), opened with
    ``flags`` but never through a symlink and never blocking; the descriptor is left blocking.

    A missing file raises ``FileNotFoundError`` as ``os.open`` does (callers tell "absent" from
    "hostile"); a symlink, FIFO, socket or device raises :class:`UnsafeFileError`."""
    extra = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | extra, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(errno.ELOOP, path, "is a symbolic link") from exc
        if exc.errno in (errno.ENXIO, errno.ENODEV):  # a socket, or a FIFO with no reader
            raise _refuse(exc.errno, path, "is not a regular file") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refuse(errno.EINVAL, path, "is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, path: PathArg, *, cap: int = MAX_DOCUMENT_BYTES) -> bytes:
    """All bytes of an open regular file, refusing one larger than ``cap`` before allocating, and
    reading at most ``cap + 1`` bytes (a file growing while read is caught too)."""
    size = os.fstat(fd).st_size
    if size > cap:
        raise _refuse(errno.EFBIG, path, f"has {size} bytes, more than the {cap} such a file may have")
    parts: list[bytes] = []
    got = 0
    while True:
        block = os.read(fd, min(cap + 1 - got, max(size + 1 - got, _READ_BLOCK)))
        if not block:
            return b"".join(parts)
        parts.append(block)
        got += len(block)
        if got > cap:
            raise _refuse(errno.EFBIG, path, f"grew past the {cap} bytes such a file may have")


def read_file(
    path: PathArg, *, cap: int = MAX_DOCUMENT_BYTES, dir_fd: int | None = None, base: PathArg | None = None
) -> bytes:
    """The bytes of a small bookkeeping file (see :func:`open_file` and :func:`read_fd`). With
    ``base``, every directory between ``base`` and the file must be a real one (:func:`open_dir`)."""
    if base is not None:
        target = Path(path)
        parent_fd = open_dir(base, target.parent.relative_to(base))
        try:
            return read_file(target.name, cap=cap, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
    fd = open_file(path, os.O_RDONLY, dir_fd=dir_fd)
    try:
        return read_fd(fd, path, cap=cap)
    finally:
        os.close(fd)


def open_dir(base: PathArg, rel: PathArg = "", *, create: bool = False) -> int:
    """A descriptor of the directory ``base/rel``.

    ``base`` is opened as named (the caller chose it, symlinks and all); every component of ``rel``
    must be a real directory -- a symlink, or a file where a directory belongs, raises
    :class:`UnsafeFileError`. ``create`` makes missing components (mode 0755); otherwise a missing
    one raises ``FileNotFoundError``."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in Path(rel).parts:
            if part in (".", "..") or os.sep in part:
                raise _refuse(errno.EINVAL, Path(base) / rel, "leaves its base directory")
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                try:
                    child = os.open(part, flags, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    why = "is a symbolic link or not a directory"
                    raise _refuse(exc.errno, Path(base) / rel, why) from exc
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_dir(base: PathArg, rel: PathArg) -> bool:
    """True when ``base/rel`` exists and every component of ``rel`` is a real directory; False when
    it is missing; :class:`UnsafeFileError` when a component is a symlink or not a directory."""
    try:
        fd = open_dir(base, rel)
    except FileNotFoundError:
        return False
    os.close(fd)
    return True


def unlock_close(fd: int) -> None:
    """Releases a ``flock`` explicitly, then closes: a forked child (a DataLoader worker started
    while a save held the lock) shares the open file description, so without ``LOCK_UN`` the lock
    would stay held until that child exits, and the next lock in this process would wait for it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass  # not locked, or a descriptor of a file system without flock: closing is what is left
    finally:
        os.close(fd)


def fsync_dir(path: PathArg) -> None:
    """Makes the entries of a directory durable (new names, renames, deletions)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parent_fd(path: Path, base: PathArg | None) -> int:
    if base is None:
        return open_dir(path.parent)
    return open_dir(base, path.parent.relative_to(base), create=True)


def append_text(path: PathArg, text: str, *, base: PathArg | None = None) -> None:
    """Appends ``text`` to a regular file (created if missing), never through a link or into a FIFO.
    ``base``: as for :func:`read_file`."""
    target = Path(path)
    dir_fd = _parent_fd(target, base)
    try:
        fd = open_file(target.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        view = memoryview(text.encode("utf-8"))
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


TEMP_DOCUMENT = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # what replace_in_dir names its temporary files
_REPLACE_TRIES = 3


def replace_in_dir(dir_fd: int, name: str, data: bytes, *, durable: bool) -> None:
    """Replaces ``name`` in the directory held by ``dir_fd`` with ``data``: a private temporary
    file ``.NAME.<8 hex>.tmp`` (never through a link), fsynced unless ``durable=False``, renamed
    over the name, then the directory fsynced; a failure leaves no temporary file.

    The temporary file is ``flock``-ed while it lives, so :func:`sweep_dead_temporaries` can tell a
    killed writer's leftover (lock free) from a live write without any lock of its own; if a sweep
    takes it in the instant between its creation and its lock, the write starts over."""
    for attempt in range(_REPLACE_TRIES):
        temp = f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(temp, flags, 0o644, dir_fd=dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # ours alone: a new file; released below
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
                try:
                    os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except FileNotFoundError:
                    if attempt + 1 == _REPLACE_TRIES:
                        raise
                    continue  # swept away before we locked it: write it again
            finally:
                unlock_close(fd)
        except BaseException:
            with suppress(OSError):  # already renamed, or the disk is gone
                os.unlink(temp, dir_fd=dir_fd)
            raise
        break
    if durable:
        os.fsync(dir_fd)  # the rename itself is durable too


def sweep_dead_temporaries(dir_fd: int) -> int:
    """Removes the temporary files of :func:`replace_in_dir` whose writer is gone (their lock is
    free: a killed process's locks die with it) from the directory held by ``dir_fd``; a live
    write's file is left alone. Returns how many it removed. Links and non-regular files named
    like one are not ours and stay."""
    removed = 0
    for name in os.listdir(dir_fd):
        if not TEMP_DOCUMENT.match(name):
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            continue  # gone already, or a link
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer's
            with suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
                removed += 1
        finally:
            os.close(fd)
    return removed
