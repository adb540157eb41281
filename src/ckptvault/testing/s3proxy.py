"""The programmable faulty network in front of a :class:`~ckptvault.testing.s3server.MotoServer`:
500 and 503 answers, reset connections, stalls, answers lost after the request took effect, and
flipped bytes, each on the request a test chooses (see :mod:`ckptvault.testing.s3server` for why).
Not for production use."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from dataclasses import dataclass, field
from types import TracebackType

from .s3proxy_wire import ProxyHandler, ProxyServer
from .s3server import LOOPBACK, MotoServer

__all__ = ["FAULT_KINDS", "Fault", "FaultProxy"]

#: What :meth:`FaultProxy.add_fault` can do to a request (see there).
FAULT_KINDS = ("500", "503", "reset", "stall", "drop_after_forward", "corrupt")


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
        self._server: ProxyServer | None = None
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
        server = ProxyServer((LOOPBACK, 0), ProxyHandler)
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
