"""L3: preemption signals -- a flag set by SIGTERM/SIGUSR1, read by the training loop.

A signal handler may run between any two bytecodes of the loop, in the middle of a save; so the
handler only sets a flag, and the manager's next ``step`` commits the preemption checkpoint outside
it. Handlers can only be installed from the main thread; the previous ones are restored on close.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import warnings
from types import FrameType
from typing import Any

SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)
"""The preemption signals a manager handles by default (schedulers send SIGTERM; SLURM can send
SIGUSR1 ahead of the time limit)."""


class Preemption:
    """The preemption flag and the signal handlers that set it."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self, signals: tuple[int, ...]) -> None:
        if threading.current_thread() is not threading.main_thread():
            if signals:
                warnings.warn(
                    "CheckpointManager created off the main thread: preemption signals not handled",
                    stacklevel=4,
                )
            return
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._flag.set()  # only a flag: the save happens at the next step, outside the handler

    def take(self) -> bool:
        """Whether a preemption signal arrived since the last call (the flag is cleared)."""
        if not self._flag.is_set():
            return False
        self._flag.clear()
        return True

    def restore(self) -> None:
        """Puts back the handlers that were installed before ours."""
        for signum, handler in self._previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, handler)
        self._previous = {}
