"""A writer killed between any two storage calls leaves the old state or the new one, never a mix.

:class:`~ckptvault.testing.fault_storage.FaultyStorage` crashes the scenario at call ``k`` for every
``k``; a fresh view of the backend must then show the checkpoint absent or whole, the document old
or new, and the event line absent or whole -- and in the scenario's order (a committed checkpoint
implies the document and event written before it).
"""

from __future__ import annotations

import pytest

from ckptvault.config import MANIFEST_NAME
from ckptvault.errors import CheckpointNotFoundError
from ckptvault.storage.base import Storage
from ckptvault.storage.memory import MemoryStorage
from ckptvault.testing.fault_storage import FaultyStorage, SimulatedCrash

from .conftest import Backend

FILES = {"a.bin": bytes(range(256)) * 40, "b.bin": b"second file " * 100}
MANIFEST = b'{"files": ["a.bin", "b.bin"], "step": 7}'
OLD_DOC, NEW_DOC = b'{"latest": 6}', b'{"latest": 7}'
EVENT = b'{"event": "saved", "step": 7}\n'
CAP = 1 << 20


def scenario(s: Storage, base: str, doc_version: str) -> None:
    """One save as the engine does it: two files (each in two writes), the run document by
    compare-and-swap, an event, then the commit; on an ordinary error, abort."""
    txn = s.begin(s.join(base, "step-7"), overwrite=False)
    try:
        for name, data in FILES.items():
            out = txn.create(name, size_hint=len(data))
            out.write(data[: len(data) // 2])
            out.write(memoryview(data)[len(data) // 2 :])
            out.close()
        s.put(s.join(base, "run.json"), NEW_DOC, if_version=doc_version)
        s.append(s.join(base, "events.jsonl"), EVENT)
        txn.commit(MANIFEST)
    except Exception:
        txn.abort()
        raise


def prepare(s: Storage, base: str) -> str:
    return s.put(s.join(base, "run.json"), OLD_DOC)


def observe(s: Storage, base: str) -> tuple[bool, bytes | None, list[bytes]]:
    """(checkpoint committed?, the document, the event lines), after checking the checkpoint is
    whole when present and invisible when not."""
    target = s.join(base, "step-7")
    try:
        handle = s.open(target)
    except CheckpointNotFoundError:
        present = False
        assert list(s.iter_checkpoints(base)) == []
        assert [e.name for e in s.list(base) if e.kind == "checkpoint"] == []
    else:
        present = True
        try:
            assert handle.read_manifest() == MANIFEST
            assert handle.file_names() == sorted([*FILES, MANIFEST_NAME])
            for name, data in FILES.items():
                assert handle.size(name) == len(data)
                assert handle.read(name, 0, len(data)) == data
        finally:
            handle.close()
        assert list(s.iter_checkpoints(base)) == [target]
    doc = s.get(s.join(base, "run.json"), max_bytes=CAP)
    return (
        present,
        None if doc is None else doc.data,
        list(s.read_lines(s.join(base, "events.jsonl"), max_line=CAP)),
    )


def count_calls(backend: Backend) -> list[str]:
    base = backend.key("count")
    faulty = FaultyStorage(backend.storage)
    scenario(faulty, base, prepare(backend.storage, base))
    return faulty.log


@pytest.mark.parametrize("after", [False, True], ids=["before-call", "after-call"])
def test_crash_between_any_two_calls_leaves_old_or_new(backend: Backend, after: bool) -> None:
    calls = count_calls(backend)
    assert len(calls) >= 12, calls  # begin, 2 x (create, 2 writes, close), put, append, commit...
    outcomes = set()
    for k in range(1, len(calls) + 1):
        base = backend.key(f"crash-{k}")
        version = prepare(backend.storage, base)
        faulty = FaultyStorage(backend.storage, fail_at=k, after=after)
        with pytest.raises(SimulatedCrash):
            scenario(faulty, base, version)
        assert faulty.calls == k
        present, doc, events = observe(backend.fresh(), base)
        where = f"crash at call {k} ({calls[k - 1]})"
        assert doc in (OLD_DOC, NEW_DOC), where
        assert events in ([], [EVENT]), where
        if present:
            assert (doc, events) == (NEW_DOC, [EVENT]), where
        if events:
            assert doc == NEW_DOC, where
        outcomes.add((present, doc, len(events)))
        # After the crash the run goes on: recovery, then the same save succeeds.
        view = backend.fresh()
        view.recover(base)
        if not present:
            current = view.get(view.join(base, "run.json"), max_bytes=CAP)
            assert current is not None
            version = view.put(view.join(base, "run.json"), OLD_DOC, if_version=current.version)
            scenario(view, base, version)
            assert observe(view, base)[0], where
    # The crash points covered every stage: nothing done, files staged, document put, event added
    # (and, dying just after the commit returned, the whole save).
    stages = {(False, OLD_DOC, 0), (False, NEW_DOC, 0), (False, NEW_DOC, 1)}
    assert outcomes == (stages | {(True, NEW_DOC, 1)} if after else stages)


def test_faulty_storage_forwards_faithfully(backend: Backend) -> None:
    calls = count_calls(backend)
    base = backend.key("beyond")
    faulty = FaultyStorage(backend.storage, fail_at=len(calls) + 1)
    scenario(faulty, base, prepare(backend.storage, base))
    assert faulty.log == calls
    assert observe(backend.fresh(), base) == (True, NEW_DOC, [EVENT])
    with pytest.raises(SimulatedCrash):
        faulty.list(base)  # the next call is the crash point
    assert faulty.calls == len(calls) + 1


def test_a_crashed_storage_stays_dead() -> None:
    inner = MemoryStorage()
    faulty = FaultyStorage(inner, fail_at=2)
    key = faulty.join("bucket", "doc")  # call 1
    with pytest.raises(SimulatedCrash, match="call 2"):
        faulty.put(key, b"never")
    with pytest.raises(SimulatedCrash):
        faulty.get(key, max_bytes=CAP)  # no cleanup runs after a crash
    assert inner.get(key, max_bytes=CAP) is None
    assert faulty.calls == 2
    assert faulty.log == ["join", "put"]
