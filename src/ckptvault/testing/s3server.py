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
* :class:`~ckptvault.testing.s3proxy.FaultProxy` (its own module) -- an HTTP/1.1 forwarding proxy
  on 127.0.0.1 in front of such a server; a client pointed at ``proxy.endpoint`` sees the server,
  except where a fault added with ``add_fault`` says otherwise; every request is recorded.

moto and boto3 are development dependencies, imported only when a method needs them; importing this
module costs nothing else. Not for production use.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["LOOPBACK", "MotoServer", "free_port"]

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel's pick for port 0).

    Another process may take it before the caller binds it; :class:`MotoServer` retries on a new port
    when its server dies at start.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- moto server

# moto's server checks a PUT's If-Match / If-None-Match and then stores the object without a lock,
# so two concurrent conditional PUTs can both pass (a check-then-act race S3 itself does not have:
# its conditional writes are atomic). The compare-and-swap tests then lose an update now and then
# through no fault of the client. The server is started with every object PUT and POST (multipart
# completion) of S3 serialised by one lock, which makes moto's conditional writes atomic as S3's are.
_ATOMIC_MOTO = """
import functools, sys, threading
from moto.s3.responses import S3Response
_lock = threading.Lock()
def _atomic(method):
    @functools.wraps(method)
    def run(*args, **kwargs):
        with _lock:
            return method(*args, **kwargs)
    return run
S3Response.put_object = _atomic(S3Response.put_object)
S3Response._key_response_post = _atomic(S3Response._key_response_post)
from moto.server import main
main(sys.argv[1:])
"""

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
                [sys.executable, "-c", _ATOMIC_MOTO, "-H", LOOPBACK, "-p", str(port)],
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
