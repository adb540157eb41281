"""The fault injector itself: it must count, fail, tear and record exactly what it claims, or the
fault loops built on it prove nothing."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from ckptvault.testing import FaultInjector, InjectedFault


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_counts_only_operations_under_its_root(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    with FaultInjector(inside, record=True) as injector:
        _write_file(inside / "a", b"x")
        _write_file(outside / "b", b"y")
        os.rename(inside / "a", inside / "c")
    assert [op.kind for op in injector.log] == ["open", "write", "fsync", "rename"]
    assert injector.count == 4 and injector.fired == 0
    assert injector.log[1].data == b"x" and injector.log[1].offset == 0


def test_once_fails_exactly_the_nth_operation(tmp_path: Path) -> None:
    with FaultInjector(tmp_path, fail_at=2, errno=errno.ENOSPC) as injector:
        fd = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT, 0o644)
        with pytest.raises(InjectedFault) as caught:
            os.write(fd, b"hello")
        assert caught.value.errno == errno.ENOSPC
        os.write(fd, b"again")  # once: the next operation works
        os.close(fd)
    assert injector.fired == 1
    assert (tmp_path / "a").read_bytes() == b"again"


def test_persistent_fails_everything_after(tmp_path: Path) -> None:
    with FaultInjector(tmp_path, fail_at=1, persistent=True) as injector:
        for name in ("a", "b", "c"):
            with pytest.raises(OSError):
                os.mkdir(tmp_path / name)
    assert injector.fired == 3 and not any((tmp_path / n).exists() for n in "abc")


def test_torn_write_stores_half_then_fails(tmp_path: Path) -> None:
    with FaultInjector(tmp_path, fail_at=2, action="torn", record=True) as injector:
        fd = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT, 0o644)
        with pytest.raises(InjectedFault):
            os.write(fd, b"0123456789")
        os.close(fd)
    assert (tmp_path / "a").read_bytes() == b"01234"
    assert injector.log[-1].faulted and injector.log[-1].data == b"01234"


def test_buffered_files_count_at_flush_and_record_their_bytes(tmp_path: Path) -> None:
    with FaultInjector(tmp_path, record=True) as injector, open(tmp_path / "j.json", "w") as handle:
        for i in range(1000):
            handle.write(f"{i},")  # a thousand write() calls: one flushed write operation
    kinds = [op.kind for op in injector.log]
    assert kinds == ["open", "write"]
    assert injector.log[1].data == (tmp_path / "j.json").read_bytes()


def test_sqlite_statements_are_operations(tmp_path: Path) -> None:
    with FaultInjector(tmp_path, fail_at=2) as injector:
        db = sqlite3.connect(tmp_path / "x.db")
        db.execute("CREATE TABLE t (a)")
        with pytest.raises(sqlite3.OperationalError, match="injected"):
            db.execute("INSERT INTO t VALUES (1)")
        db.close()
    assert injector.fired == 1


def test_only_one_injector_at_a_time_and_everything_restored(tmp_path: Path) -> None:
    original = os.write
    with FaultInjector(tmp_path), pytest.raises(RuntimeError), FaultInjector(tmp_path):
        pass
    assert os.write is original


def test_delay_slows_the_nth_operation_and_then_does_it(tmp_path: Path) -> None:
    import time

    with FaultInjector(tmp_path, fail_at=1, action="delay", delay_s=0.2) as injector:
        started = time.monotonic()
        os.mkdir(tmp_path / "slow")
        elapsed = time.monotonic() - started
    assert elapsed >= 0.2 and (tmp_path / "slow").is_dir() and injector.fired == 0
