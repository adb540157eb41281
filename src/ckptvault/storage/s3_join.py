"""Participants in an object-store save: other processes (the ranks of a multi-rank save) uploading
their files into the save area of a transaction that ``begin`` started elsewhere (docs/format.md §14).

The token is the save id (32 lowercase hex digits); the area is derived from *this* target and the
id (:func:`~.s3_txn.area_of`), so no token, however crafted, reaches another key: a malformed one is
StorageError EINVAL, and one of another target simply names no area here (ENOENT). The area is open
to participants while its join marker exists -- the coordinator puts it when its token is first read
and deletes it right before the manifest's PUT (commit) or with the area (abort) -- so a participant
checks it at join and at every ``create``: a late rank gets ENOENT instead of adding a file to a
published checkpoint. Files go up exactly as the coordinator's (:class:`~.s3_txn.S3WritableFile`,
multipart uploads, durable when ``close`` returns).

Object stores have no create-if-absent for multipart uploads here, so the EEXIST check of a name
(a HEAD before the upload starts) is best effort: two ranks racing for one name are not caught.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from ..errors import StorageError
from .s3_client import BucketOwner, ObjectClient
from .s3_txn import JOIN_MARKER, SAVE_ID, S3WritableFile, area_of, check_file_name


def check_save_token(token: object) -> str:
    """The token as a save id; anything else (a path, a separator, other text) is EINVAL."""
    if not isinstance(token, str) or not SAVE_ID.fullmatch(token):
        raise StorageError(errno.EINVAL, f"{str(token)[:80]!r} is not a save token (32 hex digits)")
    return token


class S3Participant:
    """One participant (see the module docstring): uploads into the joined area, aborts by deleting
    only its own files while the area is still open, never commits."""

    def __init__(self, storage: BucketOwner, target: str, token: str) -> None:
        self.storage = storage
        self.client: ObjectClient = storage.client
        self.target = target
        self.token = check_save_token(token)
        self.area = area_of(target, token)
        self._open: dict[str, S3WritableFile] = {}
        self._written: set[str] = set()
        self._done = False
        if not self._area_open():
            raise StorageError(errno.ENOENT, f"{self.client.url(target)}: no open save has token {token}")

    @property
    def finished(self) -> bool:
        return self._done

    def _area_open(self) -> bool:
        return self.client.head(f"{self.area}/{JOIN_MARKER}") is not None

    def create(self, name: str, *, size_hint: int = 0) -> S3WritableFile:
        if self._done:
            raise StorageError(errno.EBADF, "transaction already finished")
        check_file_name(name, self.target)
        path = f"{self.area}/{name}"
        if name in self._open or name in self._written or self.client.head(path) is not None:
            raise StorageError(errno.EEXIST, f"{self.client.url(path)} was already created")
        if not self._area_open():
            raise StorageError(errno.ENOENT, f"{self.client.url(self.target)}: the save joined is over")
        part = self.storage.part_bytes
        writer = self.client.open_writer(path, part_bytes=part, max_concurrency=self.storage.max_concurrency)
        file = self._open[name] = S3WritableFile(self, name, path, writer)
        return file

    def _closed(self, name: str) -> None:
        self._open.pop(name, None)
        self._written.add(name)

    def commit(self, manifest: bytes, *, wait_files: Callable[[], None] | None = None) -> None:
        """Refused: only the transaction that began the save commits it; nothing is touched."""
        raise StorageError(errno.EPERM, "only the transaction that began the save commits it")

    def abort(self) -> None:
        """Cancels open uploads; deletes this participant's files only while the area is open (once
        the marker is gone the save was committed -- its files are published -- or aborted, and its
        coordinator deleted the area). Best effort: never raises."""
        if self._done:
            return
        self._done = True
        for file in list(self._open.values()):
            file.abort()
        self._open.clear()
        written = [f"{self.area}/{name}" for name in sorted(self._written)]
        self._written.clear()
        if not written:
            return
        try:
            if self._area_open():
                self.client.delete(written)
        except StorageError:
            pass  # left to the sweep of dead saves (recover(), the next save of the target)
