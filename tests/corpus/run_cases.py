#!/usr/bin/env python3
"""Applies the hostile corpus to ckptvault's readers and reports what each case did, as JSON.

``tests/torture/test_corpus.py`` runs this in a subprocess and judges the report; run it by hand to
see one case::

    python tests/corpus/run_cases.py --case header_length_2_63

Why the shape it has:

* Every case runs in a child **forked** from a parent that has already imported torch and ckptvault
  and read the control cases, so a case's seconds and memory are its own (no import costs), a hang
  is caught per case (the parent kills a child after ``--case-timeout`` seconds and reports
  ``hang``), and whatever a case does to the process (a leaked map, a changed directory) cannot
  leak into the next one.
* Memory is the child's peak RSS (``ru_maxrss``) minus its RSS when it started. The child also caps
  its address space at ``--address-space-gib`` above its starting size, so an allocation a hostile
  size asks for fails (and is reported as the MemoryError it is) instead of depending on how much
  this machine lets a process overcommit.
* Each child runs with a fresh, empty working directory; a malicious pickle's marker file would
  land there (or anywhere in the case's copy, which is searched too).
* The corpus is copied to ``--work`` first: some APIs write (the catalog creates its database,
  import_legacy a checkpoint), xz files are decompressed and symlinks, FIFOs, directories and sparse
  files are materialised from ``index.json``. The checked-in corpus is never touched.

Each checkpoint case goes through its primary API and then through every other read path (load,
open and a walk of the lazy view, info, verify, the ``ckptvault verify`` CLI), each timed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import lzma
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHECKPOINT_APIS = ("load", "open", "info", "verify", "cli-verify")


# -- materialising a case ---------------------------------------------------------------------------
def materialize(corpus: Path, entry: dict[str, Any], work: Path) -> Path:
    """A private, ready-to-read copy of one case under ``work`` (see the module docstring)."""
    source = corpus / "cases" / entry["name"]
    target = work / entry["name"]
    shutil.copytree(source, target, symlinks=True)
    for packed in sorted(target.rglob("*.xz")):
        packed.with_suffix("").write_bytes(lzma.decompress(packed.read_bytes()))
        packed.unlink()
    for item in entry.get("materialize", ()):
        path = target / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if item["kind"] == "symlink":
            os.symlink(item["to"], path)
        elif item["kind"] == "fifo":
            os.mkfifo(path)
        elif item["kind"] == "dir":
            path.mkdir()
        elif item["kind"] == "sparse":
            with open(path, "wb") as handle:
                handle.write(item["head"].encode())
                handle.truncate(item["size"])
        else:
            raise ValueError(f"{entry['name']}: unknown materialisation {item['kind']!r}")
    (target / ".cwd").mkdir(exist_ok=True)  # a case may plant files in the working directory
    return target


# -- applying one API -----------------------------------------------------------------------------
def _describe(exc: BaseException) -> dict[str, Any]:
    import ckptvault

    return {
        "outcome": "raised",
        "error": type(exc).__name__,
        "mro": [k.__name__ for k in type(exc).__mro__],
        "typed": isinstance(exc, ckptvault.CheckpointError),
        "message": str(exc)[:300],
        "kind": getattr(exc, "kind", None),
        "traceback": None
        if isinstance(exc, ckptvault.CheckpointError)
        else "".join(traceback.format_exception(exc))[-3000:],
    }


def _walk_open(path: Path) -> None:
    """Everything a user of the lazy view can touch: keys, each child, lengths, the whole load."""
    import ckptvault
    from ckptvault.engine.lazy import LazyNode

    with ckptvault.open(path) as view:
        keys = view.keys()  # the view's own method: CheckpointView is not iterable
        for key in keys:
            node = view[key]
            if isinstance(node, LazyNode):
                len(node)
                subkeys = node.keys()
                for sub in subkeys:
                    node[sub]
        view.load()
        view.info  # noqa: B018 -- decodes the metadata: part of what open exposes
        view.tensor_names()


def _cli_verify(path: Path) -> int:
    from ckptvault.cli.main import app

    code = app(["verify", "--json", str(path)], standalone_mode=False)
    return 0 if code is None else int(code)


def apply(api: str, case_dir: Path, target: Path) -> dict[str, Any]:
    """Runs one API on a case; returns its outcome (never raises)."""
    import ckptvault

    result: dict[str, Any]
    try:
        if api == "load":
            ckptvault.load(target)
            result = {"outcome": "ok"}
        elif api == "open":
            _walk_open(target)
            result = {"outcome": "ok"}
        elif api == "info":
            ckptvault.info(target)
            result = {"outcome": "ok"}
        elif api == "verify":
            report = ckptvault.verify(target)
            result = {
                "outcome": "ok" if report.ok else "not-ok",
                "problems": sorted({p.kind for p in report.problems}),
            }
        elif api == "cli-verify":
            result = {"outcome": "exit", "code": _cli_verify(target)}
        elif api == "import_legacy":
            from ckptvault.legacy import import_legacy

            out = case_dir / "imported"
            try:
                import_legacy(target, out)
            finally:
                left = out.exists()
            ckptvault.load(out)
            result = {"outcome": "ok", "left_target": left}
        elif api == "load_model":
            sys.path.insert(0, "")  # as in an interactive session or `python -c`: the cwd is importable
            try:
                ckptvault.load_model(target)
            finally:
                sys.path.remove("")
            result = {"outcome": "ok"}
        elif api == "catalog":
            from ckptvault.catalog.store import Catalog

            with Catalog(target) as catalog:
                first = sorted(row.path for row in catalog.find())
                catalog.rebuild()
                again = sorted(row.path for row in catalog.find())
            result = {"outcome": "ok", "indexed": first, "indexed_after_rebuild": again}
        else:
            raise ValueError(f"unknown api {api!r}")
    except BaseException as exc:  # the whole point: report whatever escaped, typed or not
        if isinstance(exc, KeyboardInterrupt):
            raise
        result = _describe(exc)
        if api == "import_legacy":
            result["left_target"] = (case_dir / "imported").exists()
    return result


def run_case(entry: dict[str, Any], case_dir: Path, secondary: tuple[str, ...]) -> dict[str, Any]:
    """In the forked child: the primary API, then the other read paths of a checkpoint case."""
    target = case_dir / entry["target"]
    apis = [entry["api"]]
    if entry["api"] in CHECKPOINT_APIS:
        apis += [a for a in secondary if a != entry["api"]]
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    calls = {}
    for api in apis:
        started = time.perf_counter()
        outcome = apply(api, case_dir, target)
        outcome["seconds"] = round(time.perf_counter() - started, 4)
        calls[api] = outcome
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"calls": calls, "rss_growth_mb": round((peak - start_rss) / 1024, 1)}


# -- the parent: fork, time out, collect ----------------------------------------------------------
def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(
    entry: dict[str, Any], case_dir: Path, write_fd: int, address_space: int, secondary: tuple[str, ...]
) -> None:
    os.chdir(case_dir / ".cwd")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the CLI prints its report; the parent speaks JSON on stdout
    os.dup2(devnull, 2)
    if address_space and hasattr(resource, "RLIMIT_AS"):
        limit = _vm_size() + address_space
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        doc = run_case(entry, case_dir, secondary)
    except BaseException as exc:
        doc = {"crash": "".join(traceback.format_exception(exc))[-3000:]}
    data = json.dumps(doc).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(write_fd, view) :]


def run_forked(
    entry: dict[str, Any], case_dir: Path, timeout: float, address_space: int, secondary: tuple[str, ...]
) -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read_fd)
            _child(entry, case_dir, write_fd, address_space, secondary)
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    deadline = time.monotonic() + timeout
    hung = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                hung = True
                break
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            piece = os.read(read_fd, 1 << 16)
            if not piece:
                break
            chunks.append(piece)
    finally:
        os.close(read_fd)
        if hung:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if hung:
        return {"hang": True, "timeout_s": timeout}
    if not chunks:
        return {"crash": f"child died without a report (wait status {status})"}
    return json.loads(b"".join(chunks))


def _markers(case_dir: Path, marker: str) -> list[str]:
    return [str(p.relative_to(case_dir)) for p in case_dir.rglob(f"*{marker}*")]


def warm_up(corpus: Path, entries: list[dict[str, Any]], work: Path) -> None:
    """Imports and first uses happen here, once, so a case's timing is the case's own."""
    import numpy  # noqa: F401
    import torch  # noqa: F401

    import ckptvault
    import ckptvault.catalog.store
    import ckptvault.cli.main
    import ckptvault.legacy  # noqa: F401

    for entry in entries:
        if entry["name"].startswith("control_"):
            case_dir = materialize(corpus, entry, work / "warm-up")
            apply(entry["api"], case_dir, case_dir / entry["target"])
            if entry["api"] in CHECKPOINT_APIS:
                for api in CHECKPOINT_APIS:
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        apply(api, case_dir, case_dir / entry["target"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=HERE)
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch directory (default: a temporary one)"
    )
    parser.add_argument("--case", action="append", default=[], help="run only these cases (repeatable)")
    parser.add_argument(
        "--case-timeout", type=float, default=20.0, help="seconds before a case counts as hung"
    )
    parser.add_argument("--address-space-gib", type=float, default=3.0)
    parser.add_argument(
        "--cli", action="store_true", help="also run `ckptvault verify` (in-process, ~50 ms a case)"
    )
    parser.add_argument(
        "--big-primary-only",
        action="store_true",
        help="run cases with their own time bound (the deliberately big ones) through their primary API only",
    )
    args = parser.parse_args(argv)
    every = tuple(a for a in CHECKPOINT_APIS if args.cli or a != "cli-verify")

    index = json.loads((args.corpus / "index.json").read_text())
    entries = index["cases"]
    if args.case:
        unknown = set(args.case) - {e["name"] for e in entries}
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}")
        entries = [e for e in entries if e["name"] in args.case]
    with tempfile.TemporaryDirectory(prefix="ckptvault-corpus-run-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        (work / "warm-up").mkdir(exist_ok=True)
        warm_up(args.corpus, index["cases"], work)
        results: dict[str, Any] = {}
        started = time.perf_counter()
        for entry in entries:
            case_dir = materialize(args.corpus, entry, work)
            secondary = () if args.big_primary_only and "max_seconds" in entry else every
            space = int(args.address_space_gib * 2**30)
            result = run_forked(entry, case_dir, args.case_timeout, space, secondary)
            result["markers"] = _markers(case_dir, index["marker"])
            results[entry["name"]] = result
        doc = {
            "python": sys.version.split()[0],
            "cases": results,
            "wall_s": round(time.perf_counter() - started, 2),
        }
    sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
