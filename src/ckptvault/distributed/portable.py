"""Exceptions that survive DCP's collectives.

DCP carries a rank's failure to the others by pickling it (the coordinator broadcasts what its
``finish`` or ``read_metadata`` raised; every rank's ``write_data``/``read_data`` failure is gathered
to the coordinator). Some of ckptvault's errors take keyword or reordered constructor arguments
(``UnsupportedStateError(path, message)``, ``CorruptCheckpointError(message, path=...)``), which
pickle's default ``args`` replay cannot rebuild: the receiving rank then fails inside
``broadcast_object_list`` with a ``TypeError`` about ``__init__`` instead of the real error.
"""

from __future__ import annotations

import pickle

from ..errors import CheckpointError


def portable(exc: BaseException) -> BaseException:
    """``exc`` itself when it pickles and unpickles, else a :class:`CheckpointError` that carries
    its type and message (the caller raises it ``from exc``, so this rank keeps the original)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return CheckpointError(f"{type(exc).__name__}: {exc}")
    return exc
