"""What MemoryStorage promises beyond the shared contract: strictness a test double should have, and
thread safety under its one lock."""

from __future__ import annotations

import hashlib
import threading

import pytest

from ckptvault.errors import CheckpointExistsError, DocumentConflictError, StorageError
from ckptvault.storage.memory import MemoryStorage

from .conftest import FakeClock

CAP = 1 << 20


def test_staging_is_private_and_an_abort_changes_nothing() -> None:
    s = MemoryStorage(clock=FakeClock())
    s.put("b/run/run.json", b"{}")
    token = s.change_token("b/run")
    txn = s.begin("b/run/step-1", overwrite=False)
    out = txn.create("a.bin")
    out.write(b"x")
    out.close()
    assert [e.name for e in s.list("b/run")] == ["run.json"]  # not even a directory shows
    txn.abort()
    assert s.change_token("b/run") == token
    assert s.change_token("b/run/step-1") is None


def test_commit_refuses_a_file_still_open() -> None:
    s = MemoryStorage()
    txn = s.begin("b/step-1", overwrite=False)
    txn.create("a.bin").write(b"never closed")
    with pytest.raises(StorageError, match="not closed"):
        txn.commit(b"{}")
    assert s.list("b") == []


def test_file_names_are_checked() -> None:
    txn = MemoryStorage().begin("b/step-1", overwrite=False)
    for bad in ("", "..", "sub/a.bin", "manifest.json"):
        with pytest.raises(StorageError):
            txn.create(bad)
    txn.create("a.bin").close()
    with pytest.raises(StorageError):
        txn.create("a.bin")


def test_keys_are_normalised_and_never_climb() -> None:
    s = MemoryStorage()
    assert s.join("b/", "/run", "x.json") == "b/run/x.json"
    s.put("b//run/./x.json", b"1")
    doc = s.get("b/run/x.json", max_bytes=CAP)
    assert doc is not None
    assert doc.data == b"1"
    with pytest.raises(StorageError):
        s.get("b/run/../../etc", max_bytes=CAP)


def test_a_checkpoint_target_that_holds_documents_is_refused() -> None:
    s = MemoryStorage()
    s.put("b/run/step-1/notes.txt", b"foreign")
    with pytest.raises(CheckpointExistsError):
        s.begin("b/run/step-1", overwrite=True)
    s.put("b/run/doc", b"x")
    with pytest.raises(CheckpointExistsError):
        s.begin("b/run/doc", overwrite=True)
    with pytest.raises(StorageError):
        s.put("b/run", b"a prefix is not a document")


def test_sweep_needs_the_exclusive_lock() -> None:
    store = MemoryStorage().chunk_store("b/run/step-1")
    with pytest.raises(StorageError, match="exclusive"):
        store.sweep(set())
    with store.locked(exclusive=False), pytest.raises(StorageError, match="exclusive"):
        store.sweep(set())


def test_append_wants_whole_lines() -> None:
    with pytest.raises(ValueError):
        MemoryStorage().append("b/events", b"no newline")


def test_concurrent_compare_and_swap_loses_no_update() -> None:
    s = MemoryStorage()
    s.put("b/counter", b"0")

    def increment(times: int) -> None:
        for _ in range(times):
            while True:
                doc = s.get("b/counter", max_bytes=CAP)
                assert doc is not None
                try:
                    s.put("b/counter", b"%d" % (int(doc.data) + 1), if_version=doc.version)
                    break
                except DocumentConflictError:
                    continue  # another thread won this round: read again

    threads = [threading.Thread(target=increment, args=(200,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    doc = s.get("b/counter", max_bytes=CAP)
    assert doc is not None
    assert int(doc.data) == 800


def test_concurrent_chunk_puts_and_appends() -> None:
    s = MemoryStorage()
    store = s.chunk_store("b/run/step-1")

    def work(worker: int) -> None:
        with store.locked(exclusive=False):
            for i in range(50):
                data = b"%d-%d" % (worker, i)
                store.put(hashlib.sha256(data).hexdigest(), "raw", data)
                s.append("b/run/events", data + b"\n")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = sorted(s.read_lines("b/run/events", max_line=100))
    assert lines == sorted(b"%d-%d\n" % (w, i) for w in range(4) for i in range(50))
    with store.locked(exclusive=True):
        report = store.sweep(set())
    assert report.deleted_chunks == 200
