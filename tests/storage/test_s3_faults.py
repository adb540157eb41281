"""The object-store backend under network faults, through a fault proxy in front of a real S3 server.

Each loop injects one fault at the n-th request of a whole save (data files, multipart parts, the
manifest's conditional PUT), for every n. With the client's retries on, every save lands and reads
back bit for bit; with retries off, a save either commits whole or raises a typed StorageError, and
in both cases the previous checkpoint is untouched, nothing partial is visible, and a new save
succeeds. "drop_after_forward" -- the request took effect, its answer was lost -- is the hard one:
a retried conditional manifest PUT is then refused, and the backend must see that the manifest it
finds is its own.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import ckptvault as cv
from ckptvault.engine.loading import read_checkpoint
from ckptvault.engine.verify import verify_checkpoint
from ckptvault.errors import CheckpointError, CheckpointNotFoundError, StorageError
from ckptvault.storage.s3 import S3Storage
from ckptvault.testing.s3proxy import FaultProxy
from ckptvault.testing.s3server import MotoServer

from .conftest import s3_storage

STATE = {
    "w": np.arange(11 << 20, dtype=np.uint8).reshape(11, 1 << 20),  # 11 MiB: a 3-part upload
    "b": np.linspace(0, 1, 1000, dtype=np.float32),
    "step": 7,
}
PART = 5 << 20  # the smallest part S3 takes, so the 11 MiB file goes in three parts


def storage_via(proxy: FaultProxy, server: MotoServer, bucket: str, **options: object) -> S3Storage:
    """A backend whose every request goes through the proxy; dead saves' data has no grace."""
    return s3_storage(
        server, bucket, endpoint=proxy.endpoint, part_bytes=PART, orphan_grace_seconds=0.0, **options
    )


def check_whole(storage: S3Storage, key: str) -> None:
    report = verify_checkpoint(storage, key)
    assert report.ok, report.problems
    state = read_checkpoint(storage, key, map_location="cpu", verify=True, threads=2, mapped=False)
    assert np.array_equal(state["w"], STATE["w"]) and np.array_equal(state["b"], STATE["b"])


def count_requests(proxy: FaultProxy, storage: S3Storage, key: str) -> int:
    proxy.clear_requests()
    cv.save(key, STATE, storage=storage)
    return len(proxy.requests)


@pytest.mark.parametrize("kind", ["503", "500", "reset", "drop_after_forward"])
def test_every_request_of_a_save_survives_a_fault_with_retries(
    moto_server: MotoServer, s3_bucket: str, fault_proxy: FaultProxy, kind: str
) -> None:
    storage = storage_via(fault_proxy, moto_server, s3_bucket, max_retries=3)
    base = f"s3://{s3_bucket}/run"
    total = count_requests(fault_proxy, storage, f"{base}/probe")
    assert total >= 6  # lookups, several parts, the manifest: the loop below covers each
    for n in range(1, total + 1):
        fault_proxy.clear_faults()
        fault = fault_proxy.add_fault(kind, nth=n)
        key = f"{base}/step-{n}"
        cv.save(key, STATE, storage=storage)
        assert fault.fired == 1, f"fault {kind} at request {n} never fired"
        fault_proxy.clear_faults()
        check_whole(storage, key)


@pytest.mark.parametrize("kind", ["503", "reset", "drop_after_forward"])
def test_without_retries_a_save_commits_whole_or_raises_typed_and_loses_nothing(
    moto_server: MotoServer, s3_bucket: str, fault_proxy: FaultProxy, kind: str
) -> None:
    storage = storage_via(fault_proxy, moto_server, s3_bucket, max_retries=0)
    base = f"s3://{s3_bucket}/run"
    cv.save(f"{base}/good", STATE, storage=storage)
    total = count_requests(fault_proxy, storage, f"{base}/probe")
    outcomes = {"committed": 0, "refused": 0}
    for n in range(1, total + 1):
        fault_proxy.clear_faults()
        fault_proxy.add_fault(kind, nth=n)
        key = f"{base}/step-{n}"
        try:
            cv.save(key, STATE, storage=storage)
            committed = True
        except CheckpointError as exc:  # typed: StorageError (or a subclass) naming the object
            assert isinstance(exc, StorageError), repr(exc)
            assert s3_bucket in str(exc)
            committed = False
        fault_proxy.clear_faults()
        listed = {e.name: e.kind for e in storage.list(base)}
        if committed:
            check_whole(storage, key)
        elif listed.get(f"step-{n}") == "checkpoint":
            check_whole(storage, key)  # the commit landed before the failure: whole
        else:
            with pytest.raises(CheckpointNotFoundError):
                storage.open(key)
        outcomes["committed" if committed else "refused"] += 1
        check_whole(storage, f"{base}/good")  # the earlier checkpoint never suffers
        cv.save(f"{base}/again-{n}", STATE, storage=storage)  # and the next save goes through
        check_whole(storage, f"{base}/again-{n}")
    assert outcomes["refused"] > 0  # the faults did bite
    storage.recover(base)  # the grace period is 0 here: every dead save's data goes
    saves = storage.client.list_all("run/.ckptvault-saves/")
    names = {m.path.split("/")[2] for m in saves}  # run/.ckptvault-saves/<name>/<save id>/<file>
    committed_names = {e.name for e in storage.list(base) if e.kind == "checkpoint"}
    assert names <= committed_names


def test_a_stalled_commit_times_out_into_a_typed_error_and_lands_whole_or_never(
    moto_server: MotoServer, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    storage = storage_via(fault_proxy, moto_server, s3_bucket, max_retries=0, request_timeout_seconds=1.0)
    fault_proxy.add_fault("stall", method="PUT", path_regex=r"manifest\.json", seconds=2.0)
    key = f"s3://{s3_bucket}/run/step-1"
    with pytest.raises(StorageError, match="appears whole later or never"):
        cv.save(key, STATE, storage=storage)
    time.sleep(3.0)  # the stalled PUT reaches the server after its client gave up
    fault_proxy.clear_faults()
    if any(e.name == "step-1" and e.kind == "checkpoint" for e in storage.list(f"s3://{s3_bucket}/run")):
        check_whole(storage, key)  # it landed late: its data was kept, so it is whole
    else:
        with pytest.raises(CheckpointNotFoundError):
            storage.open(key)


def test_a_corrupted_download_is_caught_by_the_digests(
    moto_server: MotoServer, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    storage = storage_via(fault_proxy, moto_server, s3_bucket, max_retries=0)
    key = f"s3://{s3_bucket}/run/step-1"
    cv.save(key, STATE, storage=storage)
    fault_proxy.add_fault(
        "corrupt", method="GET", path_regex=r"\.ckptvault-saves/.*\.safetensors", times=None
    )
    report = verify_checkpoint(storage, key)
    assert not report.ok
    fault_proxy.clear_faults()
    check_whole(storage, key)  # the stored bytes were fine all along


def test_every_put_carries_a_checksum_the_server_can_verify(
    moto_server: MotoServer, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    storage = storage_via(fault_proxy, moto_server, s3_bucket)
    fault_proxy.clear_requests()
    cv.save(f"s3://{s3_bucket}/run/step-1", STATE, storage=storage)
    puts = [(path, headers) for method, path, headers in fault_proxy.requests if method == "PUT"]
    assert len(puts) >= 4
    for path, headers in puts:
        assert "x-amz-checksum-sha256" in headers, path
        assert headers.get("x-amz-content-sha256", "").lower() != "unsigned-payload", path
    manifest = [h for p, h in puts if p.split("?")[0].endswith("/manifest.json")]
    assert manifest and manifest[0].get("if-none-match") == "*"
