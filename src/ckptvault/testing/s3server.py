"""A real S3-compatible server on loopback, and a programmable faulty network in front of it.

Why: the object-storage backend must be shown to work against a real HTTP server (real request
signing, real multipart uploads, real conditional writes), not against an in-process mock that
patches the client. And its retry and recovery logic must be shown to survive what real networks and
real object stores do: 500 and 503 answers, connections reset mid-request, answers that never come,
requests that took effect although the client never learnt it, and bytes flipped in flight. Waiting
for those to happen is not a test; :class:`FaultProxy` makes each of them happen on the request of
our choosing.

* :class:`MotoServer` -- ``moto`` in server mode (``python -m moto.server``) as a subprocess bound
  to 127.0.0.1 only, on a free port, in its own process group, killed at ``stop()``, at interpreter
  exit and (Linux) when its parent dies, so a crashed test run leaves no server behind;
* :class:`FaultProxy` -- an HTTP/1.1 forwarding proxy on 127.0.0.1 in front of such a server; a
  client pointed at ``proxy.endpoint`` sees the server, except where a fault added with
  :meth:`FaultProxy.add_fault` says otherwise; every request is recorded with its headers.

moto and boto3 are development dependencies, imported only when a method needs them; importing this
module costs nothing else. Not for production use.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "FaultProxy",
    "MotoServer",
    "free_port",
]

LOOPBACK = "127.0.0.1"

#: What :meth:`FaultProxy.add_fault` can do to a request (see there).
FAULT_KINDS = ("500", "503", "reset", "stall", "drop_after_forward", "corrupt")

_S3_ERRORS = {
    "500": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}

# Hop-by-hop headers (RFC 9110 7.6.1) plus Expect, which the proxy answers itself: never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel's pick for port 0).

    Another process may take it before the caller binds it; :class:`MotoServer` retries on a new port
    when its server dies at start.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- moto server

_LIVE_SERVERS: set[MotoServer] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_servers() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE_SERVERS)
    for server in servers:
        server.stop()


atexit.register(_stop_all_servers)


def _prctl() -> Any:
    """libc's prctl, looked up in the parent (the child must do as little as possible before exec)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent_fn() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when the thread that forked it dies
    (``PR_SET_PDEATHSIG``); None where that is not available.

    atexit does not run when the test process is itself SIGKILLed (a pytest-timeout in thread mode, an
    OOM kill, a CI runner cancelling the job); this does. The function runs in the child between fork
    and exec, so everything it needs is looked up here, in the parent.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = _prctl()
    if prctl is None:
        return None
    parent, kill = os.getpid(), int(signal.SIGKILL)

    def preexec() -> None:  # pragma: no cover - runs in the child
        prctl(1, kill, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1 and a free port, as a context manager.

    Why a subprocess and not moto's in-process ``mock_aws``: the client under test (obstore is Rust)
    must speak real HTTP to a real server; ``mock_aws`` only patches botocore in this process. Why
    loopback only: the server accepts any credentials, so it must not be reachable from elsewhere.

    The server keeps every bucket and object in its own memory (objects over ~5 MiB spill to temporary
    files); :meth:`reset` forgets all of them at once. Its process runs in its own process group
    (``stop()`` kills the group), is killed at interpreter exit, and on Linux dies with the thread that
    started it (``PR_SET_PDEATHSIG``): start it from a thread that lives as long as the server (the
    main thread, as pytest fixtures are).
    """

    ACCESS_KEY = "testing"
    SECRET_KEY = "testing"
    REGION = "us-east-1"

    def __init__(
        self,
        *,
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self._want_port = port
        self._log_path = Path(log_path) if log_path is not None else None
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._client: Any = None

    # -- life cycle

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The server process's id (also its process group's), None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MotoServer:
        """Start the server and return once it answers HTTP; ``RuntimeError`` (with its log) if not.

        A port taken between :func:`free_port` and the server's bind shows as a server that exits at
        once; then a new port is tried (twice at most, and never when a port was given).
        """
        if self.running:
            return self
        attempts = 1 if self._want_port is not None else 3
        last_error: RuntimeError | None = None
        for _ in range(attempts):
            try:
                self._start_once(self._want_port or free_port())
                return self
            except _ExitedEarly as exc:
                last_error = RuntimeError(str(exc))
        assert last_error is not None
        raise last_error

    def _start_once(self, port: int) -> None:
        import importlib.util

        # Another server on the port would answer the readiness poll for ours: refuse it up front.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError as exc:
                raise _ExitedEarly(f"port {LOOPBACK}:{port} is in use ({exc})") from None

        if importlib.util.find_spec("moto") is None:
            raise RuntimeError(
                "MotoServer needs moto[server] (a development dependency): pip install 'moto[server]'"
            )
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            log_target: Any = open(self._log_path, "wb")  # noqa: SIM115 - the child owns it until stop
        else:
            log_target = subprocess.DEVNULL
        env = dict(os.environ)
        # The server process must not pick up proxies or a developer's real AWS settings.
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE"):
            env.pop(key, None)
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log_target,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stop() kills moto and anything it forks
                preexec_fn=_die_with_parent_fn(),
            )
        finally:
            if log_target is not subprocess.DEVNULL:
                log_target.close()
        self._proc, self._port = proc, port
        with _LIVE_LOCK:
            _LIVE_SERVERS.add(self)
        deadline = time.monotonic() + self._start_timeout
        while True:
            if proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise _ExitedEarly(
                    f"moto server on {LOOPBACK}:{port} exited with status {proc.returncode} at start"
                    + (f"; log tail:\n{tail}" if tail else "")
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(
                    f"moto server on {LOOPBACK}:{port} did not answer within {self._start_timeout:.0f} s"
                    + (f"; log tail:\n{tail}" if tail else " (pass log_path= to keep its log)")
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with _opener.open(f"{self.endpoint}/moto-api/", timeout=1.0) as resp:
                resp.read()
            return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is serving
        except (OSError, http.client.HTTPException):
            return False

    def log_tail(self, nbytes: int = 4000) -> str:
        """The end of the server's log ('' when it is not kept: no ``log_path``)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        data = self._log_path.read_bytes()[-nbytes:]
        return data.decode("utf-8", "replace")

    def stop(self) -> None:
        """Kill the server's process group and reap it (idempotent; all state is lost)."""
        proc, self._proc = self._proc, None
        with _LIVE_LOCK:
            _LIVE_SERVERS.discard(self)
        self._client = None
        if proc is None:
            return
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Whatever the group forked and left behind goes too (the leader is gone; the group id lives on).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    # -- use

    @property
    def port(self) -> int:
        if self._port is None or not self.running:
            raise RuntimeError("MotoServer is not running (use it as a context manager, or call start())")
        return self._port

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment variables that point boto3, obstore and s3fs-style clients at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_REGION": self.REGION,
            "AWS_ALLOW_HTTP": "true",
        }

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client on this server (path-style addressing); ``config``: ``botocore.config.Config``
        arguments, e.g. ``retries={"max_attempts": 1}``. Without arguments, one cached client."""
        if not config and self._client is not None:
            return self._client
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            region_name=self.REGION,
            config=Config(s3={"addressing_style": "path"}, **config),
        )
        if not config:
            self._client = client
        return client

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket and return its name (default: a fresh unique one, ``bucket-<hex>``)."""
        name = name or f"bucket-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def reset(self) -> None:
        """Forget every bucket and object (moto's ``POST /moto-api/reset``)."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", data=b"", method="POST")
        with _opener.open(req, timeout=30.0) as resp:
            resp.read()


class _ExitedEarly(RuntimeError):
    pass


# urllib without the environment's proxies: the server is on loopback.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- fault proxy


@dataclass
class Fault:
    """One programmed fault (made by :meth:`FaultProxy.add_fault`); ``fired`` counts what it did."""

    kind: str
    nth: int | None = None
    every: int | None = None
    method: str | None = None
    path_regex: str | None = None
    times: int | None = 1
    seconds: float = 30.0
    seen: int = 0
    fired: int = 0
    _pattern: re.Pattern[str] | None = field(default=None, repr=False)

    def _matches(self, method: str, path: str) -> bool:
        if self.method is not None and method.upper() != self.method.upper():
            return False
        return self._pattern is None or self._pattern.search(path) is not None

    def _consider(self, method: str, path: str, *, may_fire: bool) -> bool:
        """Count a matching request; True if this fault fires on it (never when ``may_fire`` is False:
        an earlier fault fires on it). Called under the proxy's lock."""
        if not self._matches(method, path):
            return False
        self.seen += 1
        if not may_fire:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        if self.every is not None:
            fire = self.seen % self.every == 0
        elif self.nth is not None:
            fire = self.seen >= self.nth
        else:
            fire = True
        if fire:
            self.fired += 1
        return fire


@dataclass
class _Upstream:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real endpoint: clients reuse their connections
    timeout = 300  # an idle keep-alive connection ends after this long
    server: _ProxyServer

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None
        self.server.proxy._track(self.connection, add=True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        if self._upstream is not None:
            self._upstream.close()
        self.server.proxy._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet; the requests are in FaultProxy.requests

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = do_GET

    # -- one request

    def _handle(self) -> None:
        proxy = self.server.proxy
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            body = self._read_body(headers)
        except (OSError, ValueError):
            self.close_connection = True
            return
        fault = proxy._record_and_match(self.command, self.path, headers)
        kind = fault.kind if fault is not None else None
        if kind in _S3_ERRORS:
            self._send_s3_error(kind)
            return
        if kind == "reset":
            self._reset()
            return
        if kind == "stall":
            assert fault is not None
            proxy._stopping.wait(fault.seconds)
            if proxy._stopping.is_set() or self._client_gone():
                # The client gave up (timed out): like a request lost before the server, it never lands.
                self.close_connection = True
                return
        try:
            answer = self._forward(body, headers)
        except (OSError, http.client.HTTPException) as exc:
            self._send_gateway_error(exc)
            return
        if kind == "drop_after_forward":
            self._reset()
            return
        if kind == "corrupt" and answer.body:
            flipped = bytearray(answer.body)
            flipped[len(flipped) // 2] ^= 0xFF
            answer.body = bytes(flipped)
        self._relay(answer)

    def _read_body(self, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size_line = self.rfile.readline(65537)
                if not size_line:
                    raise ValueError("connection closed inside a chunked body")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers: dropped
                    return b"".join(parts)
                parts.append(self._read_exactly(size))
                self.rfile.readline(3)  # the CRLF after each chunk
        length = int(headers.get("content-length", "0") or 0)
        return self._read_exactly(length)

    def _read_exactly(self, n: int) -> bytes:
        data = self.rfile.read(n) if n else b""
        if len(data) != n:
            raise ValueError("connection closed inside a body")
        return data

    def _forward(self, body: bytes, headers: dict[str, str]) -> _Upstream:
        """Send the request upstream (one kept-alive connection per client connection) and read all of
        the answer; a kept-alive upstream connection that went stale is retried once on a fresh one."""
        proxy = self.server.proxy
        for attempt in (0, 1):
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(
                    proxy._up_host, proxy._up_port, timeout=proxy.upstream_timeout
                )
            conn = self._upstream
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        conn.putheader(name, value)
                if body or self.command in ("PUT", "POST", "PATCH") or "content-length" in headers:
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
                answer = _Upstream(resp.status, resp.reason, resp.getheaders(), data)
                if resp.will_close:
                    conn.close()
                    self._upstream = None
                return answer
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                self._upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _relay(self, answer: _Upstream) -> None:
        try:
            self.send_response_only(answer.status, answer.reason)
            upstream_length = None
            for name, value in answer.headers:
                low = name.lower()
                if low == "content-length":
                    upstream_length = value
                    continue
                if low in _HOP_BY_HOP:
                    continue
                self.send_header(name, value)
            if self.command == "HEAD" or answer.status in (204, 304) or 100 <= answer.status < 200:
                if upstream_length is not None:
                    self.send_header("Content-Length", upstream_length)
                self.end_headers()
            else:
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _send_s3_error(self, kind: str) -> None:
        status, reason, code, message = _S3_ERRORS[kind]
        request_id = uuid.uuid4().hex[:16].upper()
        resource = self.path.split("?", 1)[0]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource>"
            f"<RequestId>{request_id}</RequestId><HostId>faultproxy</HostId></Error>"
        ).encode()
        try:
            self.send_response_only(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("x-amz-request-id", request_id)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _send_gateway_error(self, exc: BaseException) -> None:
        """The upstream failed (not a programmed fault): a 502 the client can see and retry."""
        body = f"fault proxy: upstream failed: {exc!r}".encode()
        with contextlib.suppress(OSError):
            self.send_response_only(502, "Bad Gateway")
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        self.close_connection = True

    def _reset(self) -> None:
        """Close the client's connection with a TCP RST (SO_LINGER 0), without a word.

        A FIN would tell the client 'no answer'; an RST is what a crashed load balancer or a dropped
        NAT entry looks like: ``ECONNRESET`` while the client waits for the answer.
        """
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # rfile holds a reference to the socket: drop it, so close() really closes (and resets) now.
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            self.connection.close()

    def _client_gone(self) -> bool:
        """True when the client closed or reset its connection (readable with nothing to read)."""
        try:
            self.connection.setblocking(False)
            try:
                return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
            finally:
                self.connection.setblocking(True)
        except BlockingIOError:
            return False
        except OSError:
            return True


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 that forwards to ``upstream`` and misbehaves on command.

    Why: a retry loop, a conditional write or a recovery path is only proven by making the failure
    happen, on the very request where it hurts most ("the 3rd PUT of the manifest"), every time the
    test runs. Point the client under test at :attr:`endpoint`; it talks to the upstream server
    through this proxy, which forwards each request and relays the answer (status, headers, body),
    except where a fault matches (:meth:`add_fault`). Request bodies with ``Content-Length`` and with
    ``Transfer-Encoding: chunked`` are read whole, then forwarded with a ``Content-Length`` (the
    upstream never sees the client's chunking; the recorded headers do). Client connections are kept
    alive, as real endpoints do, so a client's connection pool behaves as it would in production.
    """

    def __init__(self, upstream: str | MotoServer, *, upstream_timeout: float = 120.0) -> None:
        endpoint = upstream.endpoint if isinstance(upstream, MotoServer) else upstream
        match = re.fullmatch(r"http://([^/:]+):(\d+)/?", endpoint)
        if match is None:
            raise ValueError(f"upstream must be http://HOST:PORT, not {endpoint!r}")
        self.upstream = endpoint.rstrip("/")
        self._up_host, self._up_port = match.group(1), int(match.group(2))
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._requests: list[tuple[str, str, dict[str, str]]] = []
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 (a port of the kernel's choosing) and serve in a daemon thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _ProxyServer((LOOPBACK, 0), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="FaultProxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, end stalled requests and cut every open client connection (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._stopping.set()  # after the cut: a stalled request wakes to find its client gone
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: give this to the client instead of the upstream's."""
        if self._server is None:
            raise RuntimeError("FaultProxy is not running (use it as a context manager, or call start())")
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    # -- programming

    def add_fault(
        self,
        kind: str,
        *,
        nth: int | None = None,
        every: int | None = None,
        method: str | None = None,
        path_regex: str | None = None,
        times: int | None = 1,
        seconds: float = 30.0,
    ) -> Fault:
        """Make requests fail; returns the :class:`Fault`, whose ``fired`` counts the hits.

        Which requests: those whose method is ``method`` (any if None) and whose path (with the query
        string) matches ``path_regex`` (``re.search``; any if None) are counted, from 1, per fault.
        With ``nth=N`` the fault fires on the Nth such request (and the following ones, until it has
        fired ``times`` times); with ``every=K`` on the Kth, 2Kth, ...; with neither, on the next ones.
        ``times=None``: no limit. When several faults fire on one request, the first added wins.
        E.g. "the 3rd PUT whose path matches /manifest": ``add_fault("503", nth=3, method="PUT",
        path_regex="/manifest")``.

        Kinds (the request body is always read in full first):

        * ``"500"`` / ``"503"``: answer that status with an S3 XML error (``InternalError`` /
          ``SlowDown``), as S3 does under load; the request never reaches the upstream;
        * ``"reset"``: close the client connection with a TCP RST, without an answer; never forwarded;
        * ``"stall"``: wait ``seconds`` before forwarding (so a client timeout fires); if the client
          has gone by then, the request is dropped, else it is forwarded and answered late;
        * ``"drop_after_forward"``: forward the request (it takes effect upstream), then reset the
          client connection instead of relaying the answer: the client cannot know it succeeded;
        * ``"corrupt"``: forward, then flip one byte (the middle one) of the answer's body before
          relaying it (headers, Content-Length and checksums unchanged). An empty body is relayed as
          it is, though the fault counts as fired.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(FAULT_KINDS)}")
        if nth is not None and every is not None:
            raise ValueError("give nth or every, not both")
        if (nth is not None and nth < 1) or (every is not None and every < 1):
            raise ValueError("nth and every count from 1")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 (or None: no limit)")
        fault = Fault(
            kind=kind,
            nth=nth,
            every=every,
            method=method,
            path_regex=path_regex,
            times=times,
            seconds=seconds,
            _pattern=re.compile(path_regex) if path_regex is not None else None,
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every fault (requests already being stalled finish their wait)."""
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    @property
    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """Every request seen so far, in arrival order: (method, path with query, headers with lowercase
        names). A copy: safe to read while clients are running."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def count(self, method: str | None = None, path_regex: str | None = None) -> int:
        """How many requests so far had this method and a path matching ``path_regex``."""
        pattern = re.compile(path_regex) if path_regex is not None else None
        return sum(
            1
            for m, p, _ in self.requests
            if (method is None or m == method.upper()) and (pattern is None or pattern.search(p))
        )

    # -- used by the handler threads

    def _record_and_match(self, method: str, path: str, headers: dict[str, str]) -> Fault | None:
        with self._lock:
            self._requests.append((method, path, headers))
            chosen: Fault | None = None
            for fault in self._faults:
                # Every fault counts every request it matches, even when an earlier one fires on it.
                if fault._consider(method, path, may_fire=chosen is None):
                    chosen = fault
            return chosen

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)
