"""The states a power cut could leave a directory in, replayed from a recorded operation log.

A process kill loses nothing the kernel accepted; a power cut (or a kernel panic, or a VM killed
by its host) loses everything the disk had not made durable. What that is depends on the file
system; the model here is the one a careful program must assume on a journaling POSIX file
system (ext4, XFS in their default modes), made strict where the standard is vague:

* **File data** reaches the disk only through ``fsync`` of that file: a crash keeps, for every
  file, exactly the bytes it had at its last ``fsync`` (a file never synced is empty). Un-synced
  writes are dropped whole; that is the worst case of "any subset".
* **Directory entries** (create, mkdir, rename, unlink, rmdir, the overwrite's exchange) reach
  the disk in the order they were made (the journal commits them in order) and at the latest by
  the next ``fsync`` of a directory, which forces every earlier one. So a crash after operation
  ``k`` keeps a prefix ``m`` of the metadata operations with ``barrier(k) <= m <= k``, where
  ``barrier(k)`` is the end of the last directory ``fsync`` before ``k``.

``crash_states(log, k)`` gives the extreme prefixes (``m = barrier``: every un-synced entry
dropped; ``m = k``: every entry kept while un-synced data is still dropped -- the state that
catches a rename published before its file's data was synced), ``every_m=True`` all of them.
:func:`materialize` writes one state out as a real directory for the library to open.

Why hand-written: no library replays an fsync-ordering model over a Python operation log (the
research tools -- ALICE, CrashMonkey -- trace system calls of a whole process and need a kernel
module or a block-device recorder).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from .faults import Op

METADATA_KINDS = frozenset({"mkdir", "create", "rename", "exchange", "unlink", "rmdir", "rmtree"})


@dataclasses.dataclass
class _Node:
    is_dir: bool
    data: bytearray = dataclasses.field(default_factory=bytearray)
    synced: bytes = b""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The directory tree before the recorded operations (taken as durable)."""

    root: str
    dirs: tuple[str, ...]
    files: dict[str, bytes]

    @classmethod
    def take(cls, root: str | os.PathLike[str]) -> Snapshot:
        base = os.path.realpath(root)
        dirs: list[str] = []
        files: dict[str, bytes] = {}
        for current, _dirnames, filenames in os.walk(base):
            rel = os.path.relpath(current, base)
            if rel != ".":
                dirs.append(rel)
            for name in filenames:
                path = os.path.join(current, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                with open(path, "rb") as handle:
                    files[os.path.normpath(os.path.join(rel, name))] = handle.read()
        return cls(base, tuple(sorted(dirs)), files)


@dataclasses.dataclass(frozen=True)
class CrashState:
    """One possible on-disk state: the crash came after ``ops`` operations, ``metadata`` of
    which had reached the disk (an operation index, like ``ops``)."""

    ops: int
    metadata: int
    tree: dict[str, bytes | None]  # relative path -> file bytes, None for a directory

    def describe(self, log: Sequence[Op]) -> str:
        last = log[self.ops - 1] if self.ops else None
        what = f"after op {self.ops} ({last.kind} {last.path})" if last else "before the first op"
        return f"crash {what}, metadata through op {self.metadata}"


class _Replay:
    """Applies a log to the snapshot, tracking for every node its current and its synced bytes."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.root = snapshot.root
        self.nodes: list[_Node] = []
        self.names: dict[str, int] = {}  # the namespace as the running program saw it
        self.opened: dict[str, int] = {}  # path at open time -> node (writes/fsyncs use it)
        for rel in snapshot.dirs:
            self.names[rel] = self._new(_Node(True))
        for rel, data in snapshot.files.items():
            self.names[rel] = self._new(_Node(False, bytearray(data), bytes(data)))
        self.metadata: list[tuple[str, str, str, int]] = []  # (kind, rel, dest, node) per op index

    def _new(self, node: _Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def node_of(self, path: str) -> _Node | None:
        rel = self.rel(path)
        index = self.opened.get(rel, self.names.get(rel))
        return None if index is None else self.nodes[index]

    def apply(self, op: Op) -> tuple[str, str, str, int] | None:
        """Applies one operation; returns its metadata effect (None for data operations)."""
        rel = self.rel(op.path) if op.path else ""
        if op.kind == "open":
            existing = self.names.get(rel)
            if existing is None:
                if not op.flags & os.O_CREAT:
                    return None
                index = self._new(_Node(bool(op.is_dir)))
                self.names[rel] = index
                self.opened[rel] = index
                return ("create", rel, "", index)
            self.opened[rel] = existing
            if op.flags & os.O_TRUNC:
                self.nodes[existing].data = bytearray()
            return None
        if op.kind == "mkdir":
            index = self._new(_Node(True))
            self.names[rel] = index
            return ("mkdir", rel, "", index)
        if op.kind == "write":
            node = self.node_of(op.path)
            if node is not None and op.data is not None:
                end = op.offset + len(op.data)
                if len(node.data) < end:
                    node.data.extend(b"\0" * (end - len(node.data)))
                node.data[op.offset : end] = op.data
            return None
        if op.kind == "truncate":
            node = self.node_of(op.path)
            if node is not None:
                del node.data[op.size :]
                node.data.extend(b"\0" * (op.size - len(node.data)))
            return None
        if op.kind == "fsync":
            node = self.node_of(op.path)
            if node is not None and not node.is_dir:
                node.synced = bytes(node.data)
            return ("dirsync", rel, "", -1) if op.is_dir else None
        dest = self.rel(op.dest) if op.dest else ""
        if op.kind in ("rename", "exchange", "unlink", "rmdir", "rmtree"):
            _move_names(self.names, op.kind, rel, dest)
            return (op.kind, rel, dest, -1)
        raise ValueError(f"unknown operation kind {op.kind!r}")


def _move_names(names: dict[str, int], kind: str, rel: str, dest: str) -> None:
    """Applies a namespace operation to a path -> node map (children follow their directory)."""

    def subtree(top: str) -> list[str]:
        return [p for p in names if p == top or p.startswith(top + os.sep)]

    if kind in ("unlink", "rmdir", "rmtree"):
        for path in subtree(rel):
            del names[path]
    elif kind == "rename":
        moved = {dest + p[len(rel) :]: names.pop(p) for p in subtree(rel)}
        for path in subtree(dest):  # a rename replaces its target
            del names[path]
        names.update(moved)
    elif kind == "exchange":
        a = {p[len(rel) :]: names.pop(p) for p in subtree(rel)}
        b = {p[len(dest) :]: names.pop(p) for p in subtree(dest)}
        names.update({dest + p: i for p, i in a.items()})
        names.update({rel + p: i for p, i in b.items()})


def crash_states(
    snapshot: Snapshot, log: Sequence[Op], *, every_m: bool = False, prefixes: Sequence[int] | None = None
) -> Iterator[CrashState]:
    """Every crash state of the model for each prefix length in ``prefixes`` (default: 0..len)."""
    wanted = range(len(log) + 1) if prefixes is None else sorted(set(prefixes))
    replay = _Replay(snapshot)
    initial = dict(replay.names)
    effects: list[tuple[str, str, str, int] | None] = []
    barrier = 0
    done = 0
    for k in wanted:
        while done < k:
            effect = replay.apply(log[done])
            effects.append(effect)
            done += 1
            if effect is not None and effect[0] == "dirsync":
                barrier = done
        ms = range(barrier, k + 1) if every_m else sorted({barrier, k})
        for m in ms:
            names = dict(initial)
            for effect in effects[:m]:
                if effect is None or effect[0] == "dirsync":
                    continue
                kind, rel, dest, index = effect
                if kind in ("create", "mkdir"):
                    names[rel] = index
                else:
                    _move_names(names, kind, rel, dest)
            tree: dict[str, bytes | None] = {}
            for rel, index in names.items():
                node = replay.nodes[index]
                tree[rel] = None if node.is_dir else node.synced
            yield CrashState(k, m, _reachable(tree))


def _reachable(tree: dict[str, bytes | None]) -> dict[str, bytes | None]:
    """Drops entries whose parent directory is not in the state (an entry inside a directory
    whose own entry was not persisted is unreachable after the crash)."""
    out: dict[str, bytes | None] = {}
    for rel in sorted(tree, key=lambda p: p.count(os.sep)):
        parent = os.path.dirname(rel)
        if parent and out.get(parent, b"") is not None:  # parent missing or a file
            continue
        out[rel] = tree[rel]
    return out


def materialize(state: CrashState, dest: str | os.PathLike[str]) -> Path:
    """Writes ``state`` as a real directory tree at ``dest`` (replacing what is there)."""
    out = Path(dest)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for rel in sorted(state.tree, key=lambda p: p.count(os.sep)):
        data = state.tree[rel]
        path = out / rel
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
    return out
