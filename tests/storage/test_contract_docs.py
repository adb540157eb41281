"""The storage contract, part 2: documents with compare-and-swap, event logs, leases, published files."""

from __future__ import annotations

import pytest

from ckptvault.errors import ConcurrentWriteError, DocumentConflictError, StorageError

from .conftest import Backend

CAP = 1 << 20


# -- documents ------------------------------------------------------------------------------------


def test_document_round_trip_and_versions(backend: Backend) -> None:
    s, key = backend.storage, backend.key("run", "run.json")
    assert s.get(key, max_bytes=CAP) is None
    v1 = s.put(key, b'{"v": 1}')
    doc = s.get(key, max_bytes=CAP)
    assert doc is not None
    assert (doc.data, doc.version) == (b'{"v": 1}', v1)
    v2 = s.put(key, b'{"v": 2}', if_version=v1)
    assert v2 != v1
    doc = s.get(key, max_bytes=CAP)
    assert doc is not None
    assert (doc.data, doc.version) == (b'{"v": 2}', v2)
    v3 = s.put(key, b'{"v": 3}', durable=False)
    doc = s.get(key, max_bytes=CAP)
    assert doc is not None
    assert (doc.data, doc.version) == (b'{"v": 3}', v3)


def test_put_with_a_stale_version_conflicts_and_changes_nothing(backend: Backend) -> None:
    s, key = backend.storage, backend.key("run", "index.json")
    stale = s.put(key, b"first")
    current = s.put(key, b"second", if_version=stale)
    with pytest.raises(DocumentConflictError):
        s.put(key, b"lost update", if_version=stale)
    doc = s.get(key, max_bytes=CAP)
    assert doc is not None
    assert (doc.data, doc.version) == (b"second", current)
    assert issubclass(DocumentConflictError, ConcurrentWriteError)


def test_put_if_version_of_a_removed_document_conflicts(backend: Backend) -> None:
    s, key = backend.storage, backend.key("run", "index.json")
    version = s.put(key, b"first")
    assert s.remove(key)
    with pytest.raises(DocumentConflictError):
        s.put(key, b"resurrected", if_version=version)
    assert s.get(key, max_bytes=CAP) is None


def test_put_if_absent(backend: Backend) -> None:
    s, key = backend.storage, backend.key("registry", "alias-best")
    version = s.put(key, b"step-1", if_absent=True)
    with pytest.raises(DocumentConflictError):
        s.put(key, b"step-2", if_absent=True)
    doc = s.get(key, max_bytes=CAP)
    assert doc is not None
    assert (doc.data, doc.version) == (b"step-1", version)


def test_remove_is_idempotent_and_conditional(backend: Backend) -> None:
    s, key = backend.storage, backend.key("run", "pins.json")
    assert s.remove(key) is False
    old = s.put(key, b"[1]")
    new = s.put(key, b"[1, 2]")
    with pytest.raises(DocumentConflictError):
        s.remove(key, if_version=old)
    doc = s.get(key, max_bytes=CAP)
    assert doc is not None
    assert doc.data == b"[1, 2]"
    assert s.remove(key, if_version=new) is True
    assert s.remove(key) is False
    assert s.get(key, max_bytes=CAP) is None


def test_get_is_bounded(backend: Backend) -> None:
    s, key = backend.storage, backend.key("run", "big.json")
    data = b"x" * 1000
    s.put(key, data)
    doc = s.get(key, max_bytes=len(data))
    assert doc is not None
    assert doc.data == data
    with pytest.raises(StorageError):
        s.get(key, max_bytes=len(data) - 1)


def test_documents_are_listed(backend: Backend) -> None:
    s = backend.storage
    s.put(backend.key("run", "b.json"), b"bb")
    s.put(backend.key("run", "a.json"), b"a")
    entries = s.list(backend.key("run"))
    assert [(e.name, e.kind, e.size) for e in entries] == [
        ("a.json", "document", 1),
        ("b.json", "document", 2),
    ]
    doc = s.get(entries[1].key, max_bytes=CAP)
    assert doc is not None
    assert doc.data == b"bb"


def test_recover_keeps_documents(backend: Backend) -> None:
    s, run = backend.storage, backend.key("run")
    s.put(s.join(run, "run.json"), b"{}")
    s.recover(run)
    s.recover(backend.key("no-such-prefix"))
    assert [e.name for e in s.list(run)] == ["run.json"]


# -- event logs -----------------------------------------------------------------------------------


def test_event_log_keeps_order_with_newlines(backend: Backend) -> None:
    s, key = backend.storage, backend.key("run", "events.jsonl")
    assert list(s.read_lines(key, max_line=100)) == []
    lines = [b'{"event": %d}\n' % i for i in range(5)]
    for line in lines:
        s.append(key, line)
    assert list(s.read_lines(key, max_line=100)) == lines
    assert list(backend.fresh().read_lines(key, max_line=100)) == lines


def test_event_log_skips_overlong_lines(backend: Backend) -> None:
    s, key = backend.storage, backend.key("run", "events.jsonl")
    fits = b"x" * 15 + b"\n"  # 16 bytes with its newline: exactly max_line
    s.append(key, b"first\n")
    s.append(key, b"y" * 16 + b"\n")  # one byte too long
    s.append(key, b"z" * 500 + b"\n")  # far too long
    s.append(key, fits)
    s.append(key, b"last\n")
    assert list(s.read_lines(key, max_line=16)) == [b"first\n", fits, b"last\n"]


def test_event_log_returns_damaged_lines_as_bytes(backend: Backend) -> None:
    s, key = backend.storage, backend.key("run", "events.jsonl")
    damaged = b"\xff\xfe{not json\x00\n"
    s.append(key, b"ok\n")
    s.append(key, damaged)
    s.append(key, b"ok again\n")
    got = list(s.read_lines(key, max_line=100))
    assert got == [b"ok\n", damaged, b"ok again\n"]
    assert all(isinstance(line, bytes) for line in got)


# -- leases ---------------------------------------------------------------------------------------


def test_second_lease_names_the_holder(backend: Backend) -> None:
    s, key = backend.storage, backend.key("run", "lease")
    first = s.acquire_lease(key, owner="trainer-a@host-1", ttl_seconds=60)
    assert (first.key, first.owner) == (key, "trainer-a@host-1")
    assert first.expires > 0
    with pytest.raises(ConcurrentWriteError) as caught:
        s.acquire_lease(key, owner="trainer-b@host-2", ttl_seconds=60)
    assert "trainer-a@host-1" in str(caught.value)
    first.renew()  # still ours
    first.release()


def test_release_frees_the_lease(backend: Backend) -> None:
    s, key = backend.storage, backend.key("run", "lease")
    first = s.acquire_lease(key, owner="a", ttl_seconds=60)
    first.release()
    first.release()  # idempotent
    second = s.acquire_lease(key, owner="b", ttl_seconds=60)
    with pytest.raises(ConcurrentWriteError):
        first.renew()  # released: it is not ours any more
    with pytest.raises(ConcurrentWriteError) as caught:
        s.acquire_lease(key, owner="c", ttl_seconds=60)
    assert "b" in str(caught.value)
    second.release()


def test_leases_of_different_keys_are_independent(backend: Backend) -> None:
    s = backend.storage
    one = s.acquire_lease(backend.key("run-1", "lease"), owner="a", ttl_seconds=60)
    two = s.acquire_lease(backend.key("run-2", "lease"), owner="b", ttl_seconds=60)
    one.release()
    two.release()


def test_expired_lease_is_taken_over_and_the_old_holder_loses_it(clocked_backend: Backend) -> None:
    backend = clocked_backend
    assert backend.clock is not None
    s, key = backend.storage, backend.key("run", "lease")
    old = s.acquire_lease(key, owner="old", ttl_seconds=30)
    assert old.expires == backend.clock() + 30
    backend.clock.advance(29.9)
    with pytest.raises(ConcurrentWriteError):
        s.acquire_lease(key, owner="new", ttl_seconds=30)
    backend.clock.advance(0.2)  # past the expiry: free for the taking
    new = s.acquire_lease(key, owner="new", ttl_seconds=30)
    with pytest.raises(ConcurrentWriteError) as caught:
        old.renew()
    assert "new" in str(caught.value)
    old.release()  # must not release the new holder's lease
    with pytest.raises(ConcurrentWriteError) as held:
        s.acquire_lease(key, owner="third", ttl_seconds=30)
    assert "new" in str(held.value)
    new.release()


def test_renewal_extends_and_an_expired_untaken_lease_renews(clocked_backend: Backend) -> None:
    backend = clocked_backend
    assert backend.clock is not None
    s, key = backend.storage, backend.key("run", "lease")
    lease = s.acquire_lease(key, owner="a", ttl_seconds=10)
    backend.clock.advance(8)
    lease.renew()
    assert lease.expires == backend.clock() + 10
    backend.clock.advance(8)  # 16 s after acquiring: held only thanks to the renewal
    with pytest.raises(ConcurrentWriteError):
        s.acquire_lease(key, owner="b", ttl_seconds=10)
    backend.clock.advance(100)
    lease.renew()  # lapsed but nobody took it: still ours
    with pytest.raises(ConcurrentWriteError):
        s.acquire_lease(key, owner="b", ttl_seconds=10)
    lease.release()


# -- published files ------------------------------------------------------------------------------


def test_publish_file_appears_whole_on_clean_exit(backend: Backend) -> None:
    s, target = backend.storage, backend.key("exports", "model.safetensors")
    with s.publish_file(target) as out:
        out.write(b"part one, ")
        assert s.get(target, max_bytes=CAP) is None  # not before the block ends
        out.write(b"part two")
    doc = s.get(target, max_bytes=CAP)
    assert doc is not None
    assert doc.data == b"part one, part two"
    assert [e.name for e in s.list(backend.key("exports"))] == ["model.safetensors"]


def test_publish_file_leaves_nothing_on_an_exception(backend: Backend) -> None:
    s, target = backend.storage, backend.key("exports", "model.safetensors")
    with pytest.raises(RuntimeError, match="export failed"), s.publish_file(target) as out:
        out.write(b"half of it")
        raise RuntimeError("export failed")
    assert s.get(target, max_bytes=CAP) is None
    assert s.list(backend.key("exports")) == []  # no temporary left behind either


def test_publish_file_replaces_a_previous_file(backend: Backend) -> None:
    s, target = backend.storage, backend.key("exports", "report.html")
    with s.publish_file(target) as out:
        out.write(b"old")
    with pytest.raises(ValueError), s.publish_file(target) as out:
        out.write(b"new but failed")
        raise ValueError
    doc = s.get(target, max_bytes=CAP)
    assert doc is not None
    assert doc.data == b"old"
    with s.publish_file(target) as out:
        out.write(b"new")
    doc = s.get(target, max_bytes=CAP)
    assert doc is not None
    assert doc.data == b"new"
