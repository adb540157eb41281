"""L1: where bytes live, and the only code that touches them. Everything above talks to the
:class:`Storage` protocol (``base``); ``local`` is the local-disk backend, ``memory`` an in-memory
one (a test double with object-store semantics); ``resolve`` maps a location to its backend."""

from .base import ReadHandle, Storage, WritableFile, WriteTransaction
from .local import LocalStorage
from .memory import MemoryStorage
from .resolve import storage_for

__all__ = [
    "LocalStorage",
    "MemoryStorage",
    "ReadHandle",
    "Storage",
    "WritableFile",
    "WriteTransaction",
    "storage_for",
]
