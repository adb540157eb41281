"""pytest fixtures for tests that need a real S3-compatible server (moto in server mode on 127.0.0.1).

A pytest plugin module: the suite's ``tests/conftest.py`` registers it with
``pytest_plugins = ["tests.s3_fixtures"]``; a test module may also import the fixtures by name.

* ``moto_server`` (session): one :class:`~ckptvault.testing.s3server.MotoServer` for the whole run
  (starting one costs about half a second; buckets keep tests apart);
* ``s3_bucket``: a fresh, uniquely named bucket on it; the name is returned;
* ``fault_proxy``: a :class:`~ckptvault.testing.s3proxy.FaultProxy` in front of the server, with no
  faults yet; stopped (and its faults gone) at the end of the test.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from ckptvault.testing.s3proxy import FaultProxy
from ckptvault.testing.s3server import MotoServer


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with MotoServer(log_path=log) as server:
        yield server


@pytest.fixture
def s3_bucket(moto_server: MotoServer) -> str:
    return moto_server.create_bucket(f"test-{uuid.uuid4().hex[:20]}")


@pytest.fixture
def fault_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server) as proxy:
        yield proxy
