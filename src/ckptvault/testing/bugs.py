"""Fault injection for tests (ours and our users'): prove that the safety nets catch what they claim.

``serialization_bug`` makes the writer store wrong bytes for one tensor while every digest stays
consistent with what is written: the failure a bug in a serializer produces. Checksums and
read-back cannot see it; only ``"full"`` validation (rebuild the model, compare its output with the
in-memory model's) can. Not for production use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ..engine import writer
from ..engine.arrays import Blob
from ..format.dtypes import SAFETENSORS_ITEMSIZE


@contextmanager
def serialization_bug(tensor: str, *, xor: int = 1) -> Iterator[list[str]]:
    """While active, every save stores the first tensor whose name contains ``tensor`` with the
    most significant byte of every element XOR-ed with ``xor`` (for floats: the exponent, so every
    value is scaled; flipping one low bit of one element could leave a model's output unchanged).
    The live state is not touched. Yields the names corrupted."""
    corrupted: list[str] = []

    def corrupt(blob: Blob) -> Blob:
        data = np.frombuffer(blob.data, dtype=np.uint8).copy()
        itemsize = SAFETENSORS_ITEMSIZE[blob.dtype]
        if data.size:
            data.reshape(-1, itemsize)[:, itemsize - 1] ^= xor
        corrupted.append(blob.name)
        return dataclasses.replace(blob, data=memoryview(data.data), owner=data)

    def hook(plan: writer.SavePlan) -> writer.SavePlan:
        done = False
        shards = []
        for shard in plan.shards:
            new_shard = []
            for blob in shard:
                if not done and tensor in blob.name:
                    blob, done = corrupt(blob), True
                new_shard.append(blob)
            shards.append(new_shard)
        chunked = []
        for item in plan.chunked:
            if not done and item.reuse is None and tensor in item.blob.name:
                item, done = dataclasses.replace(item, blob=corrupt(item.blob)), True
            chunked.append(item)
        return dataclasses.replace(plan, shards=shards, chunked=chunked)

    previous = writer.serialization_hook
    writer.serialization_hook = hook
    try:
        yield corrupted
    finally:
        writer.serialization_hook = previous
