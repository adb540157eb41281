"""Exceptions that survive DCP's collectives.

DCP carries a rank's failure to the others by pickling it (the coordinator broadcasts what its
``finish`` or ``read_metadata`` raised; every rank's ``write_data``/``read_data`` failure is gathered
to the coordinator). Some of ckptvault's errors take keyword or reordered constructor arguments
(``UnsupportedStateError(path, message)``, ``CorruptCheckpointError(message, path=...)``), which
pickle's default ``args`` replay cannot rebuild: the receiving rank then fails inside
``broadcast_object_list`` with a ``TypeError`` about ``__init__`` instead of the real error.
"""

from __future__ import annotations

from ..errors import CheckpointError


def portable(exc: BaseException) -> BaseException:
    """``exc`` itself when it can be rebuilt from what it reduces to (what unpickling it on the
    receiving rank will do), else a :class:`CheckpointError` that carries its type and message (the
    caller raises it ``from exc``, so this rank keeps the original). Checked by calling the
    rebuild, not by a pickle round trip: nothing here unpickles."""
    try:
        reduced = exc.__reduce__()
        if isinstance(reduced, tuple):  # (callable, args, ...); a str names a global: nothing to rebuild
            reduced[0](*reduced[1])
    except Exception:
        return CheckpointError(f"{type(exc).__name__}: {exc}")
    return exc
