"""The storage contract, part 3: a run's content-addressed chunk store (``Storage.chunk_store``)."""

from __future__ import annotations

import hashlib
import threading

import pytest

from ckptvault.errors import CorruptCheckpointError, UnsafeCheckpointError
from ckptvault.storage.base import ChunkBackend

from .conftest import Backend


def chunk(seed: int, size: int = 1000) -> tuple[str, bytes]:
    data = hashlib.shake_256(b"chunk %d" % seed).digest(size)
    return hashlib.sha256(data).hexdigest(), data


def put(store: ChunkBackend, seed: int, size: int = 1000) -> tuple[str, bytes]:
    digest, data = chunk(seed, size)
    with store.locked(exclusive=False):
        assert store.put(digest, "raw", data) == len(data)
        store.sync()
    return digest, data


def test_put_then_find_has_read(backend: Backend) -> None:
    store = backend.storage.chunk_store(backend.key("run", "step-1"))
    digest, data = chunk(1)
    assert store.find(digest, len(data)) is None
    assert not store.has(digest, "raw", len(data))
    with pytest.raises(CorruptCheckpointError) as missing:
        store.read(digest, "raw", len(data), where="run/step-1", tensor="w")
    assert missing.value.kind == "missing-chunk"
    assert missing.value.tensor == "w"
    put(store, 1)
    assert store.find(digest, len(data)) == ("raw", len(data))
    assert store.find(digest, len(data) + 1) is None  # a raw chunk of another length is not this one
    assert store.has(digest, "raw", len(data))
    assert not store.has(digest, "raw", len(data) - 1)
    assert not store.has(digest, "zstd", len(data))
    got = store.read(digest, "raw", len(data))
    assert isinstance(got, bytearray)
    assert got == data
    with pytest.raises(CorruptCheckpointError):
        store.read(digest, "raw", len(data) + 1)  # the manifest promises more than is stored


def test_put_accepts_a_memoryview_and_is_idempotent(backend: Backend) -> None:
    store = backend.storage.chunk_store(backend.key("run", "step-1"))
    digest, data = chunk(2)
    with store.locked(exclusive=False):
        assert store.put(digest, "raw", memoryview(data)) == len(data)
        assert store.put(digest, "raw", data) == len(data)  # the same bytes again: harmless
        store.sync()
    assert store.read(digest, "raw", len(data)) == data


def test_checkpoints_of_one_run_share_a_store(backend: Backend) -> None:
    s = backend.storage
    digest, data = put(s.chunk_store(backend.key("run-a", "step-1")), 3)
    assert s.chunk_store(backend.key("run-a", "step-2")).has(digest, "raw", len(data))
    assert not s.chunk_store(backend.key("run-b", "step-1")).has(digest, "raw", len(data))
    names = {e.name: e.kind for e in s.list(backend.key("run-a"))}
    assert names == {".ckptvault-store": "directory"}  # hidden names are listed too


def test_report_bad_hides_the_copy_until_it_is_put_again(backend: Backend) -> None:
    store = backend.storage.chunk_store(backend.key("run", "step-1"))
    digest, data = put(store, 4)
    store.report_bad(digest, "raw")
    assert store.find(digest, len(data)) is None
    assert not store.has(digest, "raw", len(data))
    put(store, 4)  # a fresh copy replaces the damaged one
    assert store.find(digest, len(data)) == ("raw", len(data))
    assert store.has(digest, "raw", len(data))


def test_unsafe_chunk_names_are_refused(backend: Backend) -> None:
    store = backend.storage.chunk_store(backend.key("run", "step-1"))
    digest, data = chunk(5)
    for bad_digest, codec in (("../" + digest[3:], "raw"), (digest.upper(), "raw"), (digest, "exe")):
        with pytest.raises(UnsafeCheckpointError):
            store.put(bad_digest, codec, data)
        with pytest.raises(UnsafeCheckpointError):
            store.read(bad_digest, codec, len(data))


def test_sweep_deletes_what_is_not_live(backend: Backend) -> None:
    store = backend.storage.chunk_store(backend.key("run", "step-1"))
    kept = [put(store, i) for i in range(3)]
    dropped = [put(store, i, size=100 + i) for i in range(10, 14)]
    live = {digest for digest, _ in kept}
    with store.locked(exclusive=True):
        dry = store.sweep(live, dry_run=True)
    assert (dry.live_chunks, dry.deleted_chunks) == (3, 4)
    assert dry.freed_bytes == sum(len(data) for _, data in dropped)
    assert all(store.has(d, "raw", len(data)) for d, data in dropped)  # a dry run deletes nothing
    with store.locked(exclusive=True):
        report = store.sweep(live)
    assert (report.live_chunks, report.deleted_chunks, report.freed_bytes) == (3, 4, dry.freed_bytes)
    for digest, data in kept:
        assert store.read(digest, "raw", len(data)) == data
    for digest, data in dropped:
        assert not store.has(digest, "raw", len(data))
        assert store.find(digest, len(data)) is None
    with store.locked(exclusive=True):
        again = store.sweep(live)
    assert (again.live_chunks, again.deleted_chunks, again.freed_bytes) == (3, 0, 0)


def test_sweep_of_an_empty_store(backend: Backend) -> None:
    store = backend.storage.chunk_store(backend.key("run", "step-1"))
    with store.locked(exclusive=True):
        report = store.sweep(set())
    assert (report.live_chunks, report.deleted_chunks, report.freed_bytes) == (0, 0, 0)


def test_exclusive_lock_waits_for_shared_holders(backend: Backend) -> None:
    store = backend.storage.chunk_store(backend.key("run", "step-1"))
    order: list[str] = []
    holding = threading.Event()
    release = threading.Event()

    def saver() -> None:
        with store.locked(exclusive=False):
            order.append("shared in")
            holding.set()
            release.wait(10)
            order.append("shared out")

    thread = threading.Thread(target=saver)
    thread.start()
    assert holding.wait(10)
    sweeper = threading.Thread(target=lambda: _exclusive(store, order))
    sweeper.start()
    sweeper.join(0.2)  # the sweep must still be waiting: we have not let the saver go
    assert order == ["shared in"]
    release.set()
    thread.join(10)
    sweeper.join(10)
    assert order == ["shared in", "shared out", "exclusive in"]


def _exclusive(store: ChunkBackend, order: list[str]) -> None:
    with store.locked(exclusive=True):
        order.append("exclusive in")
