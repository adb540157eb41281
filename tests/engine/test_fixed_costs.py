"""A save's fixed costs (issue 18 item 1): no thread and no subprocess is started per save, and a
failing save still waits for its background work before the staging area is removed."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptvault as cv
from ckptvault.errors import StorageError
from ckptvault.storage import pools


def _tiny(i: int) -> dict[str, Any]:
    return {"step": i, "w": np.full(4, i, dtype=np.float32), "m": {"b": np.arange(3)}}


def test_saves_after_the_first_start_no_thread_and_no_subprocess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cv.save(tmp_path / "warm", _tiny(0))  # pools, git state and system facts of this process
    started: list[str] = []
    real_start = threading.Thread.start
    real_popen = subprocess.Popen.__init__

    def counting_start(self: threading.Thread) -> None:
        started.append(f"thread {self.name}")
        real_start(self)

    def counting_popen(self: Any, *args: Any, **kwargs: Any) -> None:
        started.append(f"process {args[:1]}")
        real_popen(self, *args, **kwargs)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    monkeypatch.setattr(subprocess.Popen, "__init__", counting_popen)
    for i in range(1, 21):
        cv.save(tmp_path / f"c{i}", _tiny(i), metadata={"step": i})
    # A pool adds a worker only when all of its own are busy, up to its size: the threads of a
    # whole process are bounded, whatever the number of saves (it used to be up to five per save).
    assert all(name.startswith("thread ckptvault-") for name in started), started
    assert len(started) <= sum(pools.SIZES.values()), started  # 20 saves used to start 40 or more
    assert not [name for name in started if name.startswith("process")]
    assert cv.load(tmp_path / "c20")["w"].tolist() == [20.0] * 4


def test_a_failed_fsync_fails_the_save_and_leaves_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cv.save(tmp_path / "old", _tiny(1))
    real_fsync = os.fsync
    calls: list[int] = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # a data file's or the sidecar's, on the shared pool
            raise OSError(5, "injected EIO")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StorageError):
        cv.save(tmp_path / "new", _tiny(2))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # staging swept, nothing partial
    assert cv.load(tmp_path / "old")["step"] == 1


def test_the_pools_are_made_afresh_in_a_forked_child(tmp_path: Path) -> None:
    cv.save(tmp_path / "parent", _tiny(1))
    parent_pool = pools.shared_pool("sync")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a save must not wait forever on the parent's (absent) threads
        code = 1
        try:
            fresh = pools.shared_pool("sync") is not parent_pool
            cv.save(tmp_path / "child", _tiny(2))
            code = 0 if fresh else 2
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 60)  # a hung child fails the test, never hangs it
    answer = os.read(read, 1) if ready else b""
    os.close(read)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert answer == b"\x00"
    assert cv.load(tmp_path / "child")["step"] == 2
