"""L3: the run's single-writer lease as the manager holds it.

Why a keeper: on an object store the lease lapses unless renewed (its expiry is what lets a job
restarted elsewhere take a dead writer's run over), and saves may be hours apart. Renewing only
before a save would let the lease lapse between saves while the loop is alive, and a second
writer could take the run in that gap. So the lease is renewed before every write, and at any step
once a third of its time-to-live has passed since the last renewal -- a monotonic clock read per
step, a request only every ~100 s. On local disk the lease is a record lock that lives as long as
the process; renewing it costs nothing.
"""

from __future__ import annotations

import time

from ..engine.rundir import RunDirectory
from ..errors import ConcurrentWriteError
from ..storage.base import Lease

TTL_SECONDS = 300.0


class RunLease:
    """Acquires the run's lease (a second writer gets ConcurrentWriteError naming the holder) and
    keeps it (see the module docstring)."""

    def __init__(self, run: RunDirectory, label: object, ttl_seconds: float = TTL_SECONDS) -> None:
        try:
            self.lease: Lease = run.acquire(ttl_seconds=ttl_seconds)
        except ConcurrentWriteError as exc:
            raise ConcurrentWriteError(
                exc.errno or 0,
                f"{label} already has a writer ({exc.strerror}); one manager per run directory",
            ) from None
        self._every = ttl_seconds / 3
        self._due = time.monotonic() + self._every

    def renew(self) -> None:
        """Before a write: ConcurrentWriteError if the lease was lost (expired and taken)."""
        self.lease.renew()
        self._due = time.monotonic() + self._every

    def keep_alive(self) -> None:
        if time.monotonic() >= self._due:
            self.renew()

    def release(self) -> None:
        self.lease.release()
