"""The fault proxy's HTTP side (see :mod:`ckptvault.testing.s3proxy`): one handler per client
connection that records each request, asks the proxy which fault (if any) applies, and then answers
with an S3 error, resets the connection, stalls, or forwards the request upstream and relays (or
corrupts, or drops) the answer. Not for production use."""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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


# --------------------------------------------------------------------------- fault proxy


@dataclass
class Upstream:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: Any  # the FaultProxy that owns this server


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real endpoint: clients reuse their connections
    timeout = 300  # an idle keep-alive connection ends after this long
    server: ProxyServer

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

    def _forward(self, body: bytes, headers: dict[str, str]) -> Upstream:
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
                answer = Upstream(resp.status, resp.reason, resp.getheaders(), data)
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

    def _relay(self, answer: Upstream) -> None:
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
