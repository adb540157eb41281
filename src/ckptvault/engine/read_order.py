"""The order a whole load reads tensors in, when a checkpoint has at least as many data files as
reading threads.

Why: each thread then reads whole files front to back -- a sequential scan per file, which an object
store's read-ahead (storage/s3_blocks.py) turns into a few large requests, with several files in
flight at once -- instead of all threads crowding into one file (whose requests they would wait
for in series) and thrashing the read-ahead of the others. On local disk it is as fast as any order.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..types import TensorEntry


def file_groups(tensors: Mapping[str, TensorEntry], names: list[str]) -> list[list[str]]:
    """The tensors grouped by data file in file order, biggest file first; each chunked tensor
    (read from the chunk store, not a file) a group of its own."""
    groups: dict[str, list[str]] = {}
    for name in names:
        entry = tensors[name]
        groups.setdefault(entry.file if entry.chunks is None else f"\0{name}", []).append(name)
    ordered = [
        sorted(g, key=lambda n: tensors[n].offsets[0] if tensors[n].chunks is None else 0)
        for g in groups.values()
    ]
    return sorted(ordered, key=lambda g: -sum(tensors[n].nbytes for n in g))
