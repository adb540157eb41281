"""A bucket written by an attacker: objects planted with another client (boto3) must be refused
with typed errors, never followed to other keys, never read beyond their caps."""

from __future__ import annotations

import errno
import json

import pytest

from ckptvault.config import MANIFEST_NAME
from ckptvault.engine.verify import verify_checkpoint
from ckptvault.errors import CorruptCheckpointError, StorageError
from ckptvault.testing.s3server import MotoServer

from .conftest import s3_storage


def plant(server: MotoServer, bucket: str, key: str, body: bytes, save: str | None = None) -> None:
    extra = {"Metadata": {"ckptvault-save": save}} if save is not None else {}
    server.client().put_object(Bucket=bucket, Key=key, Body=body, **extra)


@pytest.mark.parametrize("save", ["../../secret", "0" * 31, "Z" * 32, "a" * 32 + "/x"])
def test_a_manifest_naming_a_malformed_save_id_is_refused(
    moto_server: MotoServer, s3_bucket: str, save: str
) -> None:
    plant(moto_server, s3_bucket, f"run/ckpt/{MANIFEST_NAME}", b"{}", save=save)
    plant(moto_server, s3_bucket, "secret/data.bin", b"not yours")
    storage = s3_storage(moto_server, s3_bucket)
    with pytest.raises(CorruptCheckpointError, match="not a save id"):
        storage.open(f"s3://{s3_bucket}/run/ckpt")
    report = verify_checkpoint(storage, f"s3://{s3_bucket}/run/ckpt")
    assert not report.ok and report.problems[0].kind == "bad-manifest"


def test_keys_never_climb(moto_server: MotoServer, s3_bucket: str) -> None:
    storage = s3_storage(moto_server, s3_bucket)
    for key in (f"s3://{s3_bucket}/run/../other", f"s3://{s3_bucket}/../x"):
        with pytest.raises(StorageError, match="never names a key"):
            storage.get(key, max_bytes=10)
    with pytest.raises(StorageError) as caught:
        storage.get("s3://another-bucket/run/run.json", max_bytes=10)
    assert caught.value.errno == errno.EXDEV  # one backend, one bucket


def test_an_oversized_document_is_refused_before_its_body_is_read(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    plant(moto_server, s3_bucket, "run/run.json", b"x" * 100_000)
    storage = s3_storage(moto_server, s3_bucket)
    with pytest.raises(StorageError, match="more than 1000") as caught:
        storage.get(f"s3://{s3_bucket}/run/run.json", max_bytes=1000)
    assert caught.value.errno == errno.EFBIG


def test_a_damaged_lease_reads_as_expired_never_as_held_forever(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    plant(moto_server, s3_bucket, "run/.ckptvault-run.lock", b"\x00garbage{")
    storage = s3_storage(moto_server, s3_bucket)
    lease = storage.acquire_lease(f"s3://{s3_bucket}/run/.ckptvault-run.lock", owner="me", ttl_seconds=60)
    stored = json.loads(storage.get(lease.key, max_bytes=4096).data)  # type: ignore[union-attr]
    assert stored["owner"] == "me"
    lease.release()


def test_a_checkpoint_copied_in_by_another_tool_is_read_beside_its_manifest(
    moto_server: MotoServer, s3_bucket: str, tmp_path: object
) -> None:
    """`aws s3 sync` of a local checkpoint directory: no save id, files beside the manifest."""
    import numpy as np

    import ckptvault as cv
    from ckptvault.storage.local import LocalStorage

    local = f"{tmp_path}/ckpt"
    cv.save(local, {"w": np.arange(100, dtype=np.float32)})
    handle = LocalStorage().open(local)
    for name in handle.file_names():
        plant(moto_server, s3_bucket, f"synced/ckpt/{name}", handle.read(name, 0, handle.size(name)))
    handle.close()
    storage = s3_storage(moto_server, s3_bucket)
    assert verify_checkpoint(storage, f"s3://{s3_bucket}/synced/ckpt").ok
