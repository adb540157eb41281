"""L3: a mirror's configuration and the small callbacks its copies run with (see :mod:`.mirror`)."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from ..engine.rundir import RunDirectory
from ..storage.base import Lease, Storage
from ..storage.resolve import storage_for

logger = logging.getLogger("ckptvault")

MirrorTarget = str | os.PathLike[str] | tuple[Storage, str]
"""Where a run is mirrored: a location (``storage_for`` resolves it) or a ``(Storage, key)`` pair."""


@dataclass(frozen=True)
class MirrorOptions:
    """How a run is mirrored (the manager's ``mirror_*`` and ``local_budget_bytes`` arguments)."""

    keep_last: int | None = None
    max_behind: int = 8
    grace_seconds: float = 30.0
    local_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"mirror_keep_last must be at least 1 (or None: keep all), got {self.keep_last}")
        if self.max_behind < 1:
            raise ValueError(f"mirror_max_behind must be at least 1, got {self.max_behind}")
        if self.grace_seconds < 0 or (self.local_budget_bytes is not None and self.local_budget_bytes < 0):
            raise ValueError("mirror_grace_seconds and local_budget_bytes cannot be negative")


def resolve_mirror(target: MirrorTarget) -> tuple[RunDirectory, str]:
    """The mirror's run and a label naming it: a location (``storage_for``, rooted there) or a
    ``(Storage, key)`` pair."""
    if isinstance(target, tuple):
        storage, key = target
        return RunDirectory(key, storage), f"{type(storage).__name__}:{key}"
    storage, key = storage_for(target, rooted=True)
    return RunDirectory(key, storage), os.fspath(target)


class LeaseRenewer:
    """A progress callback that renews the mirror's lease during a long upload, and holds the
    upload at a part boundary while ``idle`` is clear: while the training loop saves locally, the
    upload's reading, hashing and sending would take CPU and disk from the save the loop waits for."""

    def __init__(self, lease: Lease, idle: threading.Event | None = None) -> None:
        self.lease = lease
        self.idle = idle
        self.renewed = time.monotonic()

    def __call__(self, nbytes: int) -> None:
        while self.idle is not None and not self.idle.wait(5.0):
            self._renew()
        self._renew()

    def _renew(self) -> None:
        if time.monotonic() - self.renewed > 30.0:
            self.lease.renew()
            self.renewed = time.monotonic()


class ProgressLog:
    """A progress callback that logs every 256 MiB (a pull on a fresh machine can be long)."""

    STEP = 256 * 1024 * 1024

    def __init__(self, what: str) -> None:
        self.what = what
        self.done = 0
        self.logged = 0

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if self.done - self.logged >= self.STEP:
            self.logged = self.done
            logger.info("%s: %d MiB so far", self.what, self.done >> 20)
