"""The backends every storage contract test runs against, and a clock tests can move.

Each test gets a :class:`Backend`: the storage, a root key under which the test writes (``join``
builds every key, so no test knows how a backend spells them), and ``fresh()`` -- a new view of the
same stored bytes (what a restarted process would see after a crash).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckptvault.storage.base import Storage
from ckptvault.storage.local import LocalStorage
from ckptvault.storage.memory import MemoryStorage
from ckptvault.storage.s3 import S3Storage
from ckptvault.testing.s3server import MotoServer


class FakeClock:
    """Seconds since the epoch that move only when a test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    name: str
    storage: Storage
    root: str
    fresh: Callable[[], Storage]
    clock: FakeClock | None = None  # set where lease expiry follows an injectable clock

    def key(self, *names: str) -> str:
        return self.storage.join(self.root, *names)


def _memory(tmp_path: Path) -> Backend:
    clock = FakeClock()
    storage = MemoryStorage(clock=clock)
    return Backend("memory", storage, "bucket/vault", lambda: storage, clock)


def _local(tmp_path: Path) -> Backend:
    root = tmp_path / "vault"
    root.mkdir()
    return Backend("local", LocalStorage(root), str(root), lambda: LocalStorage(root))


def s3_storage(server: MotoServer, bucket: str, *, endpoint: str | None = None, **options: Any) -> S3Storage:
    """A backend on the test server (or a proxy in front of it: ``endpoint``) configured by
    constructor arguments alone (no environment); ``options`` override the defaults below."""
    settings: dict[str, Any] = {"max_retries": 2, "retry_timeout_seconds": 10.0, **options}
    return S3Storage(
        f"s3://{bucket}",
        endpoint=endpoint or server.endpoint,
        config={
            "access_key_id": server.ACCESS_KEY,
            "secret_access_key": server.SECRET_KEY,
            "region": server.REGION,
        },
        **settings,
    )


def _s3(request: pytest.FixtureRequest) -> Backend:
    server: MotoServer = request.getfixturevalue("moto_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    clock = FakeClock()
    storage = s3_storage(server, bucket, clock=clock)
    return Backend(
        "s3", storage, f"s3://{bucket}/vault", lambda: s3_storage(server, bucket, clock=clock), clock
    )


# Contract tests the local backend does not pass yet: strict xfail, so each entry must go (and the
# test then pass) when LocalStorage is fixed -- an XPASS fails the run.
LOCAL_GAPS: dict[str, str] = {}


@pytest.fixture(params=["memory", "local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    gap = LOCAL_GAPS.get(getattr(request.node, "originalname", ""))
    if request.param == "local" and gap:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"LocalStorage: {gap}"))
    if request.param == "s3":
        return _s3(request)
    return {"memory": _memory, "local": _local}[request.param](tmp_path)


@pytest.fixture(params=["memory", "s3"])
def clocked_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The backends whose leases lapse by a clock (an object store's); the local backend's end
    with the holding process instead (tests/storage/test_local_recover.py kills a holder)."""
    if request.param == "s3":
        return _s3(request)
    return _memory(tmp_path)
