"""The storage contract, part 4: several writers of one checkpoint transaction (multi-rank saves).

The transaction ``begin`` returns (the coordinator) hands its ``token`` to other writers; each joins
with ``join_transaction(target, token)`` and writes files into the same staging area; only the
coordinator commits. Tokens come from other processes, so malformed ones must be refused (EINVAL)
without touching anything, and a token whose save is over must be ENOENT. Every backend runs these
(``backend`` fixture, conftest.py); the last tests are the local backend's own (links, a second
process) and the fault wrapper's forwarding.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
from pathlib import Path

import pytest
from tests.storage.join_rank import rank_data, rank_main

from ckptvault.config import MANIFEST_NAME, Settings
from ckptvault.errors import CheckpointNotFoundError, StorageError
from ckptvault.storage.base import Storage, WriteTransaction
from ckptvault.storage.local import STAGING_MARK, LocalStorage
from ckptvault.storage.memory import MemoryStorage
from ckptvault.storage.s3 import S3Storage
from ckptvault.storage.s3_txn import SAVES_NAME
from ckptvault.testing.fault_storage import FaultyStorage

from .conftest import Backend
from .test_contract import payload, read_all


def write(txn: WriteTransaction, name: str, data: bytes) -> None:
    out = txn.create(name, size_hint=len(data))
    out.write(data)
    out.close()


def leftovers(backend: Backend, target: str) -> list[str]:
    """What a save of ``target`` left in the backend's private places (local staging directories,
    the object store's save areas); memory keeps nothing outside the transaction object."""
    storage = backend.storage
    if isinstance(storage, LocalStorage):
        parent = Path(target).parent
        return [n for n in os.listdir(parent) if STAGING_MARK in n] if parent.exists() else []
    if isinstance(storage, S3Storage):
        path = storage._path(target)
        parent, _, name = path.rpartition("/")
        return [m.path for m in storage.client.list_all(f"{parent}/{SAVES_NAME}/{name}/")]
    return []


def assert_errno(exc: pytest.ExceptionInfo[StorageError], code: int) -> None:
    assert exc.value.errno == code, (errno.errorcode.get(exc.value.errno or 0), str(exc.value))


# -- the shared staging area ------------------------------------------------------------------------


def test_participant_files_are_published_by_the_coordinators_commit(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    coordinator = s.begin(target, overwrite=False)
    token = coordinator.token
    assert isinstance(token, str) and token.isascii() and token.isprintable() and len(token) <= 200
    rank1 = s.join_transaction(target, token)
    rank2 = backend.fresh().join_transaction(target, token)  # another view: as another process
    assert rank1.token == token and rank2.token == token
    files = {"rank0.bin": payload(0, 3000), "rank1.bin": payload(1, 5000), "rank2.bin": payload(2, 7)}
    write(coordinator, "rank0.bin", files["rank0.bin"])
    write(rank1, "rank1.bin", files["rank1.bin"])
    write(rank2, "rank2.bin", files["rank2.bin"])
    coordinator.commit(b'{"step": 1}')
    manifest, got = read_all(s, target)
    assert manifest == b'{"step": 1}'
    assert got == files
    handle = s.open(target)
    assert handle.file_names() == sorted([*files, MANIFEST_NAME])
    handle.close()


def test_participant_commit_is_refused_and_commits_nothing(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    coordinator = s.begin(target, overwrite=False)
    rank1 = s.join_transaction(target, coordinator.token)
    write(rank1, "rank1.bin", b"one")
    with pytest.raises(StorageError) as exc:
        rank1.commit(b"{}")
    assert_errno(exc, errno.EPERM)
    assert "only the transaction that began the save commits it" in str(exc.value)
    with pytest.raises(CheckpointNotFoundError):
        s.open(target)
    write(coordinator, "rank0.bin", b"zero")  # the save goes on, its area untouched
    coordinator.commit(b"{}")
    assert read_all(s, target)[1] == {"rank0.bin": b"zero", "rank1.bin": b"one"}


def test_coordinator_abort_removes_participant_files(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    coordinator = s.begin(target, overwrite=False)
    rank1 = s.join_transaction(target, coordinator.token)
    write(coordinator, "rank0.bin", b"zero")
    write(rank1, "rank1.bin", payload(1, 6000))
    coordinator.abort()
    with pytest.raises(CheckpointNotFoundError):
        s.open(target)
    assert [e for e in s.list(backend.key("run")) if e.kind == "checkpoint"] == []
    assert leftovers(backend, target) == []
    rank1.abort()  # the area is gone: nothing to do, nothing raised


def test_participant_abort_withdraws_only_its_own_files(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    coordinator = s.begin(target, overwrite=False)
    rank1 = s.join_transaction(target, coordinator.token)
    rank2 = s.join_transaction(target, coordinator.token)
    write(rank1, "rank1.bin", b"one")
    write(rank2, "rank2.bin", b"two")
    rank1.abort()
    rank1.abort()  # idempotent
    write(coordinator, "rank0.bin", b"zero")
    coordinator.commit(b"{}")
    assert read_all(s, target)[1] == {"rank0.bin": b"zero", "rank2.bin": b"two"}
    rank2.abort()  # after the commit: the published files stay
    assert read_all(s, target)[1] == {"rank0.bin": b"zero", "rank2.bin": b"two"}


def test_a_name_already_in_the_area_is_eexist(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    coordinator = s.begin(target, overwrite=False)
    rank1 = s.join_transaction(target, coordinator.token)
    rank2 = s.join_transaction(target, coordinator.token)
    write(coordinator, "rank0.bin", b"zero")
    write(rank1, "rank1.bin", b"one")
    for writer, name in ((rank1, "rank0.bin"), (rank2, "rank1.bin"), (coordinator, "rank1.bin")):
        with pytest.raises(StorageError) as exc:
            writer.create(name)
        assert_errno(exc, errno.EEXIST)
    with pytest.raises(StorageError) as exc:
        rank1.create(MANIFEST_NAME)  # the commit's, never a participant's
    assert_errno(exc, errno.EEXIST)
    coordinator.commit(b"{}")
    assert read_all(s, target)[1] == {"rank0.bin": b"zero", "rank1.bin": b"one"}


# -- untrusted tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "/etc", "..", ".", "x" * 300, "\x00"])
def test_malformed_tokens_are_einval(backend: Backend, bad: str) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    coordinator = s.begin(target, overwrite=False)
    for token in (bad, coordinator.token + "/../x", coordinator.token + "\n"):
        with pytest.raises(StorageError) as exc:
            s.join_transaction(target, token)
        assert_errno(exc, errno.EINVAL)
    coordinator.abort()


def test_another_targets_token_is_refused(backend: Backend) -> None:
    """Local and memory tell it is another target's (EINVAL); an object store's token is a bare
    save id from which the area is derived under *this* target, so it names nothing here (ENOENT)."""
    s = backend.storage
    target, other = backend.key("run", "step-1"), backend.key("run", "step-2")
    mine = s.begin(target, overwrite=False)
    theirs = s.begin(other, overwrite=False)
    with pytest.raises(StorageError) as exc:
        s.join_transaction(target, theirs.token)
    assert_errno(exc, errno.ENOENT if backend.name == "s3" else errno.EINVAL)
    write(theirs, "x.bin", b"theirs")
    theirs.commit(b"{}")
    mine.abort()
    assert read_all(s, other)[1] == {"x.bin": b"theirs"}


def test_a_token_whose_save_is_over_is_enoent(backend: Backend) -> None:
    s, target = backend.storage, backend.key("run", "step-1")
    aborted = s.begin(target, overwrite=False)
    token = aborted.token
    late = s.join_transaction(target, token)
    aborted.abort()
    with pytest.raises(StorageError) as exc:
        s.join_transaction(target, token)  # joining after the abort
    assert_errno(exc, errno.ENOENT)
    with pytest.raises(StorageError) as exc:
        late.create("rank1.bin")  # joined before it, creating after
    assert_errno(exc, errno.ENOENT)

    committed = s.begin(target, overwrite=False)
    token = committed.token
    late = s.join_transaction(target, token)
    write(committed, "rank0.bin", b"zero")
    committed.commit(b"{}")
    with pytest.raises(StorageError) as exc:
        s.join_transaction(target, token)
    assert_errno(exc, errno.ENOENT)
    with pytest.raises(StorageError) as exc:
        late.create("rank1.bin")  # never a file added to a published checkpoint
    assert_errno(exc, errno.ENOENT)
    assert read_all(s, target)[1] == {"rank0.bin": b"zero"}


# -- the local backend's own ------------------------------------------------------------------------


def _local(tmp_path: Path, **settings: object) -> tuple[LocalStorage, str]:
    root = tmp_path / "vault"
    root.mkdir()
    storage = LocalStorage(root, settings=Settings(**settings))  # type: ignore[arg-type]
    return storage, str(root / "run" / "step-1")


def test_local_token_naming_a_link_or_a_file_is_einval(tmp_path: Path) -> None:
    storage, target = _local(tmp_path)
    coordinator = storage.begin(target, overwrite=False)
    parent = Path(target).parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Well-formed names of this target, but a link to a directory and a plain file.
    link_name = coordinator.token[:-8] + "0badc0de"
    (parent / link_name).symlink_to(elsewhere, target_is_directory=True)
    file_name = coordinator.token[:-8] + "0badf11e"
    (parent / file_name).write_bytes(b"")
    for token in (link_name, file_name):
        with pytest.raises(StorageError) as exc:
            storage.join_transaction(target, token)
        assert_errno(exc, errno.EINVAL)
    assert list(elsewhere.iterdir()) == []
    coordinator.abort()


def test_local_participant_swapped_for_a_link_is_refused_at_create(tmp_path: Path) -> None:
    storage, target = _local(tmp_path)
    coordinator = storage.begin(target, overwrite=False)
    rank1 = storage.join_transaction(target, coordinator.token)
    staging = Path(target).parent / coordinator.token
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    staging.rename(tmp_path / "moved")
    staging.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(StorageError) as exc:
        rank1.create("rank1.bin")
    assert exc.value.errno in (errno.EINVAL, errno.ENOENT)
    assert list(elsewhere.iterdir()) == []


def test_local_participant_takes_no_lock_and_honours_direct_io(tmp_path: Path) -> None:
    storage, target = _local(tmp_path, direct_io=True, direct_io_min_bytes=4096)
    coordinator = storage.begin(target, overwrite=False)
    rank1 = storage.join_transaction(target, coordinator.token)
    data = payload(3, (1 << 20) + 123)  # a tail that is not aligned
    write(rank1, "rank1.bin", data)
    coordinator.commit(b"{}")
    assert read_all(storage, target)[1] == {"rank1.bin": data}
    assert [n for n in os.listdir(Path(target).parent) if STAGING_MARK in n] == []


def test_local_second_process_joins_by_token(tmp_path: Path) -> None:
    storage, target = _local(tmp_path)
    coordinator = storage.begin(target, overwrite=False)
    write(coordinator, "rank0.bin", b"zero")
    context = multiprocessing.get_context("spawn")
    rank = context.Process(
        target=rank_main, args=(str(tmp_path / "vault"), target, coordinator.token, "rank1.bin", 70_000)
    )
    rank.start()
    rank.join(60)
    assert rank.exitcode == 0
    coordinator.commit(b'{"ranks": 2}')
    manifest, got = read_all(storage, target)
    assert manifest == b'{"ranks": 2}'
    assert got == {"rank0.bin": b"zero", "rank1.bin": rank_data(70_000)}


# -- the fault wrapper ------------------------------------------------------------------------------


def test_faulty_storage_forwards_join_and_counts_participant_calls() -> None:
    inner: Storage = MemoryStorage()
    faulty = FaultyStorage(inner)
    coordinator = faulty.begin("b/run/step-1", overwrite=False)
    rank1 = faulty.join_transaction("b/run/step-1", coordinator.token)
    assert rank1.token == coordinator.token
    write(rank1, "rank1.bin", b"one")
    with pytest.raises(StorageError):
        rank1.commit(b"{}")
    coordinator.commit(b"{}")
    assert read_all(inner, "b/run/step-1")[1] == {"rank1.bin": b"one"}
    assert faulty.log[:3] == ["begin", "txn.token", "join_transaction"]
    assert "file.close" in faulty.log
