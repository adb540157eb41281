"""Participants in a local-disk save: other processes (the ranks of a multi-rank save) writing their
files into the staging directory of a transaction that ``begin`` started elsewhere.

The token is that staging directory's name (``.<name>.ckptvault-tmp.<host>.<pid>.<random>``, one
component in the target's parent). It comes over the network from another rank, so it is untrusted:
it must match the staging pattern *of this target* exactly (no separator, no ``..``, no other
target's staging, no trash name of an overwrite or delete) and name a real directory, not a link;
anything else is StorageError EINVAL before anything is touched. Every ``create`` opens the directory
again without following a link and checks it is still the one joined: once the coordinator commits
(the directory is renamed onto the target) or aborts (it is removed), a late participant gets
ENOENT instead of writing into a published checkpoint or a stranger's directory. (The token holds
the target's name: it is printable ASCII of at most 200 characters only while that name is ASCII of
at most about 150; checkpoint names the library builds are.)

A participant never takes the staging directory's ``flock`` (the coordinator holds it for the save's
whole life, which is what keeps sweepers away) and never sweeps. Files are created with ``O_EXCL``
(a name anyone already wrote is EEXIST) through :func:`~.local_write.open_writable`, so they honour
direct IO exactly as the coordinator's do, and are fsynced by ``close``; the coordinator's fsync of
the staging directory at commit makes their names durable too.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from ..config import MANIFEST_NAME, Settings
from ..errors import StorageError
from .local_common import STAGING_MARK, storage_error
from .local_write import DirectWritableFile, LocalWritableFile, open_writable

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def staging_token_pattern(target: Path) -> re.Pattern[str]:
    """The exact shape of a staging directory name of ``target`` (local_write builds them):
    host tag (8 hex), pid, 8 random hex digits. An overwrite's ``.old`` / delete's ``.del`` trash
    names do not match."""
    return re.compile(
        rf"\.{re.escape(target.name)}{re.escape(STAGING_MARK)}[0-9a-f]{{8}}\.[0-9]+\.[0-9a-f]{{8}}"
    )


def _invalid(token: object, why: str) -> StorageError:
    return StorageError(errno.EINVAL, f"{str(token)[:80]!r} is not a staging token of this target: {why}")


class LocalParticipant:
    """One participant (see the module docstring): creates files in the joined staging directory,
    aborts by deleting only those; never commits."""

    def __init__(self, target: Path, token: str, *, settings: Settings | None = None) -> None:
        if not isinstance(token, str) or not staging_token_pattern(target).fullmatch(token):
            raise _invalid(token, "not the staging name pattern")
        settings = settings or Settings()
        self.direct_io, self.direct_io_min_bytes = settings.direct_io, settings.direct_io_min_bytes
        self.target = target
        self.token = token
        self.staging = target.parent / token
        try:
            st = os.lstat(self.staging)
        except FileNotFoundError as exc:
            raise StorageError(
                errno.ENOENT, f"{self.staging}: no such staging area (aborted, committed or swept)"
            ) from exc
        except OSError as exc:
            raise storage_error("cannot join", self.staging, exc) from exc
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise _invalid(token, "not a directory (a link or a file)")
        self._identity = (st.st_dev, st.st_ino)
        self._files: list[LocalWritableFile | DirectWritableFile] = []
        self._names: list[str] = []
        self._done = False
        os.close(self._pin())  # the directory opens as one (and is still the one just looked at)

    def _pin(self) -> int:
        """A descriptor of the joined staging directory, opened afresh without following a link;
        ENOENT when the path no longer names it (committed, aborted, swept)."""
        try:
            fd = os.open(self.staging, _OPEN_DIR)
        except FileNotFoundError as exc:
            raise StorageError(errno.ENOENT, f"{self.staging}: the staging area is gone") from exc
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _invalid(self.token, "not a directory (a link or a file)") from exc
            raise storage_error("cannot open staging directory", self.staging, exc) from exc
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self._identity:
            os.close(fd)
            raise StorageError(errno.ENOENT, f"{self.staging}: the staging area joined is gone")
        return fd

    def create(self, name: str, *, size_hint: int = 0) -> LocalWritableFile | DirectWritableFile:
        if self._done:
            raise StorageError(errno.EBADF, "transaction already finished")
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise StorageError(errno.EINVAL, f"{name!r} is not a file name")
        if name == MANIFEST_NAME:
            raise StorageError(errno.EEXIST, f"{name} is the coordinator's to write")
        direct = self.direct_io and size_hint >= self.direct_io_min_bytes
        fd = self._pin()
        try:
            handle = open_writable(self.staging / name, direct=direct, dir_fd=fd)
        finally:
            os.close(fd)
        self._files.append(handle)
        self._names.append(name)
        return handle

    def commit(self, manifest: bytes, *, wait_files: Callable[[], None] | None = None) -> None:
        """Refused: only the transaction that began the save commits it (after every rank's files
        are durable); nothing is touched."""
        raise StorageError(errno.EPERM, "only the transaction that began the save commits it")

    def abort(self) -> None:
        """Deletes the files this participant created, best effort; an area gone (committed,
        aborted, swept) is left alone -- never a file of a published checkpoint."""
        if self._done:
            return
        self._done = True
        for handle in self._files:
            handle.discard()
        try:
            fd = self._pin()
        except StorageError:
            return
        try:
            for name in self._names:
                with suppress(OSError):
                    os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)
