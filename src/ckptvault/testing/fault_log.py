"""The operation log and counter under :class:`~ckptvault.testing.faults.FaultInjector`.

Why apart from the injector: what a file operation *is* (:class:`Op`, the kinds, the fault it is
failed with) and how an injector counts them and decides which to fail is shared by the patched
functions (:mod:`ckptvault.testing.fault_doors`), the injector's install/uninstall
(:mod:`ckptvault.testing.faults`) and the crash replay (:mod:`ckptvault.testing.crashsim`, which
reads :class:`Op` logs) -- none of which need each other's code to know it.
"""

from __future__ import annotations

import dataclasses
import errno as errno_codes
import os
import threading
import time
from collections.abc import Iterable
from typing import Any, Literal

WRITE_KINDS = frozenset(
    {"open", "write", "fsync", "truncate", "rename", "unlink", "rmdir", "mkdir", "sqlite"}
)
READ_KINDS = frozenset({"read"})
ALL_KINDS = WRITE_KINDS | READ_KINDS

Action = Literal["error", "torn", "delay"]

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class InjectedFault(OSError):
    """The failure an injector made up; an ``OSError``, so the code under test handles it as the
    real one (``errno`` set), while a test can still tell it apart from a genuine failure."""


@dataclasses.dataclass(frozen=True)
class Op:
    """One file operation as it happened (recorded after it succeeded, or when it was faulted).

    ``path`` is absolute; ``dest`` the new name of a rename (``exchange`` swaps ``path`` and
    ``dest``); ``offset``/``data`` the position and bytes of a write, ``size`` the length of a
    truncate; ``flags`` of an open. ``faulted`` marks the operation the injector failed (a torn
    write is recorded with the half that reached the file).
    """

    index: int
    kind: str
    path: str
    dest: str = ""
    offset: int = -1
    data: bytes | None = None
    size: int = -1
    flags: int = 0
    is_dir: bool = False
    faulted: bool = False


class OpCounter:
    """Counts the file operations under ``root``, decides which to fault and keeps the log.

    The state and decisions of a :class:`~ckptvault.testing.faults.FaultInjector` (see there for
    the arguments); it patches nothing itself.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fail_at: int | None = None,
        persistent: bool = False,
        action: Action = "error",
        errno: int = errno_codes.EIO,
        delay_s: float = 0.05,
        kinds: Iterable[str] = WRITE_KINDS,
        record: bool = False,
    ) -> None:
        if fail_at is not None and fail_at < 1:
            raise ValueError("fail_at counts from 1")
        self.root = os.path.realpath(root)
        self.fail_at = fail_at
        self.persistent = persistent
        self.action = action
        self.errno = errno
        self.delay_s = delay_s
        self.kinds = frozenset(kinds)
        unknown = self.kinds - ALL_KINDS
        if unknown:
            raise ValueError(f"unknown operation kinds {sorted(unknown)}")
        self.record = record
        self.count = 0
        self.fired = 0
        self.log: list[Op] = []
        self._lock = threading.RLock()
        self._fds: dict[int, str] = {}
        self._local = threading.local()
        self._saved: dict[tuple[Any, str], Any] = {}

    # -- decisions ------------------------------------------------------------------------------
    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def _quiet(self) -> bool:
        """True inside an operation we already counted as one (rmtree's inner unlinks)."""
        return bool(getattr(self._local, "depth", 0))

    def _decide(self, kind: str, path: str) -> tuple[int, bool]:
        """The operation's number (0: not counted) and whether to fault it."""
        if kind not in self.kinds or self._quiet() or not self._inside(path):
            return 0, False
        with self._lock:
            self.count += 1
            n = self.count
            fire = self.fail_at is not None and (n == self.fail_at or (self.persistent and n > self.fail_at))
            if fire and self.action != "delay":
                self.fired += 1
        if fire and self.action == "delay":
            time.sleep(self.delay_s)
            return n, False
        return n, fire

    def _fault(self, kind: str, path: str, n: int) -> InjectedFault:
        return InjectedFault(self.errno, f"injected fault at {kind} #{n}: {os.strerror(self.errno)}", path)

    def _log(self, op: Op) -> None:
        with self._lock:
            self.log.append(op)

    def _resolve(self, path: Any, dir_fd: int | None = None) -> str:
        if isinstance(path, int):
            return self._fds.get(path, "")
        text = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(text):
            base = self._fds.get(dir_fd, "")
            return os.path.normpath(os.path.join(base, text)) if base else ""
        return os.path.abspath(text)

    def kinds_seen(self) -> list[str]:
        """The kinds of the counted operations in order (needs ``record``; for messages)."""
        return [op.kind for op in self.log]

    def _orig(self, owner: Any, name: str) -> Any:
        return self._saved[(owner, name)]
