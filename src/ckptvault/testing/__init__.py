"""Tools to prove that the safety nets catch what they claim (ours, and our users' in their own CI).

* :func:`serialization_bug` -- a writer that stores one tensor wrong with consistent digests (only
  ``"full"`` validation sees it);
* :class:`FaultInjector` -- fail, tear or delay the Nth file operation of any write path;
* :mod:`ckptvault.testing.crashsim` -- the states a power cut could leave, replayed from a log;
* :mod:`ckptvault.testing.invariants` -- the promises to check after any of them.

Not for production use: each of these patches the library or the ``os`` module while active.
"""

from __future__ import annotations

from .bugs import serialization_bug
from .faults import ALL_KINDS, READ_KINDS, WRITE_KINDS, FaultInjector, InjectedFault, Op

__all__ = [
    "ALL_KINDS",
    "READ_KINDS",
    "WRITE_KINDS",
    "FaultInjector",
    "InjectedFault",
    "Op",
    "serialization_bug",
]
