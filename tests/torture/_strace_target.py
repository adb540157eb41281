"""Helper of test_kills.py and test_real_errors.py (not a test module): run as a script it is the
zygote below; imported, it gives the tests the same states, the :class:`Zygote` handle that drives
it under strace, and the strace-log parsing.

The zygote pays torch's and ckptvault's import once, then forks one child per operation, so a
test can run hundreds of traced or killed operations without paying seconds of imports for each,
and so that the part of a child's life a tracer counts is the operation alone.

Protocol (one line each way, stdin/stdout):

* the zygote prints ``ready`` once imported;
* the test sends an operation as one JSON object (see :func:`run_op`); the zygote forks a child that
  blocks reading a private pipe and prints ``pid <pid>``. The test may now attach ``strace -p`` to
  that pid: nothing the child does before the go byte is in the traced syscall set;
* the test sends ``go`` (the zygote writes one byte into the child's pipe; the child runs the
  operation) or ``cancel`` (the child exits without running it);
* the zygote waits for the child and prints ``dead <wait status> <result JSON>``.

The child reports its result through an anonymous shared memory map, never through a file or a
pipe: those would add ``openat``/``write`` calls after the operation, which a counting run would
then count as part of it. It leaves with ``os._exit`` for the same reason (no atexit handlers).

``{"op": "quit"}`` ends the zygote.
"""

from __future__ import annotations

import atexit
import json
import mmap
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ckptvault
from ckptvault.catalog.store import Catalog
from ckptvault.engine.gc import collect_garbage, live_digests
from ckptvault.storage.chunkstore import STORE_NAME, ChunkStore
from ckptvault.storage.local import LocalStorage

CHUNK_BYTES = 16 * 1024  # small chunks: a small state still spans many chunks (and chunk dirs)
_RESULT_BYTES = 1 << 16


# -- states (the test process builds the same ones to compare loads with) ----------------------
def small_state(seed: int, *, changed: tuple[int, ...] = ()) -> dict[str, Any]:
    """Four 64 KiB tensors and some plain values. ``changed`` names tensors drawn from ``seed+1000``
    instead: a state that shares every other tensor (hence its chunks) with ``small_state(seed)``."""
    gen = torch.Generator().manual_seed(seed)
    other = torch.Generator().manual_seed(seed + 1000)
    model = {}
    for i in range(4):
        tensor, replacement = torch.randn(64, 256, generator=gen), torch.randn(64, 256, generator=other)
        model[f"w{i}"] = replacement if i in changed else tensor
    return {"model": model, "seed": seed, "changed": list(changed), "note": f"state {seed}"}


_BIG: dict[tuple[int, int], dict[str, Any]] = {}


def big_state(seed: int, megabytes: int) -> dict[str, Any]:
    """About ``megabytes`` MB of float32 in 8 MB tensors (cached: the zygote builds it once)."""
    key = (seed, megabytes)
    if key not in _BIG:
        gen = torch.Generator().manual_seed(seed)
        n = max(1, megabytes // 8)
        layers = {f"layer{i}": torch.randn(1024, 2048, generator=gen) for i in range(n)}
        _BIG[key] = {"model": layers, "seed": seed}
    return _BIG[key]


class Model(torch.nn.Module):
    """The manager case's model: one 64 KiB weight (four chunks) and a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(256, 64)


def train_state(seed: int) -> ckptvault.TrainState:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return ckptvault.TrainState(Model())  # no optimizer: creating one imports torch._dynamo (seconds)


def manager(run: str | Path) -> ckptvault.CheckpointManager:
    """The retention case's manager: every step saves, two kept, incremental (retention also frees
    chunks), no background validation (its threads would make the operation's syscalls vary)."""
    return ckptvault.CheckpointManager(
        run,
        every_n_steps=1,
        keep_last=2,
        incremental=True,
        chunk_bytes=CHUNK_BYTES,
        validate="checksum",
        preemption_signals=(),
    )


def manager_step(run: str | Path, seed: int, step: int) -> int:
    """A training loop's ``step`` that saves checkpoint ``step`` (and so makes retention delete the
    oldest of three); the weight's first row differs at every step (one new chunk). Returns the
    step saved."""
    state = train_state(seed)
    state.step = step - 1
    with torch.no_grad():
        state.parts["model"]["model"].fc.weight[0] += float(step)
    with manager(run) as mgr:
        mgr.step(state)
    return state.step


# -- the test side: driving the zygote and strace ---------------------------------------------
# The write family: every syscall by which a save or a collection changes the file system (openat is
# in it because creating a file is one; read-only opens are counted too, which only adds points).
WRITE_SET = (
    "openat,write,pwrite64,pwritev,fsync,fdatasync,ftruncate,rename,renameat,renameat2,"
    "unlink,unlinkat,mkdir,mkdirat,rmdir"
)
_CALL = re.compile(r"^(\d+)\s+([a-z0-9_]+)\((.*)$")


@dataclass
class Call:
    """One syscall of a strace log: thread, name, the rest of the line (arguments and result)."""

    tid: int
    name: str
    rest: str

    @property
    def failed_with(self) -> str | None:
        found = re.search(r"= -1 ([A-Z0-9]+)", self.rest)
        return found.group(1) if found else None

    @property
    def injected(self) -> bool:
        return "(INJECTED)" in self.rest


def parse_log(text: str) -> list[Call]:
    """The calls of an ``strace -f -o`` log in the order they were entered (``<... resumed>``
    continuations are folded into their call; signals and exits are skipped)."""
    calls: list[Call] = []
    open_calls: dict[int, Call] = {}
    for line in text.splitlines():
        resumed = re.match(r"^(\d+)\s+<\.\.\. ([a-z0-9_]+) resumed>(.*)$", line)
        if resumed:
            call = open_calls.pop(int(resumed.group(1)), None)
            if call is not None:
                call.rest += resumed.group(3)
            continue
        match = _CALL.match(line)
        if not match:
            continue
        call = Call(int(match.group(1)), match.group(2), match.group(3))
        calls.append(call)
        if call.rest.endswith("<unfinished ...>"):
            open_calls[call.tid] = call
    return calls


def kill_points(calls: list[Call]) -> list[tuple[str, int]]:
    """Each call as the injection that reaches it: ``(name, n)`` for the n-th call of that name in
    its thread (strace counts ``when=`` per syscall name and per thread); duplicates dropped."""
    seen: dict[tuple[int, str], int] = {}
    points: list[tuple[str, int]] = []
    for call in calls:
        n = seen[(call.tid, call.name)] = seen.get((call.tid, call.name), 0) + 1
        if (call.name, n) not in points:
            points.append((call.name, n))
    return points


@dataclass
class Outcome:
    """How one operation in a child ended."""

    status: int
    seconds: float
    result: dict[str, Any] | None
    calls: list[Call]
    log: str

    @property
    def killed(self) -> bool:
        return os.WIFSIGNALED(self.status) and os.WTERMSIG(self.status) == signal.SIGKILL

    @property
    def ok(self) -> bool:
        return os.WIFEXITED(self.status) and self.result is not None and self.result["ok"]


def strace_problem() -> str | None:
    """Why strace cannot be used here (None when it can): missing, or not allowed to trace."""
    strace = shutil.which("strace")
    if strace is None:
        return "strace is not installed"
    probe = subprocess.run([strace, "-f", "-o", os.devnull, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"strace cannot trace here: {probe.stderr.strip()[:300]}"
    return None


class Zygote:
    """The test's handle on a zygote process (see the module docstring)."""

    def __init__(self, scratch: Path, env: dict[str, str] | None = None) -> None:
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        self.errors = (scratch / "zygote.stderr").open("w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=scratch,
        )
        self._expect("ready")
        self.runs = 0

    def _expect(self, word: str) -> list[str]:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith(word):
            self.proc.kill()
            self.errors.flush()
            stderr = Path(self.errors.name).read_text()[-3000:]
            raise AssertionError(f"zygote said {line!r} instead of {word!r}; stderr: {stderr}")
        return line.rstrip("\n").split(" ", 3)

    def _send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def start(self, op: dict[str, Any]) -> int:
        """Forks the child for ``op``; returns its pid (it waits for :meth:`go`)."""
        self._send(json.dumps(op))
        return int(self._expect("pid")[1])

    def go(self) -> None:
        self._send("go")

    def wait(self) -> tuple[int, float, dict[str, Any] | None]:
        _, status, seconds, result = self._expect("dead")
        return int(status), float(seconds), json.loads(result)

    def run(self, op: dict[str, Any], *strace_args: str, trace: str = WRITE_SET) -> Outcome:
        """Runs ``op`` in a child, traced by ``strace -f -e trace=<trace> <strace_args>`` attached
        before the child starts the operation; returns how it ended and the calls it made."""
        strace = shutil.which("strace")
        assert strace is not None
        self.runs += 1
        log = self.scratch / f"strace.{self.runs}.log"
        pid = self.start(op)
        tracer = subprocess.Popen(
            [strace, "-f", "-o", str(log), "-e", f"trace={trace}", *strace_args, "-p", str(pid)],
            stderr=subprocess.PIPE,
            text=True,
        )
        # strace reports "Process N attached" once it has seized and interrupted the child: from
        # then on every syscall the child (and any thread it starts) enters is traced and counted.
        line = tracer.stderr.readline()  # type: ignore[union-attr]
        if "attached" not in line:
            tracer.kill()
            self._send("cancel")
            self.wait()
            raise AssertionError(f"strace did not attach: {line!r} {tracer.stderr.read()[:2000]}")  # type: ignore[union-attr]
        self.go()
        status, seconds, result = self.wait()
        tracer.wait(timeout=60)
        tracer.stderr.close()  # type: ignore[union-attr]
        text = log.read_text()
        log.unlink()
        return Outcome(status, seconds, result, parse_log(text), text)

    def run_untraced(self, op: dict[str, Any]) -> Outcome:
        """Runs ``op`` in a child without strace (``seconds``: from the go byte to its end)."""
        self.start(op)
        self.go()
        status, seconds, result = self.wait()
        return Outcome(status, seconds, result, [], "")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send(json.dumps({"op": "quit"}))
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.errors.close()


_SHARED: list[Zygote] = []


def shared_zygote(scratch: Path) -> Zygote:
    """One zygote for every test module of the session (each costs seconds of imports); closed
    when the test process exits."""
    if not _SHARED or _SHARED[0].proc.poll() is not None:
        _SHARED[:] = [Zygote(scratch)]
        atexit.register(_SHARED[0].close)
    return _SHARED[0]


# The run's own files, hidden by design; anything else hidden in a run after the next operation is
# something a failed or killed process left behind that nothing will ever remove.
RUN_FILES = {STORE_NAME, ".ckptvault-index.json", ".ckptvault-run.lock", ".ckptvault-events.jsonl"}


def store_problems(run: Path) -> list[str]:
    """What a complete collection would still remove: temporary files and unreferenced chunks."""
    if not (run / STORE_NAME).is_dir():
        return []
    live, _ = live_digests(LocalStorage(), str(run))
    problems = []
    for path, digest in ChunkStore(run / STORE_NAME).iter_files():
        if digest is None:
            problems.append(f"temporary or foreign file {path.name} left in the store")
        elif digest not in live:
            problems.append(f"chunk {path.name} referenced by no checkpoint")
    return problems


def stray_files(run: Path) -> list[str]:
    """Hidden entries of a run directory that are neither the run's own files nor staging areas
    (those are ``leftovers``' business)."""
    return sorted(
        name
        for name in os.listdir(run)
        if name.startswith(".") and name not in RUN_FILES and ".ckptvault-tmp." not in name
    )


# -- operations ------------------------------------------------------------------------------
def run_op(op: dict[str, Any]) -> Any:
    """Runs one operation in the (child) process; returns something JSON-able."""
    for key, value in op.get("env", {}).items():
        os.environ[key] = str(value)
    kind = op["op"]
    if kind == "save":
        if "big" in op:
            state = big_state(op["seed"], op["big"])
        else:
            state = small_state(op["seed"], changed=tuple(op.get("changed", ())))
        chunking: dict[str, Any] = (
            {"incremental": True, "chunk_bytes": CHUNK_BYTES} if op.get("incremental") else {}
        )
        metadata = {"step": op.get("step", 0)}
        if op.get("async"):
            ckptvault.save_async(op["target"], state, metadata=metadata, **chunking).wait()
        else:
            ckptvault.save(
                op["target"], state, metadata=metadata, overwrite=op.get("overwrite", False), **chunking
            )
        return "saved"
    if kind == "gc":
        report = collect_garbage(op["run"])
        return {"deleted": report.deleted_chunks, "temporary": report.deleted_temporary}
    if kind == "manager":
        return manager_step(op["run"], op["seed"], op["step"])
    if kind == "catalog":  # a sync: the catalog notices the checkpoints committed since the last one
        with Catalog(op["root"]) as catalog:
            return len(catalog.find())
    if kind == "sleep":  # a child that does nothing traced (tests of the harness itself)
        return "slept"
    raise ValueError(f"unknown operation {kind!r}")


def _child(go_fd: int, op: dict[str, Any], shared: mmap.mmap) -> None:
    code = 0
    try:
        if os.read(go_fd, 1) != b"g":
            os._exit(0)
        try:
            result: dict[str, Any] = {"ok": True, "value": run_op(op)}
        except BaseException as exc:
            code = 3
            result = {
                "ok": False,
                "error": type(exc).__name__,
                "errno": getattr(exc, "errno", None),
                "message": str(exc)[:2000],
                "storage_error": isinstance(exc, ckptvault.StorageError),
                "traceback": traceback.format_exc()[-4000:],
            }
        data = json.dumps(result).encode()[: _RESULT_BYTES - 8]
        shared[:8] = len(data).to_bytes(8, "little")
        shared[8 : 8 + len(data)] = data
    finally:
        os._exit(code)


def warm_up() -> None:
    """One operation of each kind in a scratch directory, so that what a first use caches (the git
    state for the sidecar, which costs ``git`` subprocesses; modules imported lazily) is cached
    before any fork."""
    scratch = Path(f"warm-up.{os.getpid()}")
    ckptvault.save(scratch / "plain", small_state(0), metadata={"step": 0})
    ckptvault.save(scratch / "chunked", small_state(0), incremental=True, chunk_bytes=CHUNK_BYTES)
    collect_garbage(scratch)
    for step in (1, 2, 3):  # the manager's first use imports much of torch (distributed, sympy...)
        manager_step(scratch / "managed", 0, step)
    with Catalog(scratch) as catalog:
        catalog.find()
    shutil.rmtree(scratch)


def main() -> None:
    warm_up()
    print("ready", flush=True)
    for line in sys.stdin:
        op = json.loads(line)
        if op["op"] == "quit":
            break
        if "big" in op:
            big_state(op["seed"], op["big"])  # built here once, shared with every child by fork
        shared = mmap.mmap(-1, _RESULT_BYTES)  # MAP_SHARED | MAP_ANONYMOUS: survives into the child
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write_fd)
            _child(read_fd, op, shared)
        os.close(read_fd)
        print(f"pid {pid}", flush=True)
        command = sys.stdin.readline().strip()
        started = time.perf_counter()
        os.write(write_fd, b"g" if command == "go" else b"x")
        os.close(write_fd)
        _, status = os.waitpid(pid, 0)
        elapsed = time.perf_counter() - started
        size = int.from_bytes(shared[:8], "little")
        result = json.loads(shared[8 : 8 + size]) if size else None
        shared.close()
        print(f"dead {status} {elapsed:.6f} {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
