"""The process side of full validation: the one-shot worker and the validation server.

``python -m ckptvault.validation_worker --worker PATH`` validates one checkpoint and prints the
result as one JSON line; ``--serve`` is the per-training-process server that imports torch once and
forks a fresh child per request (see :class:`ckptvault.validation._Server`, its client). Both run
outside the training process, so what a model's code does there (crash, leak, hang, print) is a
finding, never the run's problem. Neither trusts a module the requesting program did not trust
(:mod:`ckptvault.training.trust`): the request carries that trust, the one-shot worker's
environment does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from .storage.localfiles_fd import close_fd, line_writer_on_copy, read_some, write_all
from .validation.probe import run_probe
from .validation.results import GPU_TOLERANCE, PROBE_FILE, number, readback, recorded_module

if TYPE_CHECKING:
    from .training.trust import TrustPolicy


# -- the worker (the separate process of "full") -----------------------------------------------
def _prepare_worker_process() -> None:
    if hasattr(os, "nice"):
        os.nice(10)  # the training process keeps priority for the CPU


def _worker(path: str) -> dict[str, Any]:
    """The one-shot worker (``--worker PATH``): trusts what the environment hands it."""
    from .training.trust import TrustPolicy

    _prepare_worker_process()
    return _check(path, TrustPolicy.from_worker_env())


def _check(path: str, trust: TrustPolicy) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from safetensors.torch import load as st_load

    from .engine.reader import CheckpointReader
    from .engine.sidecar import sidecar_name
    from .storage.resolve import storage_for
    from .training.rebuild import rebuild_model

    problems: list[str] = []
    checks: list[str] = []
    report = readback(path)
    problems += report.problems
    checks += report.checks
    storage = storage_for(path)[0]
    with CheckpointReader(storage, path) as reader:
        raw = reader.read_file(PROBE_FILE)
        sidecar = json.loads(reader.read_file(sidecar_name(reader.manifest.step)))
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    meta = header.get("__metadata__", {})
    tensors = st_load(raw)
    count = sum(k.startswith("input.") for k in tensors)
    inputs = [tensors[f"input.{i}"].clone() for i in range(count)]  # aligned, as at save time
    expected = [tensors[f"expected.{i}"] for i in range(sum(k.startswith("expected.") for k in tensors))]
    model = rebuild_model(storage, path, map_location="cpu", verify=True, policy=trust)
    checks.append(f"rebuilt {type(model).__qualname__} and loaded its weights")
    outputs = run_probe(model, inputs)
    exact = not str(meta.get("device", "cpu")).startswith(("cuda", "mps", "xpu"))
    if len(outputs) != len(expected):
        problems.append(f"model gave {len(outputs)} outputs, {len(expected)} expected")
    for i, (got, want) in enumerate(zip(outputs, expected, strict=False)):
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            problems.append(
                f"output {i}: {got.dtype}{tuple(got.shape)}, expected {want.dtype}{tuple(want.shape)}"
            )
            continue
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            problems.append(f"output {i} has non-finite values")
        same = torch.equal(got, want) if exact else torch.allclose(got, want, equal_nan=True, **GPU_TOLERANCE)
        if not same:
            diff = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
            rule = "bit for bit" if exact else f"within {GPU_TOLERANCE}"
            problems.append(
                f"output {i} differs from the in-memory model's ({rule}; max abs diff {diff:.3g})"
            )
    checks.append(f"ran the probe ({len(inputs)} inputs) and compared {len(expected)} outputs")
    expected_metrics = json.loads(meta.get("metrics", "{}"))
    written = sidecar.get("metrics", {}) if isinstance(sidecar.get("metrics"), dict) else {}
    for key, value in expected_metrics.items():
        got_value = written.get(key)
        if isinstance(value, str):  # a non-finite value, as repr
            ok = str(got_value) == value or (
                number(got_value) is not None and repr(number(got_value)) == value
            )
        else:
            ok = number(got_value) == value
        if not ok:
            problems.append(f"metric {key!r}: sidecar has {got_value!r}, the save was given {value!r}")
    checks.append(f"compared {len(expected_metrics)} metrics with the sidecar")
    return {"problems": problems, "checks": checks}


# -- the validation server (``--serve``): imports once, forks a fresh child per validation ---------
def _serve() -> None:
    """Reads requests (JSON lines) on stdin until it closes; answers each with one JSON line.

    The server stays single-threaded and never runs a torch operation itself, so forking it is
    safe (no lock or thread pool of another thread is copied half-taken). Before forking it
    imports the model's factory module (not the factory itself) so that every later child finds it
    imported; if that import started a thread or initialised CUDA -- either makes fork unsafe --
    it answers ``tainted`` and exits, and the client falls back to one-shot workers.
    """
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the training process decides what it
    # means (a final save, say, which should still be validated); the server ends when stdin closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    protocol = line_writer_on_copy(1)
    os.dup2(2, 1)  # stray prints (of imports, of the model's code) must not corrupt the protocol
    _prepare_worker_process()
    import threading as _threading

    import torch
    from safetensors.torch import load as _st_load  # noqa: F401  (imported once, used by children)

    from . import api as _api  # noqa: F401
    from .engine import reader as _reader  # noqa: F401
    from .training import rebuild as _rebuild  # noqa: F401
    from .training.trust import TrustPolicy

    # What this server imported for itself; a request's model module must be trusted by the request.
    own_modules = frozenset(sys.modules)

    protocol.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        try:
            request = json.loads(line)
            path, timeout = str(request["path"]), float(request["timeout"])
            cwd, paths = str(request.get("cwd", "")), [str(p) for p in request.get("sys_path", [])]
            trust = TrustPolicy.from_doc(request.get("trust"), cwds=(cwd,), imported=own_modules)
        except (ValueError, KeyError, TypeError):
            protocol.write(
                json.dumps({"problems": ["bad request to the validation server"], "checks": []}) + "\n"
            )
            continue
        sys.path.extend(p for p in paths if p not in sys.path)
        _preimport(path, trust)
        tainted = ""
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            tainted = "the model's module initialised CUDA when imported; forking is not safe"
        elif _threading.active_count() > 1:
            tainted = "the model's module started a thread when imported; forking is not safe"
        if tainted:
            protocol.write(json.dumps({"tainted": tainted}) + "\n")
            return
        reply = _fork_check(path, timeout, cwd, protocol.fileno(), trust)
        protocol.write(json.dumps(reply) + "\n")


def _preimport(path: str, trust: TrustPolicy) -> None:
    """Imports the module of the checkpoint's recorded factory, the same import ``load_model``
    makes in the child and under the same rules (only if the request trusts it, never from the
    current directory or the checkpoint's); any failure, ``SystemExit`` included, is left to the
    child, which repeats the import and reports it as the validation's finding."""
    from .training.architecture import REFERENCE, import_trusted

    try:
        module = recorded_module(path)
        if module is not None and REFERENCE.match(f"{module}:x") and trust.refusal(module) is None:
            import_trusted(module, trust, path)
    except BaseException:  # reported by the child, which repeats the import
        pass


def _fork_check(path: str, timeout: float, cwd: str, protocol_fd: int, trust: TrustPolicy) -> dict[str, Any]:
    import signal
    import tempfile

    started = time.monotonic()
    with tempfile.TemporaryFile() as log:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: check, write the result, exit without running any cleanup
            code = 70
            try:
                close_fd(read_end)
                close_fd(protocol_fd)
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                try:
                    if cwd:
                        os.chdir(cwd)
                    doc = _check(path, trust)
                except Exception as exc:  # every failure is a finding
                    doc = {"problems": [f"{type(exc).__name__}: {exc}"], "checks": []}
                write_all(write_end, json.dumps(doc).encode())
                code = 0
            finally:
                os._exit(code)
        close_fd(write_end)
        data, over = _read_until(read_end, started + timeout)
        close_fd(read_end)
        if over:
            os.kill(pid, signal.SIGKILL)
        status = _wait_child(pid, started + timeout)
        if over or status is None:
            return {"problems": [f"validation process ran over {timeout:.0f} s"], "checks": []}
        try:
            doc = json.loads(data)
            return {"problems": list(doc["problems"]), "checks": list(doc["checks"])}
        except (ValueError, KeyError, TypeError):
            log.seek(0)
            tail = log.read().decode("utf-8", "replace")[-1500:]
            return {"problems": [f"validation process failed ({_describe(status)}): {tail}"], "checks": []}


def _read_until(fd: int, deadline: float) -> tuple[bytes, bool]:
    """All a child writes to ``fd`` until it closes it; ``True`` if the deadline came first."""
    import select

    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return b"".join(chunks), True
        chunk = read_some(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)


def _wait_child(pid: int, deadline: float) -> int | None:
    """The child's wait status, killing it if it has not exited by the deadline (None then)."""
    import signal

    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.02)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def _main() -> None:
    parser = argparse.ArgumentParser(description="ckptvault full-validation worker")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--worker", help="validate this checkpoint and print the result as JSON")
    group.add_argument("--serve", action="store_true", help="serve requests on stdin (see _Server)")
    args = parser.parse_args()
    if sys.path and sys.path[0] and os.path.realpath(sys.path[0]) == os.path.realpath(os.getcwd()):
        del sys.path[0]  # `-m` put the current directory first: nothing is imported from there
    if args.serve:
        _serve()
        return
    try:
        doc = _worker(args.worker)
    except Exception as exc:  # every failure is a finding, reported as one line of JSON
        doc = {"problems": [f"{type(exc).__name__}: {exc}"], "checks": []}
    print(json.dumps(doc))


if __name__ == "__main__":
    _main()
