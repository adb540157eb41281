"""Recovery of temporary documents on local disk: a killed writer's leftover goes, a live write is
never disturbed (its temporary file is flock-ed while it lives), whoever calls recover."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptvault.errors import ConcurrentWriteError
from ckptvault.storage.local import LocalStorage
from ckptvault.storage.safeopen import replace_in_dir


def test_a_dead_writers_temporary_goes_a_live_ones_stays(tmp_path: Path) -> None:
    dead = tmp_path / ".run.json.0badc0de.tmp"
    dead.write_bytes(b"half a document")
    live = tmp_path / ".pins.json.12345678.tmp"
    fd = os.open(live, os.O_WRONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a writer in the middle of replace_in_dir holds
    try:
        LocalStorage(root=tmp_path).recover(str(tmp_path))
        assert not dead.exists()
        assert live.exists()
    finally:
        os.close(fd)
    LocalStorage(root=tmp_path).recover(str(tmp_path))
    assert not live.exists()  # its writer is gone now


def test_a_write_whose_temporary_is_swept_before_its_lock_starts_over(tmp_path: Path) -> None:
    """The instant between creating the temporary file and locking it: a sweep may take the file;
    the write must still land, whole."""
    real_open = os.open
    swept: list[str] = []

    def open_then_sweep(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if str(path).endswith(".tmp") and not swept and flags & os.O_CREAT:
            swept.append(str(path))
            os.unlink(path, dir_fd=dir_fd)  # what a concurrent recover does to an unlocked file
        return fd

    dir_fd = real_open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.open = open_then_sweep  # type: ignore[assignment]
        try:
            replace_in_dir(dir_fd, "doc.json", b'{"whole": true}', durable=True)
        finally:
            os.open = real_open
    finally:
        os.close(dir_fd)
    assert swept, "the race was not exercised"
    assert (tmp_path / "doc.json").read_bytes() == b'{"whole": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]


def test_direct_io_is_the_constructors_choice_not_the_environments_mid_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CKPTVAULT_DIRECT_IO", "0")
    storage = LocalStorage()
    monkeypatch.setenv("CKPTVAULT_DIRECT_IO", "1")  # changed after the backend was made
    txn = storage.begin(str(tmp_path / "ckpt"), overwrite=False)
    try:
        handle = txn.create("big", size_hint=1 << 30)
        assert type(handle).__name__ == "LocalWritableFile"
        handle.close()
    finally:
        txn.abort()
    assert storage.chunk_store(str(tmp_path / "ckpt")).direct_io is False


def test_a_local_lease_ends_with_its_holder(tmp_path: Path) -> None:
    """The local backend's lease has no clock: it is a record lock the kernel drops when the holding
    process dies (SIGKILL included), and until then a second writer is told who holds it."""
    key = str(tmp_path / ".ckptvault-run.lock")
    code = (
        "import sys, time\n"
        "from ckptvault.storage.local import LocalStorage\n"
        f"LocalStorage().acquire_lease({key!r}, owner='holder-process', ttl_seconds=1)\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(ConcurrentWriteError, match="holder-process"):
            LocalStorage().acquire_lease(key, owner="second", ttl_seconds=1)
    finally:
        child.kill()
        child.wait()
    lease = LocalStorage().acquire_lease(key, owner="second", ttl_seconds=1)
    lease.release()
