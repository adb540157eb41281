"""L1: where bytes live. The engine talks to the :class:`Storage` protocol only; ``local`` is the
local-disk backend (object stores come later behind the same protocol)."""

from .base import ReadHandle, Storage, WritableFile, WriteTransaction
from .local import LocalStorage
from .resolve import storage_for

__all__ = ["LocalStorage", "ReadHandle", "Storage", "WritableFile", "WriteTransaction", "storage_for"]
