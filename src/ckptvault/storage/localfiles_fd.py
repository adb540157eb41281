"""L1: descriptors -- pipes and files -- for the modules above storage that talk to a child process.

The validation server and its forked children exchange results over pipes and redirect stdout;
those are not storage, but they are ``os`` descriptor operations, and issue 14 keeps every ``os``
file operation inside ``storage/`` so that the layering test can hold the line with no exceptions.
These wrappers add nothing but the loops a caller would otherwise write (a short write is retried).
"""

from __future__ import annotations

import os
from typing import TextIO

__all__ = ["close_fd", "line_writer_on_copy", "read_some", "write_all"]


def read_some(fd: int, limit: int = 1 << 16) -> bytes:
    """Up to ``limit`` bytes from ``fd`` (blocking until some arrive); ``b""`` at end of file."""
    return os.read(fd, limit)


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``: a pipe may take fewer bytes than offered, so write until done."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def close_fd(fd: int) -> None:
    """Closes ``fd`` (the caller's own descriptor, e.g. the unused end of a pipe)."""
    os.close(fd)


def line_writer_on_copy(fd: int) -> TextIO:
    """A line-buffered text writer on a duplicate of ``fd``: it keeps writing where ``fd`` pointed
    even after ``fd`` itself is redirected (``dup2``) elsewhere."""
    return os.fdopen(os.dup(fd), "w", buffering=1)
