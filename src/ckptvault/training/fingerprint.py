"""Data versions: a content fingerprint of files and directories, cheap to recompute.

A run records which data it trained on as ``fingerprint(paths)``. The fingerprint depends only on
what a reader of the data would see: each file's path *relative to the root it was found under*, its
size and its content digest, plus symlinks (by their target text) and empty directories. Absolute
paths are left out, so the same data copied elsewhere has the same fingerprint; renaming or moving a
file inside a root changes it.

Record format (version 1), hashed with the chosen algorithm after the line
``ckptvault-fingerprint-v1``: for the i-th root, in the order given, a JSON line
``["root", i, kind]``, then for a directory one JSON line per entry in sorted, depth-first order:
``["file", rel, size, digest]``, ``["dir", rel]``, ``["link", rel, target]`` or
``["other", rel, type]`` (fifos, sockets, devices: never opened, a fifo would block). ``rel`` uses
``/`` separators; a root that is a file is recorded with ``rel == ""``, so its own name does not count.
JSON escaping keeps any file name (newlines, undecodable bytes) unambiguous.

Symlinks inside a directory are never followed: the link's target *text* is hashed, so a link
pointing outside the tree cannot pull foreign data in, and a cycle cannot hang the walk. A root the
caller names is followed if it is a link, because naming it means "this data".

Cache: re-hashing a large dataset at every run start would cost minutes, so each file's content
digest is remembered under (algorithm, absolute path, size, mtime_ns, ctime_ns, inode, device) in a
small JSON file. ``ctime`` is in the key because no user-level call can set it: an edit followed by
``touch -d`` to restore the old mtime still changes ctime and is detected. What is *not* detected
with ``cache=True``: an edit that keeps size, mtime_ns, ctime_ns, inode and device (a changed system
clock, raw writes to the block device). ``cache=False`` always hashes every byte. A file whose
timestamps are within :data:`RACY_WINDOW_NS` of the moment it was hashed is not cached, since a
second same-size write inside one timestamp tick would otherwise be invisible (the "racy git"
problem; some file systems keep only 1–2 s resolution).

The cache lives in ``$CKPTVAULT_CACHE_DIR/fingerprints.json`` (else ``$XDG_CACHE_HOME/ckptvault``,
else ``~/.cache/ckptvault``). It is written atomically (temp file + rename, no fsync: losing it only
costs time), ignored and rebuilt when unreadable or corrupt, and bounded to
:data:`MAX_CACHE_ENTRIES` entries (least recently used dropped first). Concurrent processes do not
corrupt it; the last writer wins and the others' new entries are simply re-hashed next time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..config import DIGEST_ALGORITHMS
from ..errors import CheckpointError
from ..format.digest import new_hasher
from ..storage.atomic_file import write_atomically
from ..storage.localfiles import read_blocks, read_link, stat_path, walk_sorted

__all__ = ["MAX_CACHE_ENTRIES", "RACY_WINDOW_NS", "cache_path", "fingerprint"]

PathLike = str | os.PathLike[str]

MAX_CACHE_ENTRIES = 100_000
RACY_WINDOW_NS = 2_000_000_000
_CACHE_VERSION = 1
_CACHE_FILE = "fingerprints.json"
_READ_CHUNK = 8 * 1024 * 1024
_HASH_ATTEMPTS = 3
_REFRESH_AFTER_S = 24 * 3600  # a cache hit rewrites the file only when its entry is this stale


def cache_path() -> Path:
    """Where the digest cache lives; read from the environment at each call so tests can redirect it."""
    explicit = os.environ.get("CKPTVAULT_CACHE_DIR")
    if explicit:
        return Path(explicit) / _CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "ckptvault" / _CACHE_FILE


@dataclass(frozen=True)
class _FileKey:
    """Everything about a file that, unchanged, lets us trust a remembered digest."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> _FileKey:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


@dataclass
class _CacheEntry:
    key: _FileKey
    digest: str
    used_s: int  # last time a fingerprint used it, for LRU eviction


class _DigestCache:
    """The on-disk per-file digest cache; every failure to read or write it is silent by design."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, _CacheEntry] = {}
        self.changed = False
        self._load()

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return
        if not isinstance(raw, dict) or raw.get("version") != _CACHE_VERSION:
            return
        entries = raw.get("entries")
        if not isinstance(entries, dict):
            return
        for name, value in entries.items():
            # [size, mtime_ns, ctime_ns, inode, device, digest, used_s]; anything else is skipped.
            if (
                isinstance(value, list)
                and len(value) == 7
                and all(type(v) is int for v in value[:5])
                and isinstance(value[5], str)
                and type(value[6]) is int
            ):
                self.entries[name] = _CacheEntry(_FileKey(*value[:5]), value[5], value[6])

    def get(self, name: str, key: _FileKey, now_s: int) -> str | None:
        entry = self.entries.get(name)
        if entry is None or entry.key != key:
            return None
        if now_s - entry.used_s > _REFRESH_AFTER_S:
            entry.used_s = now_s
            self.changed = True
        return entry.digest

    def put(self, name: str, key: _FileKey, digest: str, now_s: int) -> None:
        self.entries[name] = _CacheEntry(key, digest, now_s)
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        if len(self.entries) > MAX_CACHE_ENTRIES:
            keep = sorted(self.entries.items(), key=lambda item: item[1].used_s, reverse=True)
            self.entries = dict(keep[:MAX_CACHE_ENTRIES])
        doc = {
            "version": _CACHE_VERSION,
            "entries": {
                name: [*dataclasses.astuple(e.key), e.digest, e.used_s] for name, e in self.entries.items()
            },
        }
        data = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic but not durable (no fsync): losing the cache only costs a re-hash. Private
            # (0600): it lists the absolute paths of the user's data files.
            write_atomically(self.path, data, "write the fingerprint cache", durable=False, private=True)
        except OSError:
            pass  # a read-only home or a full disk must not fail the run; we re-hash next time


def _hash_file(path: str, algorithm: str, size_hint: int) -> tuple[str, int]:
    """Digest of the file's bytes and how many there were. The only place file contents are read."""
    hasher = new_hasher(algorithm, size_hint=size_hint)
    buffer = bytearray(min(_READ_CHUNK, max(size_hint, 1)))
    view = memoryview(buffer)
    total = 0
    for block in read_blocks(path, view):
        hasher.update(block)
        total += len(block)
    return hasher.hexdigest(), total


@dataclass
class _Pending:
    """A regular file whose digest is still needed (not in the cache)."""

    path: str
    key: _FileKey
    digest: str = ""


def _digest_settled(item: _Pending, algorithm: str) -> tuple[_Pending, bool]:
    """Hash until the file is the same before and after reading; returns whether it may be cached.

    A file written while we read it would otherwise get a digest of no version that ever existed.
    """
    for _ in range(_HASH_ATTEMPTS):
        started_ns = time.time_ns()
        digest, nbytes = _hash_file(item.path, algorithm, item.key.size)
        after = _FileKey.of(stat_path(item.path, follow_symlinks=False))
        if after == item.key and nbytes == item.key.size:
            item.digest = digest
            racy = max(item.key.mtime_ns, item.key.ctime_ns) >= started_ns - RACY_WINDOW_NS
            return item, not racy
        item.key = after
    raise CheckpointError(f"fingerprint: {item.path!r} kept changing while it was being read")


def _other_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "char-device"),
        (stat.S_ISBLK, "block-device"),
    ):
        if test(mode):
            return name
    return "unknown"


def _as_list(paths: PathLike | Sequence[PathLike]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def fingerprint(
    paths: PathLike | Sequence[PathLike],
    *,
    algorithm: str = "blake3",
    cache: bool = True,
) -> str:
    """Content digest of files and directories (a data version): ``"<algorithm>:<hex>"``.

    ``paths`` is one path or a sequence; with several, their order is part of the fingerprint (a
    train/validation pair is not the same data as validation/train). See the module docstring for
    what is covered, how symlinks are treated and what the cache can miss; ``cache=False`` reads
    every byte and neither reads nor writes the cache. Missing paths raise :class:`FileNotFoundError`
    naming the path; unreadable files and directories raise their ``OSError``.
    """
    if algorithm not in DIGEST_ALGORITHMS:
        raise ValueError(f"unknown digest algorithm {algorithm!r}; known: {DIGEST_ALGORITHMS}")
    roots = _as_list(paths)
    if not roots:
        raise ValueError("fingerprint needs at least one path")

    # Pass 1: walk every root and build the records, leaving a slot for each content digest.
    records: list[list[object]] = []
    pending: list[tuple[list[object], _Pending]] = []
    for index, root in enumerate(roots):
        try:
            root_st = stat_path(root)  # the named root is followed, see the module docstring
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                exc.errno, f"fingerprint: no such file or directory: {root!r}", root
            ) from exc
        if stat.S_ISDIR(root_st.st_mode):
            records.append(["root", index, "dir"])
            for rel, full, st in walk_sorted(root):  # sorted, depth first, links not followed
                records.append(_record(rel, full, st, pending))
        else:
            records.append(["root", index, "file" if stat.S_ISREG(root_st.st_mode) else "other"])
            records.append(_record("", os.path.realpath(root), root_st, pending))

    _fill_digests(pending, algorithm, cache)

    hasher = new_hasher(algorithm)
    hasher.update(b"ckptvault-fingerprint-v1\n")
    for record in records:
        hasher.update(json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n")
    return f"{algorithm}:{hasher.hexdigest()}"


def _record(
    rel: str, full: str, st: os.stat_result, pending: list[tuple[list[object], _Pending]]
) -> list[object]:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        record: list[object] = ["file", rel, st.st_size, ""]
        pending.append((record, _Pending(os.path.abspath(full), _FileKey.of(st))))
        return record
    if stat.S_ISDIR(mode):
        return ["dir", rel]
    if stat.S_ISLNK(mode):
        return ["link", rel, read_link(full)]
    return ["other", rel, _other_kind(mode)]


def _fill_digests(pending: list[tuple[list[object], _Pending]], algorithm: str, use_cache: bool) -> None:
    """Put each file's content digest (and its size as read) into its record, from cache or by hashing."""
    store = _DigestCache(cache_path()) if use_cache else None
    now_s = int(time.time())
    misses: list[_Pending] = []
    for _, item in pending:
        hit = store.get(f"{algorithm}:{item.path}", item.key, now_s) if store is not None else None
        if hit is not None:
            item.digest = hit
        else:
            misses.append(item)

    # Many small files are bound by per-file latency, so a few threads help; blake3 and reads release
    # the GIL. One file needs no pool.
    workers = min(8, os.cpu_count() or 1, len(misses))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptvault-fp") as pool:
            results = list(pool.map(lambda item: _digest_settled(item, algorithm), misses))
    else:
        results = [_digest_settled(item, algorithm) for item in misses]
    if store is not None:
        for item, cacheable in results:
            if cacheable:
                store.put(f"{algorithm}:{item.path}", item.key, item.digest, now_s)
        store.save()

    for record, item in pending:
        record[2] = item.key.size
        record[3] = item.digest
