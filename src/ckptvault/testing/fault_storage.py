"""A storage wrapper that "crashes the process" between any two storage calls.

Why: the protocol promises that a writer killed at any point leaves either the old state or the new
one (a checkpoint absent or whole, a document old or new). :class:`FaultyStorage` counts every call
made through it -- on the storage and on every transaction, file, read handle, lease and chunk store
it hands out -- and raises :class:`SimulatedCrash` at call number ``fail_at`` *before* forwarding
it (or, with ``after=True``, once it returned: it took effect, its caller never knew). From then on
every call raises too: a dead process runs no ``finally`` cleanup against storage (no ``abort``, no
``release``), so what the inner backend holds afterwards is exactly what a crash there would leave.
A test runs its scenario once without ``fail_at`` to learn the number of calls, then once for each
crash point, and checks a fresh view of the inner backend.

``SimulatedCrash`` derives from ``BaseException`` so that ``except Exception`` in the code under
test cannot swallow it. Not for production use.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import BinaryIO, TypeVar

from ..storage.base import (
    ChunkBackend,
    Document,
    Entry,
    Lease,
    ReadHandle,
    Storage,
    SweepReport,
    WritableFile,
    WriteTransaction,
)

_T = TypeVar("_T")


class SimulatedCrash(BaseException):
    """The process "died" at this storage call (or an earlier one)."""


class CallCounter:
    """Counts calls and decides the crash; shared by a storage and everything it hands out."""

    def __init__(self, fail_at: int | None, *, after: bool = False) -> None:
        self.fail_at = fail_at
        self.after = after
        self.calls = 0
        self.log: list[str] = []
        self.crashed = False
        self._lock = threading.Lock()

    def run(self, what: str, call: Callable[[], _T]) -> _T:
        """Counts the call and makes it -- or dies before (or, with ``after``, just after) it."""
        with self._lock:
            if self.crashed:
                raise SimulatedCrash(f"call {what} after the crash")
            self.calls += 1
            self.log.append(what)
            number = self.calls
            fire = self.fail_at is not None and number >= self.fail_at
            if fire:
                self.crashed = True  # no other thread's call gets through from here on
                if not self.after:
                    raise SimulatedCrash(f"crash before call {number}: {what}")
        result = call()
        if fire:
            raise SimulatedCrash(f"crash after call {number}: {what}")
        return result


class _File:
    def __init__(self, inner: WritableFile, counter: CallCounter) -> None:
        self._inner = inner
        self._c = counter

    def write(self, data: memoryview | bytes, /) -> None:
        self._c.run("file.write", lambda: self._inner.write(data))

    def close(self) -> None:
        self._c.run("file.close", lambda: self._inner.close())


class _Transaction:
    """A coordinator's transaction or a participant's (``join_transaction``): the same wrapper, so
    a crash can fall between any two calls of any rank sharing this counter."""

    def __init__(self, inner: WriteTransaction, counter: CallCounter) -> None:
        self._inner = inner
        self._c = counter

    @property
    def token(self) -> str:
        # A call like the others: reading it may touch storage (an object store's join marker).
        return self._c.run("txn.token", lambda: self._inner.token)

    def create(self, name: str, *, size_hint: int = 0) -> WritableFile:
        inner = self._c.run(f"txn.create {name}", lambda: self._inner.create(name, size_hint=size_hint))
        return _File(inner, self._c)

    def commit(self, manifest: bytes, *, wait_files: Callable[[], None] | None = None) -> None:
        # The caller's background closes finish first, as before wait_files existed: the call log
        # stays one deterministic sequence, which the crash-at-every-call tests replay.
        if wait_files is not None:
            wait_files()
        self._c.run("txn.commit", lambda: self._inner.commit(manifest))

    def abort(self) -> None:
        self._c.run("txn.abort", lambda: self._inner.abort())


class _Handle:
    def __init__(self, inner: ReadHandle, counter: CallCounter) -> None:
        self._inner = inner
        self._c = counter

    def read_manifest(self) -> bytes:
        return self._c.run("handle.read_manifest", lambda: self._inner.read_manifest())

    def file_names(self) -> list[str]:
        return self._c.run("handle.file_names", lambda: self._inner.file_names())

    def size(self, name: str) -> int:
        return self._c.run("handle.size", lambda: self._inner.size(name))

    def read(self, name: str, offset: int, length: int) -> bytes:
        return self._c.run("handle.read", lambda: self._inner.read(name, offset, length))

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        self._c.run("handle.read_into", lambda: self._inner.read_into(name, offset, buffer))

    def mmap(self, name: str, *, copy_on_write: bool = False) -> mmap.mmap | None:
        return self._c.run("handle.mmap", lambda: self._inner.mmap(name, copy_on_write=copy_on_write))

    def is_stale(self) -> bool:
        return self._c.run("handle.is_stale", lambda: self._inner.is_stale())

    def close(self) -> None:
        self._c.run("handle.close", lambda: self._inner.close())


class _Lease:
    def __init__(self, inner: Lease, counter: CallCounter) -> None:
        self._inner = inner
        self._c = counter
        self.key = inner.key
        self.owner = inner.owner

    @property
    def expires(self) -> float:
        return self._inner.expires

    def renew(self) -> None:
        self._c.run("lease.renew", lambda: self._inner.renew())

    def release(self) -> None:
        self._c.run("lease.release", lambda: self._inner.release())


class _Chunks:
    def __init__(self, inner: ChunkBackend, counter: CallCounter) -> None:
        self._inner = inner
        self._c = counter

    def exists(self) -> bool:
        return self._c.run("chunks.exists", lambda: self._inner.exists())

    def find(self, digest: str, raw_len: int) -> tuple[str, int] | None:
        return self._c.run("chunks.find", lambda: self._inner.find(digest, raw_len))

    def has(self, digest: str, codec: str, stored_len: int) -> bool:
        return self._c.run("chunks.has", lambda: self._inner.has(digest, codec, stored_len))

    def put(self, digest: str, codec: str, data: memoryview | bytes) -> int:
        return self._c.run("chunks.put", lambda: self._inner.put(digest, codec, data))

    def sync(self) -> None:
        self._c.run("chunks.sync", lambda: self._inner.sync())

    def read(
        self, digest: str, codec: str, stored_len: int, *, where: str | None = None, tensor: str | None = None
    ) -> bytearray:
        return self._c.run(
            "chunks.read", lambda: self._inner.read(digest, codec, stored_len, where=where, tensor=tensor)
        )

    def report_bad(self, digest: str, codec: str) -> None:
        self._c.run("chunks.report_bad", lambda: self._inner.report_bad(digest, codec))

    def locked(self, *, exclusive: bool) -> AbstractContextManager[None]:
        return self._c.run("chunks.locked", lambda: self._inner.locked(exclusive=exclusive))

    def sweep(self, live: set[str], *, dry_run: bool = False) -> SweepReport:
        return self._c.run("chunks.sweep", lambda: self._inner.sweep(live, dry_run=dry_run))


class FaultyStorage:
    """``inner`` with a crash at call number ``fail_at`` (1-based; None: never): before the call
    is forwarded, or with ``after=True`` once it returned (it took effect; its caller never knew).
    ``calls`` and ``log`` say how many calls, and which, went through so far."""

    def __init__(self, inner: Storage, fail_at: int | None = None, *, after: bool = False) -> None:
        self.inner = inner
        self.file_bytes = inner.file_bytes
        self.counter = CallCounter(fail_at, after=after)

    @property
    def calls(self) -> int:
        return self.counter.calls

    @property
    def log(self) -> list[str]:
        return self.counter.log

    def join(self, prefix: str, *names: str) -> str:
        return self.counter.run("join", lambda: self.inner.join(prefix, *names))

    def begin(self, target: str, *, overwrite: bool) -> WriteTransaction:
        return _Transaction(
            self.counter.run("begin", lambda: self.inner.begin(target, overwrite=overwrite)), self.counter
        )

    def join_transaction(self, target: str, token: str) -> WriteTransaction:
        return _Transaction(
            self.counter.run("join_transaction", lambda: self.inner.join_transaction(target, token)),
            self.counter,
        )

    def open(self, target: str) -> ReadHandle:
        return _Handle(self.counter.run("open", lambda: self.inner.open(target)), self.counter)

    def iter_checkpoints(self, root: str) -> Iterator[str]:
        return self.counter.run("iter_checkpoints", lambda: self.inner.iter_checkpoints(root))

    def list(self, prefix: str) -> list[Entry]:
        return self.counter.run("list", lambda: self.inner.list(prefix))

    def change_token(self, prefix: str) -> str | None:
        return self.counter.run("change_token", lambda: self.inner.change_token(prefix))

    def delete(self, target: str) -> bool:
        return self.counter.run("delete", lambda: self.inner.delete(target))

    def chunk_store(self, checkpoint: str) -> ChunkBackend:
        return _Chunks(
            self.counter.run("chunk_store", lambda: self.inner.chunk_store(checkpoint)), self.counter
        )

    def get(self, key: str, *, max_bytes: int) -> Document | None:
        return self.counter.run("get", lambda: self.inner.get(key, max_bytes=max_bytes))

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_version: str | None = None,
        if_absent: bool = False,
        durable: bool = True,
    ) -> str:
        return self.counter.run(
            "put",
            lambda: self.inner.put(key, data, if_version=if_version, if_absent=if_absent, durable=durable),
        )

    def remove(self, key: str, *, if_version: str | None = None) -> bool:
        return self.counter.run("remove", lambda: self.inner.remove(key, if_version=if_version))

    def append(self, key: str, line: bytes) -> None:
        self.counter.run("append", lambda: self.inner.append(key, line))

    def read_lines(self, key: str, *, max_line: int) -> Iterator[bytes]:
        return self.counter.run("read_lines", lambda: self.inner.read_lines(key, max_line=max_line))

    def acquire_lease(self, key: str, *, owner: str, ttl_seconds: float) -> Lease:
        lease = self.counter.run(
            "acquire_lease", lambda: self.inner.acquire_lease(key, owner=owner, ttl_seconds=ttl_seconds)
        )
        return _Lease(lease, self.counter)

    def recover(self, prefix: str) -> None:
        self.counter.run("recover", lambda: self.inner.recover(prefix))

    def publish_file(self, target: str, action: str = "write") -> AbstractContextManager[BinaryIO]:
        return self.counter.run("publish_file", lambda: self._published(target, action))

    @contextmanager
    def _published(self, target: str, action: str) -> Iterator[BinaryIO]:
        with self.inner.publish_file(target, action) as handle:
            yield handle
            # A crash here (either mode): the inner block sees it and publishes nothing.
            self.counter.run("publish_file.exit", lambda: None)


def _typecheck(inner: Storage) -> Storage:
    """mypy proves here that a FaultyStorage is a Storage (structural typing, no runtime cost)."""
    return FaultyStorage(inner)
