"""L3: a mirror's configuration and the small callbacks its copies run with (see :mod:`.mirror`)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

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
    """Progress of a pull (a restore on a fresh machine can move gigabytes): a progress bar on a
    terminal (bytes, speed), and a log line every 256 MiB either way. A context manager; the
    callback may be called from several copying threads at once."""

    STEP = 256 * 1024 * 1024

    def __init__(self, what: str, total: int | None = None, *, stream: TextIO | None = None) -> None:
        self.what = what
        self.total = total
        self.done = 0
        self.logged = 0
        self._lock = threading.Lock()
        self._stream = stream if stream is not None else sys.stderr
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressLog:
        if self._stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            console = Console(file=self._stream)
            self._bar = Progress(
                TextColumn(self.what.replace("[", "\\[")),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            log = self.done - self.logged >= self.STEP
            if log:
                self.logged = self.done
        if self._bar is not None:
            self._bar.advance(self._task, nbytes)
        if log:
            logger.info("%s: %d MiB so far", self.what, self.done >> 20)
