"""A saving process SIGKILLed mid-upload: during a multipart upload's parts, and during the
manifest's PUT. The proxy holds the chosen request, so the kill lands exactly there. Afterwards the
earlier checkpoint is whole, the killed one is absent (never partial), the next save goes through,
and recover() (grace 0 here) removes every object the dead save left; an upload the process never
completed or aborted stays invisible (a bucket lifecycle rule ends it: docs/format.md §14)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import ckptvault as cv
from ckptvault.engine.verify import verify_checkpoint
from ckptvault.errors import CheckpointNotFoundError
from ckptvault.testing.s3proxy import FaultProxy
from ckptvault.testing.s3server import MotoServer

from .conftest import s3_storage

SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import ckptvault as cv
    from ckptvault.storage.s3 import S3Storage

    endpoint, bucket, key = sys.argv[1:4]
    storage = S3Storage(
        f"s3://{bucket}", endpoint=endpoint, part_bytes=5 << 20, max_retries=0,
        config={"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"},
    )
    print("saving", flush=True)
    cv.save(key, {"w": np.ones(12 << 20, dtype=np.uint8)}, storage=storage)
    print("saved", flush=True)
    """
)


@pytest.mark.parametrize(
    ("where", "method", "path_regex"),
    [
        ("a multipart part", "PUT", r"partNumber=2"),
        ("the manifest PUT", "PUT", r"/manifest\.json"),
    ],
)
def test_sigkill_mid_upload_leaves_nothing_partial(
    moto_server: MotoServer, s3_bucket: str, fault_proxy: FaultProxy, where: str, method: str, path_regex: str
) -> None:
    storage = s3_storage(moto_server, s3_bucket, orphan_grace_seconds=0.0)
    base = f"s3://{s3_bucket}/run"
    cv.save(f"{base}/good", {"w": np.arange(1000)}, storage=storage)
    fault = fault_proxy.add_fault("stall", method=method, path_regex=path_regex, seconds=60.0)
    child = subprocess.Popen(
        [sys.executable, "-c", SAVER, fault_proxy.endpoint, s3_bucket, f"{base}/killed"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        deadline = time.monotonic() + 60
        while fault.fired == 0:  # the request is held by the proxy: the process is right there
            assert child.poll() is None, f"the saver exited ({child.returncode}) before reaching {where}"
            assert time.monotonic() < deadline, f"the saver never reached {where}"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        assert child.stdout is not None
        child.stdout.close()
    fault_proxy.clear_faults()
    assert {e.name: e.kind for e in storage.list(base)} == {"good": "checkpoint"}
    with pytest.raises(CheckpointNotFoundError):
        storage.open(f"{base}/killed")
    assert verify_checkpoint(storage, f"{base}/good").ok
    cv.save(f"{base}/killed", {"w": np.ones(10, dtype=np.uint8)}, storage=storage)  # the name is free
    assert verify_checkpoint(storage, f"{base}/killed").ok
    storage.recover(base)
    left = {m.path.split("/")[3] for m in storage.client.list_all("run/.ckptvault-saves/")}
    committed = {storage.open(f"{base}/{name}")._area.rpartition("/")[2] for name in ("good", "killed")}
    assert left == committed  # the dead save's objects are gone, the committed ones all kept
    uploads = moto_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    if where == "a multipart part":
        assert uploads  # the dead process could not abort it: invisible, ended by the lifecycle rule
