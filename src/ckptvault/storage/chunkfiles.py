"""Byte-level helpers of the chunk store: the ``O_DIRECT`` write path and the frame-header check
dedup uses to tell a whole compressed chunk from a torn one (format §11.3)."""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

from .safeopen import open_file

# Chunks are written with O_DIRECT (as data files are, storage/local_write.py): buffered writes cost this
# kind of machine more kernel CPU than the hashing of the same bytes. O_DIRECT needs aligned memory,
# so each writer thread copies through its own page-aligned bounce buffer (a 4 MiB memcpy is a small
# fraction of writing 4 MiB).
_DIRECT_ALIGN = 4096
DIRECT_MIN = 256 * 1024
_bounce = threading.local()


def write_direct(fd: int, view: memoryview) -> None:
    """Writes ``view`` to an ``O_DIRECT`` descriptor through this thread's aligned bounce buffer,
    padding the tail and truncating the file back to the true length."""
    padded = -(-len(view) // _DIRECT_ALIGN) * _DIRECT_ALIGN
    buffer = getattr(_bounce, "buffer", None)
    if buffer is None or len(buffer) < padded:
        buffer = _bounce.buffer = mmap.mmap(-1, max(padded, 4 * 1024 * 1024))
    buffer[: len(view)] = view
    buffer[len(view) : padded] = bytes(padded - len(view))
    out = memoryview(buffer)[:padded]
    try:
        written = 0
        while written < padded:
            written += os.write(fd, out[written:])
    finally:
        out.release()
    if padded != len(view):
        os.ftruncate(fd, len(view))


def frame_size(path: Path, raw_len: int) -> int | None:
    """The file size a compressed chunk's frame header promises (format §11.3); None if unreadable
    (a symlink or FIFO swapped in after the caller's lstat included: never followed, never waited on)."""
    try:
        fd = open_file(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        head = os.pread(fd, FRAME_HEAD_BYTES, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return frame_size_of(head, raw_len)


FRAME_HEAD_BYTES = 16 + 8 * 9  # the longest frame header: 16 bytes and a table of up to 8 planes


def frame_size_of(head: bytes, raw_len: int) -> int | None:
    """The size the frame header at the start of ``head`` promises; None if it is malformed (one
    parser for every backend: the local store reads the head from a file, others from memory)."""
    if len(head) < 16 or head[:4] != b"CKVC" or int.from_bytes(head[8:16], "little") != raw_len:
        return None
    nplanes = head[6]
    table_end = 16 + 9 * nplanes
    if nplanes not in (1, 2, 4, 8) or len(head) < table_end:
        return None
    stored = sum(int.from_bytes(head[16 + 9 * i + 1 : 16 + 9 * i + 9], "little") for i in range(nplanes))
    return table_end + stored
