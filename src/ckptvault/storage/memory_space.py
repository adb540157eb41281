"""The in-memory backend's one namespace (see :mod:`.memory`): objects, committed checkpoints,
leases and chunk-store locks in dicts under one lock, with the bookkeeping every part shares.
Its own module so that the backend's parts (transactions, handles, chunk store) depend on it and
not on each other or on the facade."""

from __future__ import annotations

import errno
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointExistsError, StorageError


def norm_key(key: str) -> str:
    """The canonical form of a key: ``/``-joined, no empty or ``.`` parts; ``..`` is refused (a key
    never climbs out of its prefix)."""
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StorageError(errno.EINVAL, f"{key!r}: '..' never names a key")
    return "/".join(parts)


def version_of(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()


@dataclass(frozen=True)
class Blob:
    """One object's bytes; ``serial`` is unique per write (what ``report_bad`` marks)."""

    data: bytes
    version: str
    modified: float
    serial: int


def rel_key(key: str, prefix: str) -> str | None:
    """``key`` relative to ``prefix`` when it lies strictly below it, else None."""
    if not prefix:
        return key or None
    return key[len(prefix) + 1 :] if key.startswith(prefix + "/") else None


@dataclass
class SharedExclusive:
    """The state of one store's lease: how many saves share it, whether a sweep holds it."""

    shared: int = 0
    exclusive: bool = False


@dataclass(frozen=True, eq=False)
class CheckpointObject:
    """A committed checkpoint: its files (manifest included), immutable once published."""

    files: dict[str, bytes]
    modified: float


@dataclass(eq=False)
class LeaseState:
    owner: str
    expires: float
    ttl: float


class ObjectSpace:
    """The namespace's state and bookkeeping; :class:`~.memory.MemoryStorage` is its facade.

    ``clock`` gives seconds since the epoch: lease expiry and ``Entry.modified`` use it, so a test
    can move time forward without sleeping.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())  # the one lock (and its waiters)
        self._checkpoints: dict[str, CheckpointObject] = {}
        self._objects: dict[str, Blob] = {}
        self._leases: dict[str, LeaseState] = {}
        self._tokens: dict[str, int] = {}  # prefix -> serial of the last change at or below it
        self._bad: set[tuple[str, int]] = set()  # (chunk key, serial) reported damaged
        self._store_locks: dict[str, SharedExclusive] = {}
        self._serial = 0
        # Open transactions by token, what join_transaction finds (in this process only).
        # token -> open MemoryTransaction (typed loosely: memory_handles imports this module)
        self._transactions: dict[str, Any] = {}

    # -- bookkeeping (callers hold the lock) -----------------------------------------------------
    def _bump(self, key: str) -> int:
        """Records a change at ``key``: every prefix above it gets a new change token."""
        self._serial += 1
        parts = key.split("/") if key else []
        for depth in range(len(parts) + 1):
            self._tokens["/".join(parts[:depth])] = self._serial
        return self._serial

    def _has_children(self, prefix: str) -> bool:
        return any(rel_key(k, prefix) for k in (*self._checkpoints, *self._objects))

    def _store(self, key: str, data: bytes) -> str:
        if key in self._checkpoints or self._has_children(key) or not key:
            raise StorageError(errno.EISDIR, f"{key!r} is a checkpoint or a prefix, not a document")
        version = version_of(data)
        self._objects[key] = Blob(data, version, self._clock(), self._serial + 1)
        self._bump(key)
        return version

    def _check_target(self, target: str, overwrite: bool) -> None:
        if not target or target in self._objects:
            raise CheckpointExistsError(f"{target!r} exists and is not a checkpoint")
        if target in self._checkpoints:
            if not overwrite:
                raise CheckpointExistsError(
                    f"{target} is already a checkpoint; pass overwrite=True to replace it"
                )
        elif self._has_children(target):
            raise CheckpointExistsError(f"{target} holds other keys and is not a checkpoint; not touching it")

    def _publish(self, target: str, files: dict[str, bytes], *, overwrite: bool) -> None:
        """The commit point: the whole checkpoint replaces whatever was under ``target`` at once."""
        with self._cond:
            self._check_target(target, overwrite)
            for key in [k for k in self._objects if rel_key(k, target)]:
                del self._objects[key]  # extra keys of the replaced checkpoint go with it
            self._checkpoints[target] = CheckpointObject(files, self._clock())
            self._bump(target)

    def join(self, prefix: str, *names: str) -> str:
        return norm_key("/".join((prefix, *names)))
