"""The S3 test bench itself: a real moto server on loopback, and the fault proxy in front of it.

Every fault kind is shown twice against the real server, with real clients (boto3 and obstore): a
client with retries off sees the fault, a client with retries on gets through it. The S3 backend's
own tests rely on these faults doing exactly what they say.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from typing import Any

import boto3
import obstore
import psutil
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    FlexibleChecksumError,
    ReadTimeoutError,
)
from obstore.store import S3Store

from ckptvault.testing.s3proxy import FAULT_KINDS, FaultProxy
from ckptvault.testing.s3server import MotoServer

KEY = "dir/object.bin"
DATA = bytes(range(256)) * 64  # 16 KiB


def boto_client(endpoint: str, *, retries: bool, read_timeout: float = 60.0) -> Any:
    """boto3 at ``endpoint``. Retries off is ``total_max_attempts=1``: botocore's ``max_attempts=1``
    still allows one retry in standard mode (it counts retries, not attempts)."""
    retry = {"mode": "standard", "total_max_attempts": 4 if retries else 1}
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(
            retries=retry,  # type: ignore[arg-type]
            read_timeout=read_timeout,
            connect_timeout=5,
            s3={"addressing_style": "path"},
        ),
    )


def obstore_store(
    endpoint: str, bucket: str, *, retries: bool, timeout_s: float = 60.0, **config: Any
) -> Any:
    return S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id="testing",
        secret_access_key="testing",
        region="us-east-1",
        client_options={"allow_http": True, "timeout": timedelta(seconds=timeout_s)},
        retry_config={
            "max_retries": 3 if retries else 0,
            "retry_timeout": timedelta(seconds=30),
            "backoff": {"init_backoff": timedelta(milliseconds=10), "max_backoff": timedelta(seconds=1)},
        },
        **config,
    )


# --------------------------------------------------------------------------- the server


def test_server_listens_on_loopback_only(moto_server: MotoServer) -> None:
    assert moto_server.endpoint == f"http://127.0.0.1:{moto_server.port}"
    assert moto_server.pid is not None
    listening = [
        c
        for c in psutil.Process(moto_server.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening, "the server process listens on nothing"
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
    assert {c.laddr.port for c in listening} == {moto_server.port}


def test_env_points_clients_at_the_server(moto_server: MotoServer) -> None:
    env = moto_server.env()
    assert env == {
        "AWS_ENDPOINT_URL": moto_server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def test_create_bucket_put_get_with_boto3_and_obstore(moto_server: MotoServer, s3_bucket: str) -> None:
    client = boto_client(moto_server.endpoint, retries=False)
    client.put_object(Bucket=s3_bucket, Key=KEY, Body=DATA)
    store = obstore_store(moto_server.endpoint, s3_bucket, retries=False)
    assert obstore.get(store, KEY).bytes().to_bytes() == DATA
    obstore.put(store, "from-obstore", b"hello")
    assert client.get_object(Bucket=s3_bucket, Key="from-obstore")["Body"].read() == b"hello"
    names = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert s3_bucket in names


def test_conditional_put_is_enforced(moto_server: MotoServer, s3_bucket: str) -> None:
    store = obstore_store(moto_server.endpoint, s3_bucket, retries=False)
    obstore.put(store, KEY, b"first", mode="create")
    with pytest.raises(obstore.exceptions.AlreadyExistsError):
        obstore.put(store, KEY, b"second", mode="create")
    assert obstore.get(store, KEY).bytes().to_bytes() == b"first"


def test_reset_forgets_everything() -> None:
    with MotoServer() as server:
        bucket = server.create_bucket("bucket1")
        server.client().put_object(Bucket=bucket, Key=KEY, Body=b"x")
        server.reset()
        assert server.client().list_buckets()["Buckets"] == []
        assert server.create_bucket("bucket1") == "bucket1"  # usable again


def test_stop_kills_the_server_and_is_idempotent() -> None:
    server = MotoServer().start()
    pid = server.pid
    assert pid is not None and psutil.pid_exists(pid)
    server.stop()
    server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.endpoint


def test_server_dies_with_a_killed_parent(tmp_path) -> None:
    """A test process killed with SIGKILL (no atexit, no finally) takes its server with it."""
    script = textwrap.dedent(
        """
        import sys, time
        from ckptvault.testing.s3server import MotoServer
        server = MotoServer().start()
        print(server.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        assert psutil.pid_exists(server_pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(server_pid) and time.monotonic() < deadline:
        try:
            if psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    alive = psutil.pid_exists(server_pid) and psutil.Process(server_pid).status() != psutil.STATUS_ZOMBIE
    if alive:  # pragma: no cover - the failure path: do not leak it
        os.killpg(server_pid, signal.SIGKILL)
    assert not alive, "the moto server outlived its killed parent"


def test_start_failure_says_why(tmp_path) -> None:
    with MotoServer() as first:
        log = tmp_path / "moto.log"
        with pytest.raises(RuntimeError, match=r"in use|exited|did not answer"):
            MotoServer(port=first.port, log_path=log, start_timeout=10).start()


# --------------------------------------------------------------------------- the proxy, no faults


def test_proxy_forwards_and_records_requests_with_headers(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    client = boto_client(fault_proxy.endpoint, retries=False)
    client.put_object(Bucket=s3_bucket, Key=KEY, Body=DATA, Metadata={"who": "test"})
    got = client.get_object(Bucket=s3_bucket, Key=KEY)
    assert got["Body"].read() == DATA
    assert got["Metadata"] == {"who": "test"}
    head = client.head_object(Bucket=s3_bucket, Key=KEY)
    assert head["ContentLength"] == len(DATA)
    with pytest.raises(ClientError) as missing:
        client.get_object(Bucket=s3_bucket, Key="missing")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"

    reqs = fault_proxy.requests
    assert [(m, p) for m, p, _ in reqs] == [
        ("PUT", f"/{s3_bucket}/{KEY}"),
        ("GET", f"/{s3_bucket}/{KEY}"),
        ("HEAD", f"/{s3_bucket}/{KEY}"),
        ("GET", f"/{s3_bucket}/missing"),
    ]
    put_headers = reqs[0][2]
    assert put_headers["authorization"].startswith("AWS4-HMAC-SHA256 ")
    assert put_headers["x-amz-meta-who"] == "test"
    assert "x-amz-date" in put_headers
    assert fault_proxy.count("GET") == 2
    assert fault_proxy.count(path_regex="missing$") == 1


def signed(method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
    """SigV4 headers for a hand-made request (moto refuses anonymous reads of private objects)."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    host = url.split("/")[2]
    request = AWSRequest(
        method=method, url=url, headers={**headers, "Host": host, "x-amz-content-sha256": "UNSIGNED-PAYLOAD"}
    )
    S3SigV4Auth(Credentials("testing", "testing"), "s3", "us-east-1").add_auth(request)
    return dict(request.headers.items())


def test_proxy_forwards_chunked_request_bodies_intact(
    fault_proxy: FaultProxy, moto_server: MotoServer, s3_bucket: str
) -> None:
    pieces = [b"a" * 1000, b"b" * 70_000, bytes(range(256)) * 10, b"z"]
    port = int(fault_proxy.endpoint.rsplit(":", 1)[1])
    url = f"{fault_proxy.endpoint}/{s3_bucket}/chunked"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("PUT", f"/{s3_bucket}/chunked", skip_host=True, skip_accept_encoding=True)
    for name, value in signed("PUT", url, {"Transfer-Encoding": "chunked"}).items():
        conn.putheader(name, value)
    conn.endheaders()
    for piece in pieces:
        conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()
    # The client connection is kept alive: a second request on it works too.
    conn.putrequest("GET", f"/{s3_bucket}/chunked", skip_host=True, skip_accept_encoding=True)
    for name, value in signed("GET", url, {}).items():
        conn.putheader(name, value)
    conn.endheaders()
    second = conn.getresponse()
    assert second.status == 200
    assert second.read() == b"".join(pieces)
    conn.close()
    stored = moto_server.client().get_object(Bucket=s3_bucket, Key="chunked")["Body"].read()
    assert stored == b"".join(pieces)
    assert fault_proxy.requests[0][2]["transfer-encoding"] == "chunked"
    assert len(fault_proxy.requests) == 2


def test_proxy_carries_multipart_uploads(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    store = obstore_store(fault_proxy.endpoint, s3_bucket, retries=False)
    data = os.urandom(12 * 1024 * 1024)
    with obstore.open_writer(store, "mp", buffer_size=5 * 1024 * 1024) as writer:
        writer.write(data)
    assert obstore.get(store, "mp").bytes().to_bytes() == data
    assert fault_proxy.count("PUT", r"partNumber=") >= 2
    assert fault_proxy.count("POST", r"\?uploads") == 1


def test_obstore_sends_sha256_checksums_when_asked(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    """What obstore puts on the wire with ``checksum_algorithm="sha256"`` (seen through the proxy)."""
    store = obstore_store(fault_proxy.endpoint, s3_bucket, retries=False, checksum_algorithm="sha256")
    obstore.put(store, "small", b"abc")
    headers = fault_proxy.requests[-1][2]
    assert headers["x-amz-checksum-sha256"] == "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="
    plain = obstore_store(fault_proxy.endpoint, s3_bucket, retries=False)
    obstore.put(plain, "small2", b"abc")
    assert "x-amz-checksum-sha256" not in fault_proxy.requests[-1][2]


# --------------------------------------------------------------------------- fault selection


def test_nth_put_matching_a_path(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    fault = fault_proxy.add_fault("503", nth=3, method="PUT", path_regex=r"/manifest")
    client = boto_client(fault_proxy.endpoint, retries=False)
    outcomes = []
    for key in ["a/manifest", "data", "b/manifest", "c/manifest", "d/manifest"]:
        try:
            client.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
            outcomes.append("ok")
        except ClientError as exc:
            outcomes.append(exc.response["Error"]["Code"])
    assert outcomes == ["ok", "ok", "ok", "SlowDown", "ok"]
    assert fault.fired == 1 and fault.seen == 4


def test_every_kth_request_and_times(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    fault = fault_proxy.add_fault("500", every=2, method="GET", times=2)
    client = boto_client(fault_proxy.endpoint, retries=False)
    client.put_object(Bucket=s3_bucket, Key=KEY, Body=b"x")
    outcomes = []
    for _ in range(6):
        try:
            client.get_object(Bucket=s3_bucket, Key=KEY)["Body"].read()
            outcomes.append("ok")
        except ClientError as exc:
            outcomes.append(exc.response["Error"]["Code"])
    assert outcomes == ["ok", "InternalError", "ok", "InternalError", "ok", "ok"]
    assert fault.fired == 2
    fault_proxy.clear_faults()
    assert fault_proxy.faults == []


def test_bad_fault_arguments_are_refused(fault_proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        fault_proxy.add_fault("teapot")
    with pytest.raises(ValueError, match="not both"):
        fault_proxy.add_fault("500", nth=1, every=2)
    with pytest.raises(ValueError, match="count from 1"):
        fault_proxy.add_fault("500", nth=0)


# --------------------------------------------------------------------------- each fault kind

# What a client without retries sees, per kind (boto3's exception types).
BOTO_SEES: dict[str, tuple[type[BaseException], ...]] = {
    "500": (ClientError,),
    "503": (ClientError,),
    "reset": (ConnectionClosedError, EndpointConnectionError),
    "stall": (ReadTimeoutError,),
    "drop_after_forward": (ConnectionClosedError, EndpointConnectionError),
}
STALL_S = 2.5
CLIENT_TIMEOUT_S = 1.0


@pytest.mark.parametrize("kind", sorted(BOTO_SEES))
def test_boto3_put_sees_the_fault_without_retries(
    kind: str, fault_proxy: FaultProxy, moto_server: MotoServer, s3_bucket: str
) -> None:
    fault = fault_proxy.add_fault(kind, method="PUT", seconds=STALL_S)
    client = boto_client(fault_proxy.endpoint, retries=False, read_timeout=CLIENT_TIMEOUT_S)
    with pytest.raises(BOTO_SEES[kind]) as seen:
        client.put_object(Bucket=s3_bucket, Key=KEY, Body=DATA)
    assert fault.fired == 1
    assert fault_proxy.count("PUT") == 1  # one attempt only
    if kind in ("500", "503"):
        code = {"500": "InternalError", "503": "SlowDown"}[kind]
        assert isinstance(seen.value, ClientError)
        assert seen.value.response["Error"]["Code"] == code
        assert seen.value.response["ResponseMetadata"]["HTTPStatusCode"] == int(kind)
    if kind == "stall":
        time.sleep(STALL_S + 0.5)  # let the stalled request find its client gone
    landed = moto_server.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 1
    # Only drop_after_forward lets the request take effect although the client saw a failure.
    assert landed == (kind == "drop_after_forward")


@pytest.mark.parametrize("kind", sorted(BOTO_SEES))
def test_boto3_put_gets_through_the_fault_with_retries(
    kind: str, fault_proxy: FaultProxy, moto_server: MotoServer, s3_bucket: str
) -> None:
    fault = fault_proxy.add_fault(kind, method="PUT", seconds=STALL_S)
    client = boto_client(fault_proxy.endpoint, retries=True, read_timeout=CLIENT_TIMEOUT_S)
    client.put_object(Bucket=s3_bucket, Key=KEY, Body=DATA)
    assert fault.fired == 1
    assert fault_proxy.count("PUT") == 2
    attempts = [h.get("amz-sdk-request", "") for m, _, h in fault_proxy.requests if m == "PUT"]
    assert attempts[0].startswith("attempt=1") and attempts[1].startswith("attempt=2")
    assert moto_server.client().get_object(Bucket=s3_bucket, Key=KEY)["Body"].read() == DATA


@pytest.mark.parametrize("kind", sorted(BOTO_SEES))
def test_boto3_get_sees_then_gets_through_the_fault(
    kind: str, fault_proxy: FaultProxy, s3_bucket: str
) -> None:
    boto_client(fault_proxy.endpoint, retries=False).put_object(Bucket=s3_bucket, Key=KEY, Body=DATA)
    fault_proxy.add_fault(kind, method="GET", seconds=STALL_S)
    plain = boto_client(fault_proxy.endpoint, retries=False, read_timeout=CLIENT_TIMEOUT_S)
    with pytest.raises(BOTO_SEES[kind]):
        plain.get_object(Bucket=s3_bucket, Key=KEY)["Body"].read()
    fault_proxy.add_fault(kind, method="GET", seconds=STALL_S)
    retrying = boto_client(fault_proxy.endpoint, retries=True, read_timeout=CLIENT_TIMEOUT_S)
    assert retrying.get_object(Bucket=s3_bucket, Key=KEY)["Body"].read() == DATA
    assert fault_proxy.count("GET") == 3


@pytest.mark.parametrize("kind", sorted(BOTO_SEES))
def test_obstore_put_sees_the_fault_without_retries_and_gets_through_with(
    kind: str, fault_proxy: FaultProxy, moto_server: MotoServer, s3_bucket: str
) -> None:
    fault_proxy.add_fault(kind, method="PUT", seconds=STALL_S)
    plain = obstore_store(fault_proxy.endpoint, s3_bucket, retries=False, timeout_s=CLIENT_TIMEOUT_S)
    with pytest.raises(obstore.exceptions.GenericError) as seen:
        obstore.put(plain, KEY, DATA)
    if kind in ("500", "503"):
        assert f"{kind} " in str(seen.value)
    assert fault_proxy.count("PUT") == 1

    fault = fault_proxy.add_fault(kind, method="PUT", seconds=STALL_S)
    retrying = obstore_store(fault_proxy.endpoint, s3_bucket, retries=True, timeout_s=CLIENT_TIMEOUT_S)
    obstore.put(retrying, "second", DATA)
    assert fault.fired == 1
    assert fault_proxy.count("PUT", "/second$") == 2
    assert moto_server.client().get_object(Bucket=s3_bucket, Key="second")["Body"].read() == DATA


def test_drop_after_forward_on_a_create_is_not_retried_by_obstore(
    fault_proxy: FaultProxy, s3_bucket: str
) -> None:
    """The case the fault exists for: a conditional create that landed, then failed on the wire.

    obstore (object_store) does not retry a ``mode="create"`` PUT after a connection error, retries
    on or not (a conditional request is not idempotent), so the caller gets an error for a write that
    took effect: whoever uses create-if-absent must read back to learn the outcome. An unconditional
    PUT, by contrast, is retried (see the tests above).
    """
    fault_proxy.add_fault("drop_after_forward", method="PUT")
    retrying = obstore_store(fault_proxy.endpoint, s3_bucket, retries=True)
    with pytest.raises(obstore.exceptions.GenericError, match="error sending request"):
        obstore.put(retrying, KEY, DATA, mode="create")
    assert fault_proxy.count("PUT") == 1
    assert fault_proxy.requests[0][2]["if-none-match"] == "*"
    assert obstore.get(retrying, KEY).bytes().to_bytes() == DATA  # it landed
    with pytest.raises(obstore.exceptions.AlreadyExistsError):  # and a retry by hand is refused
        obstore.put(retrying, KEY, DATA, mode="create")


def test_corrupt_flips_one_byte_of_the_answer(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    client = boto_client(fault_proxy.endpoint, retries=True)
    client.put_object(Bucket=s3_bucket, Key=KEY, Body=DATA)  # boto3 stores a CRC32 with it
    fault = fault_proxy.add_fault("corrupt", method="GET")
    # boto3 checks the stored checksum on the way back: it sees the flip.
    with pytest.raises(FlexibleChecksumError):
        client.get_object(Bucket=s3_bucket, Key=KEY)["Body"].read()
    assert fault.fired == 1
    assert client.get_object(Bucket=s3_bucket, Key=KEY)["Body"].read() == DATA  # the next read is clean

    # obstore does not check what it reads: it returns the flipped bytes as they came.
    fault_proxy.add_fault("corrupt", method="GET")
    store = obstore_store(fault_proxy.endpoint, s3_bucket, retries=True)
    got = obstore.get(store, KEY).bytes().to_bytes()
    assert len(got) == len(DATA) and got != DATA
    assert sum(a != b for a, b in zip(got, DATA, strict=True)) == 1
    assert obstore.get(store, KEY).bytes().to_bytes() == DATA


def test_reset_is_a_tcp_rst(fault_proxy: FaultProxy, s3_bucket: str) -> None:
    fault_proxy.add_fault("reset")
    port = int(fault_proxy.endpoint.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", f"/{s3_bucket}/{KEY}")
    with pytest.raises(ConnectionResetError):
        conn.getresponse()
    conn.close()


def test_all_kinds_are_covered() -> None:
    assert set(FAULT_KINDS) == {*BOTO_SEES, "corrupt"}


def test_stop_cuts_stalled_requests(moto_server: MotoServer, s3_bucket: str) -> None:
    proxy = FaultProxy(moto_server).start()
    proxy.add_fault("stall", seconds=60)
    client = boto_client(proxy.endpoint, retries=False, read_timeout=30)
    started = time.monotonic()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.head_bucket(Bucket=s3_bucket)
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    while not proxy.requests:
        time.sleep(0.01)
    proxy.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert errors, "the stalled request should have failed when the proxy stopped"
    assert time.monotonic() - started < 10
