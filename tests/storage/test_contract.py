"""The storage contract, part 1: checkpoint transactions, reads, listing, change tokens, deletion.

Every backend passes the same tests (``backend`` fixture, conftest.py); a new backend is added there
and must pass them unchanged.
"""

from __future__ import annotations

import os

import pytest

from ckptvault.config import MANIFEST_NAME
from ckptvault.errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError
from ckptvault.storage.base import Storage

from .conftest import Backend


def payload(seed: int, size: int) -> bytes:
    """Distinct, non-repeating-looking bytes per seed (a misplaced range read cannot match)."""
    return bytes((i * 31 + seed * 7 + (i >> 8)) % 256 for i in range(size))


def save(
    storage: Storage, target: str, files: dict[str, bytes], manifest: bytes, *, overwrite: bool = False
) -> None:
    txn = storage.begin(target, overwrite=overwrite)
    try:
        for name, data in files.items():
            out = txn.create(name, size_hint=len(data))
            out.write(data)
            out.close()
        txn.commit(manifest)
    except BaseException:
        txn.abort()
        raise


def read_all(storage: Storage, target: str) -> tuple[bytes, dict[str, bytes]]:
    """The manifest and every other file of a committed checkpoint."""
    handle = storage.open(target)
    try:
        names = [n for n in handle.file_names() if n != MANIFEST_NAME]
        return handle.read_manifest(), {n: handle.read(n, 0, handle.size(n)) for n in names}
    finally:
        handle.close()


def checkpoint_names(storage: Storage, prefix: str) -> list[str]:
    return [e.name for e in storage.list(prefix) if e.kind == "checkpoint"]


# -- transactions ---------------------------------------------------------------------------------


def test_commit_publishes_every_file_and_the_manifest(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    files = {"a.bin": payload(1, 5000), "b.bin": payload(2, 300)}
    save(s, target, files, b'{"step": 1}')
    manifest, got = read_all(s, target)
    assert manifest == b'{"step": 1}'
    assert got == files
    handle = s.open(target)
    assert handle.file_names() == sorted([*files, MANIFEST_NAME])
    assert not handle.is_stale()
    handle.close()


def test_a_writer_may_reuse_its_buffer_as_soon_as_write_returns(backend: Backend) -> None:
    """What a copy through one reused buffer relies on (a mirror upload does exactly this): bytes
    handed to ``write`` are the bytes stored, whatever the buffer holds afterwards. Small, one-part
    and multipart sizes (the object store sends parts of at least 5 MiB later, in the background)."""
    s = backend.storage
    target = backend.key("run", "step-1")
    txn = s.begin(target, overwrite=False)
    sizes = {"small.bin": 1000, "parts.bin": 6 << 20}
    for name, size in sizes.items():
        buffer = bytearray(size)
        out = txn.create(name, size_hint=2 * size)
        for fill in (b"A", b"B"):
            buffer[:] = fill * size
            out.write(memoryview(buffer))
        buffer[:] = b"C" * size
        out.close()
    txn.commit(b"{}")
    handle = s.open(target)
    for name, size in sizes.items():
        assert handle.read(name, 0, 2 * size) == b"A" * size + b"B" * size, name
    handle.close()


def test_uncommitted_checkpoint_is_never_visible(backend: Backend) -> None:
    s, run = backend.storage, backend.key("run")
    target = s.join(run, "step-1")
    txn = s.begin(target, overwrite=False)
    out = txn.create("a.bin")
    out.write(payload(1, 1000))
    out.close()
    for view in (s, backend.fresh()):
        with pytest.raises(CheckpointNotFoundError):
            view.open(target)
        assert list(view.iter_checkpoints(backend.root)) == []
        assert checkpoint_names(view, run) == []
        assert "step-1" not in [e.name for e in view.list(run)]
    txn.commit(b"{}")
    assert list(s.iter_checkpoints(backend.root)) == [target]
    assert checkpoint_names(s, run) == ["step-1"]


def test_abort_discards_everything(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    txn = s.begin(target, overwrite=False)
    out = txn.create("a.bin")
    out.write(b"doomed")
    out.close()
    txn.abort()
    txn.abort()  # idempotent
    with pytest.raises(CheckpointNotFoundError):
        s.open(target)
    assert list(s.iter_checkpoints(backend.root)) == []
    save(s, target, {"a.bin": b"kept"}, b"{}")  # nothing left behind blocks the next save
    assert read_all(s, target)[1] == {"a.bin": b"kept"}


def test_abort_after_commit_keeps_the_checkpoint(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    txn = s.begin(target, overwrite=False)
    out = txn.create("a.bin")
    out.write(b"x")
    out.close()
    txn.commit(b"{}")
    txn.abort()  # what a `finally: txn.abort()` does after success
    assert read_all(s, target) == (b"{}", {"a.bin": b"x"})


def test_overwrite_false_refuses_a_committed_checkpoint(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    save(s, target, {"a.bin": b"first"}, b"1")
    with pytest.raises(CheckpointExistsError):
        save(s, target, {"a.bin": b"second"}, b"2")
    assert read_all(s, target) == (b"1", {"a.bin": b"first"})


def test_second_writer_of_one_target_loses_at_commit(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    first, second = s.begin(target, overwrite=False), s.begin(target, overwrite=False)
    for txn, data in ((first, b"one"), (second, b"two")):
        out = txn.create("a.bin")
        out.write(data)
        out.close()
    first.commit(b"1")
    with pytest.raises(CheckpointExistsError):
        second.commit(b"2")
    second.abort()
    assert read_all(s, target) == (b"1", {"a.bin": b"one"})


def test_overwrite_replaces_the_whole_checkpoint_at_commit(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    save(s, target, {"a.bin": b"old-a", "b.bin": b"old-b"}, b"old")
    old_reader = s.open(target)
    assert old_reader.read("a.bin", 0, 5) == b"old-a"
    txn = s.begin(target, overwrite=True)
    out = txn.create("a.bin")
    out.write(b"new-a")
    out.close()
    out = txn.create("c.bin")
    out.write(b"new-c")
    out.close()
    assert read_all(s, target) == (b"old", {"a.bin": b"old-a", "b.bin": b"old-b"})  # not yet
    assert not old_reader.is_stale()
    txn.commit(b"new")
    assert read_all(s, target) == (b"new", {"a.bin": b"new-a", "c.bin": b"new-c"})  # b.bin is gone
    assert old_reader.is_stale()
    old_reader.close()
    assert list(s.iter_checkpoints(backend.root)) == [target]


def test_overwrite_of_nothing_creates(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    save(s, target, {"a.bin": b"a"}, b"m", overwrite=True)
    assert read_all(s, target) == (b"m", {"a.bin": b"a"})


# -- reads ----------------------------------------------------------------------------------------


def test_ranged_reads_sizes_and_short_files(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    data = payload(3, 70_000)
    save(s, target, {"a.bin": data, "empty.bin": b""}, b"{}")
    handle = s.open(target)
    try:
        assert handle.size("a.bin") == len(data)
        assert handle.size("empty.bin") == 0
        assert handle.read("a.bin", 12_345, 777) == data[12_345 : 12_345 + 777]
        assert handle.read("a.bin", len(data) - 5, 5) == data[-5:]
        assert handle.read("empty.bin", 0, 0) == b""
        buffer = bytearray(4096)
        handle.read_into("a.bin", 65_000, memoryview(buffer))
        assert bytes(buffer) == data[65_000:69_096]
        words = memoryview(bytearray(64)).cast("I")  # a typed buffer is filled byte for byte
        handle.read_into("a.bin", 8, words)
        assert words.tobytes() == data[8:72]
        with pytest.raises(CorruptCheckpointError):
            handle.read_into("a.bin", len(data) - 10, memoryview(bytearray(11)))
        with pytest.raises(CorruptCheckpointError):
            handle.read("a.bin", len(data), 1)
        with pytest.raises(CorruptCheckpointError):
            handle.size("missing.bin")
        mapped = handle.mmap("a.bin")
        if mapped is not None:  # backends that cannot map say None; a map must hold the bytes
            assert mapped[:] == data
            mapped.close()
        assert handle.mmap("empty.bin") is None
    finally:
        handle.close()


def test_open_refuses_what_is_not_a_committed_checkpoint(backend: Backend) -> None:
    s = backend.storage
    with pytest.raises(CheckpointNotFoundError):
        s.open(backend.key("never-written"))
    s.put(backend.key("run", "step-1", "notes.txt"), b"not a checkpoint")
    with pytest.raises(CheckpointNotFoundError):
        s.open(backend.key("run", "step-1"))


# -- listing, iteration, change tokens, deletion ---------------------------------------------------


def test_list_shows_checkpoints_documents_and_directories(backend: Backend) -> None:
    s, run = backend.storage, backend.key("run")
    save(s, s.join(run, "step-1"), {"a.bin": b"a"}, b"{}")
    save(s, s.join(run, "nested", "step-2"), {"a.bin": b"a"}, b"{}")
    s.put(s.join(run, "run.json"), b"{}")
    s.put(s.join(run, ".hidden.json"), b"{}")
    kinds = {e.name: e.kind for e in s.list(run)}
    assert kinds == {
        ".hidden.json": "document",
        "nested": "directory",
        "run.json": "document",
        "step-1": "checkpoint",
    }
    entries = {e.name: e for e in s.list(run)}
    assert read_all(s, entries["step-1"].key)[0] == b"{}"  # a listed key works with the other calls
    assert entries["step-1"].modified > 0
    assert entries["run.json"].size == 2
    assert [e.name for e in s.list(run)] == sorted(kinds)
    assert s.list(backend.key("no-such-prefix")) == []


def test_iter_checkpoints_recurses_sorted_and_skips_hidden(backend: Backend) -> None:
    s, run = backend.storage, backend.key("run")
    targets = [s.join(run, "b"), s.join(run, "a"), s.join(run, "sub", "c"), s.join(run, "a-z")]
    for target in targets:
        save(s, target, {"x.bin": b"x"}, b"{}")
    save(s, s.join(run, ".trash", "d"), {"x.bin": b"x"}, b"{}")
    expected = [s.join(run, "a"), s.join(run, "a-z"), s.join(run, "b"), s.join(run, "sub", "c")]
    assert list(s.iter_checkpoints(backend.root)) == expected
    assert list(s.iter_checkpoints(s.join(run, "sub", "c"))) == [s.join(run, "sub", "c")]
    assert list(s.iter_checkpoints(backend.key("nothing-here"))) == []


def test_delete_is_whole_and_idempotent(backend: Backend) -> None:
    s, run = backend.storage, backend.key("run")
    keep, gone = s.join(run, "step-1"), s.join(run, "step-2")
    save(s, keep, {"a.bin": b"1"}, b"{}")
    save(s, gone, {"a.bin": b"2", "b.bin": b"2"}, b"{}")
    assert s.delete(gone) is True
    assert s.delete(gone) is False
    assert s.delete(s.join(run, "never")) is False
    with pytest.raises(CheckpointNotFoundError):
        s.open(gone)
    assert checkpoint_names(s, run) == ["step-1"]
    assert "step-2" not in [e.name for e in s.list(run)]
    assert list(s.iter_checkpoints(run)) == [keep]
    assert read_all(s, keep)[1] == {"a.bin": b"1"}
    save(s, gone, {"a.bin": b"again"}, b"{}")  # the name is free again
    assert read_all(s, gone)[1] == {"a.bin": b"again"}


def test_change_token_follows_every_change_under_the_prefix(backend: Backend) -> None:
    s, run = backend.storage, backend.key("run")
    assert s.change_token(backend.key("no-such-prefix")) is None
    s.put(s.join(run, "run.json"), b"{}")
    seen = [s.change_token(run)]
    assert seen[0] is not None

    def changed() -> None:
        token = s.change_token(run)
        assert token is not None
        assert token not in seen, f"token {token!r} repeated after a change"
        seen.append(token)
        assert s.change_token(run) == token  # nothing changed since: the same token

    save(s, s.join(run, "step-1"), {"a.bin": b"a"}, b"{}")
    changed()
    s.put(s.join(run, "pins.json"), b"[]")
    changed()
    txn = s.begin(s.join(run, "step-2"), overwrite=False)
    txn.abort()  # may or may not change the token ("may differ"); must not repeat an old one below
    seen.append(s.change_token(run))
    save(s, s.join(run, "step-2"), {"a.bin": b"a"}, b"{}")
    changed()
    assert s.delete(s.join(run, "step-1"))
    changed()
    assert s.remove(s.join(run, "pins.json"))
    changed()
    assert [e.name for e in s.list(run)] == ["run.json", "step-2"]


def test_keys_join_and_round_trip(backend: Backend) -> None:
    s = backend.storage
    key = s.join(backend.root, "a", "b.json")
    assert key == s.join(s.join(backend.root, "a"), "b.json")
    assert key.startswith(backend.root)
    if backend.name == "local":
        assert key == os.path.join(backend.root, "a", "b.json")
    else:
        assert key == f"{backend.root}/a/b.json"


def test_overwrite_and_delete_take_stray_keys_of_the_old_checkpoint(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    save(s, target, {"a.bin": b"old"}, b"old")
    stray = s.join(target, "notes.txt")
    s.put(stray, b"written into the checkpoint afterwards")
    save(s, target, {"a.bin": b"new"}, b"new", overwrite=True)
    assert s.get(stray, max_bytes=1 << 20) is None  # the replaced checkpoint went whole
    assert read_all(s, target) == (b"new", {"a.bin": b"new"})
    s.put(stray, b"again")
    assert s.delete(target)
    assert s.get(stray, max_bytes=1 << 20) is None
    assert s.list(backend.key("run")) == []
