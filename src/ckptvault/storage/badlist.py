"""The chunk store's list of chunks found bad, so that a save never references one again.

Dedup trusts a chunk file whose name and size are right without re-hashing it (re-hashing the
store on every incremental save would cost what incremental saves exist to avoid). A reader that
does hash a chunk and finds it bad (``load``/``verify``: digest mismatch, undecodable frame) appends
one line to ``RUN/.ckptvault-store/bad``::

    <digest>.<codec> <inode> <mtime_ns>

Chunk files are immutable and a save replaces one only by renaming a fresh file over it, so the
inode and modification time name the bad *file*, not the digest: while that file is still there,
the store's ``find``/``has`` treat it as absent and the next save writes a fresh copy (whose new
inode is trusted again). An entry whose file is gone or replaced is harmless and is dropped by
garbage collection. Appends of one short line (``O_APPEND``) need no lock; a lost or spurious entry
can only cost one rewrite of a chunk, never a reference to a bad one that was reported.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from .safeopen import append_text, open_file, read_file

BAD_LIST = "bad"
_MAX_BYTES = 4 * 1024 * 1024  # ~40,000 entries; garbage collection prunes stale ones
_NAME = re.compile(r"^([0-9a-f]{64})\.(raw|zstd|lz4)$")

Entry = tuple[str, int, int]  # (chunk file name, inode, mtime_ns)


def _parse(text: bytes) -> list[tuple[Entry, str]]:
    entries = []
    for line in text.decode("ascii", "replace").splitlines():
        fields = line.split()
        if len(fields) == 3 and _NAME.match(fields[0]) and fields[1].isdigit() and fields[2].isdigit():
            entries.append(((fields[0], int(fields[1]), int(fields[2])), line))
    return entries


class BadList:
    """The bad list of one store (``root`` is the store directory, already checked by the caller
    to be a real directory). Thread-safe enough: the set is read once and only ever grows."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / BAD_LIST
        self._entries: set[Entry] | None = None

    def _load(self) -> set[Entry]:
        if self._entries is None:
            try:
                text = read_file(self.path, cap=_MAX_BYTES)
            except FileNotFoundError:
                text = b""
            self._entries = {entry for entry, _ in _parse(text)}
        return self._entries

    def contains(self, name: str, st: os.stat_result) -> bool:
        """True when the file ``name`` (as ``lstat`` found it) was reported bad."""
        return (name, st.st_ino, st.st_mtime_ns) in self._load()

    def add(self, chunk: Path) -> None:
        """Lists the chunk file now at ``chunk``; OSError when the store is not writable."""
        st = os.stat(chunk, follow_symlinks=False)
        entry = (chunk.name, st.st_ino, st.st_mtime_ns)
        append_text(self.path, " ".join(map(str, entry)) + "\n", base=self.root.parent)
        self._load().add(entry)

    def prune(self, chunks: Path) -> None:
        """Drops entries whose file is gone or replaced; for the holder of the exclusive store lock."""
        try:
            text = read_file(self.path, cap=_MAX_BYTES)
        except FileNotFoundError:
            return
        keep = []
        entries = _parse(text)
        for (name, ino, mtime), line in entries:
            try:
                st = os.stat(chunks / name[:2] / name, follow_symlinks=False)
            except OSError:
                continue
            if (st.st_ino, st.st_mtime_ns) == (ino, mtime):
                keep.append(line + "\n")
        if len(keep) == len(text.splitlines()):
            return
        temp = self.root / f".tmp-{secrets.token_hex(8)}"
        fd = open_file(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(fd, "".join(keep).encode("ascii"))
        finally:
            os.close(fd)
        os.replace(temp, self.path)
        self._entries = None
