"""Validation on creation: a checkpoint proven loadable before anyone needs it.

Levels, each including the one before:

* ``"checksum"``: the digests computed while writing (every save has them);
* ``"readback"``: the committed files are read back from storage and re-hashed (``verify``);
* ``"full"``: in a *separate process* (never the training process: a crash, a leak or a CUDA
  context there must not touch the run), the checkpoint is loaded, the model rebuilt from its
  recorded factory, and run on a probe batch. The output must have the recorded shape, be finite and
  equal the output the in-memory model gave on the same probe when the checkpoint was made (bit
  for bit on CPU; within ``rtol=1e-3, atol=1e-5`` when the model ran on an accelerator). The metrics
  in the sidecar must equal the in-memory values passed to the save.

The probe and the expected output travel inside the checkpoint as ``validation-probe.safetensors``
(digest-listed like every file), so ``ckptvault validate CKPT`` can repeat the check any time. The
expected output is computed single-threaded (and the worker runs single-threaded) because float
reductions may round differently with another number of threads.

Results go to ``<parent>/.ckptvault-validation/<checkpoint name>.json``: the manager reads them
(a failed checkpoint is never chosen by ``restore`` or ``best``) and ``ckptvault ls`` shows them.

The package's modules: :mod:`.results` (levels, the result type and where it is recorded, readback),
:mod:`.probe` (the probe made at save time) and this one, the process side of ``full``: the client
of the validation server and the one-shot worker it falls back to. Every name is importable from
``ckptvault.validation``; ``full`` and ``validate`` look ``readback``, ``full`` and ``_SERVER`` up
here, so a test that replaces them on this module still reaches them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ..storage.localfiles import stat_path
from ..storage.localfiles_fd import read_some
from .probe import make_probe_file, run_probe
from .results import (
    GPU_TOLERANCE,
    LEVELS,
    PROBE_FILE,
    PROBE_FORMAT,
    PROCESS_ENV,
    PROCESS_MODES,
    RESULTS_DIR,
    ValidationFailedError,
    ValidationResult,
    check_level,
    has_probe,
    read_result,
    readback,
    record_result,
    recorded_module,
    results_path,
)

if TYPE_CHECKING:
    from ..training.trust import TrustPolicy

__all__ = [
    "GPU_TOLERANCE",
    "LEVELS",
    "PROBE_FILE",
    "PROBE_FORMAT",
    "PROCESS_ENV",
    "PROCESS_MODES",
    "RESULTS_DIR",
    "ValidationFailedError",
    "ValidationResult",
    "check_level",
    "check_process",
    "full",
    "has_probe",
    "make_probe_file",
    "read_result",
    "readback",
    "record_result",
    "recorded_module",
    "results_path",
    "run_probe",
    "start_server",
    "validate",
]


def full(
    path: str,
    *,
    timeout: float = 900.0,
    process: str | None = None,
    trusted_modules: list[str] | None = None,
) -> ValidationResult:
    """Full validation in another process; falls back to readback (saying why) when the checkpoint
    has no probe or no recorded architecture.

    ``process`` (default ``CKPTVAULT_VALIDATION_PROCESS``, else ``"fork"`` where ``os.fork`` exists):

    * ``"fork"``: a per-process validation server (started once, torch imported once) forks a fresh
      child for each validation. The child is as isolated as a new process (a crash, a leak, a
      module-level global of the model's code die with it) but a 96 MiB model's check costs 0.35
      CPU s instead of 2.4: the interpreter start and ``import torch`` (2.0 s of CPU) are paid once
      per training process. That difference is what keeps full validation under 5% of a loop that
      saves every ~10 s on a small machine (README, "Validation on creation").
    * ``"spawn"``: a fresh ``python -m ckptvault.validation_worker --worker`` per validation (the fallback
      when the server cannot start, dies, or was made unsafe to fork by the model's module).

    Either imports the factory's module only if this process trusts it (imported here, or named by
    ``trusted_modules`` / ``CKPTVAULT_TRUSTED_MODULES``): the trust goes with the request
    (:meth:`~ckptvault.training.trust.TrustPolicy.for_worker`), and the worker trusts nothing else.
    """
    if not has_probe(path):
        note = "full validation needs a recorded architecture and a probe; ran readback"
        return readback(path, "full", note)
    path = os.path.abspath(path)
    mode = check_process(process if process is not None else os.environ.get(PROCESS_ENV, ""))
    from ..training.trust import TrustPolicy

    trust = TrustPolicy.create(trusted_modules).for_worker(recorded_module(path))
    started = time.perf_counter()
    doc = _SERVER.validate(path, timeout, trust) if mode == "fork" else None
    if doc is None:
        doc = _spawn(path, timeout, trust)
    problems, checks = tuple(doc["problems"]), tuple(doc["checks"])
    seconds = time.perf_counter() - started
    return ValidationResult(path, "full", "full", not problems, problems, seconds, "", checks, time.time())


def check_process(value: str) -> str:
    """The validation process mode; ``""`` means the platform's default."""
    value = value.strip().lower()
    if not value:
        return "fork" if hasattr(os, "fork") and hasattr(os, "waitpid") else "spawn"
    if value not in PROCESS_MODES:
        raise ValueError(f"{PROCESS_ENV} must be one of {PROCESS_MODES}, got {value!r}")
    if value == "fork" and not hasattr(os, "fork"):
        return "spawn"
    return value


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # The worker must import what this process can: the model's package, the project's modules.
    paths = _paths()
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _spawn(path: str, timeout: float, trust: TrustPolicy) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ckptvault.validation_worker", "--worker", os.fspath(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**_worker_env(), **trust.to_env()},
        )
    except subprocess.TimeoutExpired:
        return {"problems": [f"validation process ran over {timeout:.0f} s"], "checks": []}
    try:
        doc = json.loads(done.stdout.strip().splitlines()[-1])
        return {"problems": list(doc["problems"]), "checks": list(doc["checks"])}
    except (ValueError, IndexError, KeyError, TypeError):
        tail = (done.stderr or done.stdout)[-1500:]
        return {"problems": [f"validation process failed (exit {done.returncode}): {tail}"], "checks": []}


class _Server:
    """The client side of the validation server (``python -m ckptvault.validation_worker --serve``).

    One per training process, shared by every manager in it, started on first use (or by
    :func:`start_server`) and serving one validation at a time. Requests and replies are JSON lines
    over the server's stdin/stdout; the server exits when its stdin closes, so it never outlives
    this process by more than the validation it is running (which it bounds by the timeout).
    Whenever the server cannot answer (did not start, died, was made unsafe to fork) ``validate``
    returns None and the caller runs the one-shot worker instead: the server is an optimisation,
    never a reason for a validation to be skipped or to fail.
    """

    STARTUP_S = 300.0  # importing torch on a loaded 2-core machine can take a minute
    GRACE_S = 60.0  # beyond the request's own timeout, which the server enforces on its child

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._ready = False
        self._pending = b""
        self.disabled = ""  # why the server is not used any more in this process
        self.starts = 0

    def start(self) -> None:
        """Starts the server without waiting for it (its torch import overlaps the caller's work).
        Never blocks: if the lock is taken, a validation is running, so the server is up already."""
        if self._lock.acquire(blocking=False):
            try:
                self._start_locked()
            finally:
                self._lock.release()

    def _start_locked(self) -> None:
        if self._proc is not None or self.disabled:
            return
        import tempfile

        self._log = tempfile.TemporaryFile()  # noqa: SIM115  (lives as long as the server)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "ckptvault.validation_worker", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=_worker_env(),
        )
        self._ready, self._pending = False, b""
        self.starts += 1

    def stop(self) -> None:
        with self._lock:
            self._stop_locked(kill=False)

    def _stop_locked(self, *, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def forget_after_fork(self) -> None:
        """In a forked child of the training process (a data-loader worker, a user's fork): the
        server and its pipes belong to the parent, so this process must not talk to it (two
        writers would interleave requests) or stop it; it starts its own if it ever validates."""
        self._lock = threading.Lock()  # the parent's may have been copied taken
        proc, self._proc, self._log, self._ready, self._pending = self._proc, None, None, False, b""
        self.starts = 0
        if proc is not None:
            for pipe in (proc.stdin, proc.stdout):  # our copies only; the parent keeps its own
                if pipe is not None:
                    with contextlib.suppress(OSError, ValueError):
                        pipe.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _line(self, deadline: float) -> dict[str, Any] | None:
        """The server's next reply line, or None if it closed its end or the deadline passed."""
        import select

        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = read_some(fd, 1 << 16)
            if not chunk:
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        try:
            doc = json.loads(line)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, self._log.tell() - 1500))
        return str(self._log.read().decode("utf-8", "replace")).strip()

    def validate(self, path: str, timeout: float, trust: TrustPolicy) -> dict[str, Any] | None:
        with self._lock:
            if self.disabled:
                return None
            self._start_locked()
            assert self._proc is not None and self._proc.stdin is not None
            if not self._ready:
                hello = self._line(time.monotonic() + self.STARTUP_S)
                if hello is None or "ready" not in hello:
                    self.disabled = f"the validation server did not start: {self._log_tail()[-300:]}"
                    logging.getLogger("ckptvault").warning("%s; using one-shot workers", self.disabled)
                    self._stop_locked(kill=True)
                    return None
                self._ready = True
            request = {
                "path": path,
                "timeout": timeout,
                "cwd": os.getcwd(),
                "sys_path": _paths(),
                "trust": trust.to_doc(),
            }
            try:
                self._proc.stdin.write(json.dumps(request).encode() + b"\n")
                self._proc.stdin.flush()
            except OSError:  # it died since the last request: a fresh one next time
                self._stop_locked(kill=True)
                return None
            reply = self._line(time.monotonic() + timeout + self.GRACE_S)
            if reply is None:  # died or hung while serving: kill it, a fresh one next time
                self._stop_locked(kill=True)
                return None
            if "tainted" in reply:
                self.disabled = str(reply["tainted"])
                logging.getLogger("ckptvault").warning(
                    "validation server off for this process (%s): each full validation now starts "
                    "a fresh Python process",
                    self.disabled,
                )
                self._stop_locked(kill=False)
                return None
            return {"problems": list(reply["problems"]), "checks": list(reply["checks"])}


_SERVER = _Server()
atexit.register(lambda: _SERVER.stop())
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _SERVER.forget_after_fork())


def start_server() -> None:
    """Starts the validation server now (without waiting), so that its one ``import torch``
    overlaps the caller's work instead of delaying the first validation (the manager calls it when
    it writes its first probe)."""
    if check_process(os.environ.get(PROCESS_ENV, "")) == "fork":
        _SERVER.start()


def _paths() -> list[str]:
    """The directories of ``sys.path`` (what the worker must be able to import from)."""
    return [p for p in sys.path if p and _is_directory(p)]


def _is_directory(path: str) -> bool:
    try:
        return stat.S_ISDIR(stat_path(path).st_mode)
    except (OSError, ValueError):  # gone, unreadable, or a name the system refuses
        return False


def validate(path: str, level: str, *, trusted_modules: list[str] | None = None) -> ValidationResult:
    """Runs ``level`` on a committed checkpoint now (in this thread; full in another process)."""
    import dataclasses

    from ..engine.reader import CheckpointReader
    from ..storage.resolve import storage_for

    check_level(level)
    with CheckpointReader(*storage_for(path)) as reader:
        checkpoint_id = reader.manifest.checkpoint_id
    if level == "checksum":
        result = ValidationResult(
            path, "checksum", "checksum", True, (), 0.0, "digests computed while writing"
        )
    elif level == "readback":
        result = readback(path)
    else:
        result = full(path, trusted_modules=trusted_modules)
    return dataclasses.replace(result, checkpoint_id=checkpoint_id)
