"""A process forked while a storage lock is held (a DataLoader starting its workers while the
background validator writes a result document) must not keep that lock once the parent is done:
the parent's next lock would wait for the child, and the child (a worker) for the parent."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ckptvault.storage import local_docs
from ckptvault.storage.chunkstore import ChunkStore
from ckptvault.storage.local import LocalStorage


@contextmanager
def forked_sleeper() -> Iterator[Callable[[], None]]:
    """A fork() to call while a lock is held: the child inherits every descriptor and sleeps."""
    children: list[int] = []

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)

    try:
        yield fork
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def finishes(fn: Callable[[], Any], seconds: float = 10.0) -> bool:
    worker = threading.Thread(target=fn, daemon=True)
    worker.start()
    worker.join(seconds)
    return not worker.is_alive()


def test_a_document_lock_is_not_kept_by_a_child_forked_during_the_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path)
    key = str(tmp_path / "run" / "results.json")
    real_replace = local_docs.replace_in_dir
    with forked_sleeper() as fork:

        def replace_and_fork(*args: Any, **kwargs: Any) -> None:
            fork()  # while the directory's flock is held
            real_replace(*args, **kwargs)

        monkeypatch.setattr(local_docs, "replace_in_dir", replace_and_fork)
        storage.put(key, b"{}")
        monkeypatch.setattr(local_docs, "replace_in_dir", real_replace)
        assert finishes(lambda: storage.put(key, b'{"a": 1}')), "the second put waits for the child"
        assert finishes(lambda: storage.remove(key))


def test_the_chunk_store_lock_is_not_kept_by_a_child_forked_under_it(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    with forked_sleeper() as fork:
        with store.locked(exclusive=False):
            fork()

        def exclusive() -> None:
            with store.locked(exclusive=True):
                pass

        assert finishes(exclusive), "garbage collection would wait for the child"
