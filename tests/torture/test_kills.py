"""Real process kills: SIGKILL at every write-family syscall of a save (plain, overwrite,
incremental), a garbage collection, a manager step with retention and a catalog sync (SQLite's own
journal writes), and at random moments of long saves; after each, the promises of
``ckptvault.testing.invariants`` hold.

How a kill lands at "syscall number N"
--------------------------------------
``strace -f -e inject=SET:signal=KILL:when=N`` does not count the calls of SET together. Checked on
this machine (strace 6.1; ``man strace``: "accounting of syscalls that are subject to injection is
done per syscall and per tracee"), and again by every run in
:func:`test_strace_counts_when_per_syscall_and_per_thread`: a script calls ``write`` and ``fsync``
three times in each of two threads under ``inject=write,fsync:error=EIO:when=2``, and the 2nd
``write`` *and* the 2nd ``fsync`` of *each* thread fail. So ``when=N`` means "the N-th call of
each syscall name, in each thread (counting from that thread's first call)", and a set makes the
kill land at the first of those. Hence the procedure:

1. a *counting run* traces the operation (``-e trace=SET``, no injection) and lists its calls in
   order, each as ``(name, n)``: the n-th call of that name in its thread (:func:`kill_points`);
2. kill point N is then ``inject=<name>:signal=KILL:when=<n>`` for the N-th call. strace delivers
   the signal when the thread *enters* that call, and the kernel aborts a syscall whose thread has a
   fatal signal pending at entry, so the process dies with calls 1..N-1 done and call N not done.
   Where several threads make calls of one name (the save's fsync pool), the injection may land on
   another thread's n-th call, a moment earlier; a point that duplicates an earlier ``(name, n)`` is
   not run twice. Chunk writers are held to one thread (``CKPTVAULT_IO_THREADS=1``) so that the
   order is the same in every run; the random-time kills below use the default thread count.

How the torch import stays out of the count
--------------------------------------------
Counting from process start would put tens of thousands of ``openat`` calls of ``import torch``
before the operation, and a fixed ``when=`` offset would break with any change of a dependency.
``-P``/``--trace-path`` cannot help: it selects calls on the exact paths given (checked: ``-P DIR``
shows ``open(DIR)`` but not ``open(DIR/x)``), not on everything beneath a directory. So the
operation runs in a child forked from a zygote that imported everything and warmed the caches (one
save of each kind: the git state for the sidecar costs subprocesses); the child blocks reading a
pipe, ``strace -p`` attaches, and only after strace reports "Process N attached" (it has seized and
interrupted the child: every later syscall stops for it) does the test send the go byte. The child
reports its result through shared memory, so nothing after the operation is counted either. The
calls then repeat from run to run (only which pool thread runs a given fsync may vary), and every
point chosen must really kill the child: the test fails if one does not.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ckptvault
from ckptvault.catalog.store import Catalog
from ckptvault.engine.gc import collect_garbage
from ckptvault.storage.chunkstore import STORE_NAME
from ckptvault.testing.invariants import check_catalog, check_checkpoints, leftovers, visible_checkpoints

from . import _strace_target as st
from .conftest import pick

ONE_THREAD = {"CKPTVAULT_IO_THREADS": "1"}


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    problem = st.strace_problem()
    if problem is not None:
        pytest.skip(problem)
    return st.shared_zygote(tmp_path_factory.mktemp("zygote"))


_COUNTING_SCRIPT = """
import os, sys, threading
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
seen = []
def work(tag):
    for i in (1, 2, 3):
        for name, call in (("write", lambda: os.write(fd, b"x")), ("fsync", lambda: os.fsync(fd))):
            try:
                call()
            except OSError as exc:
                seen.append(f"{tag}.{name}{i}:{exc.errno}")
work("main")
thread = threading.Thread(target=work, args=("thread",))
thread.start()
thread.join()
sys.stdout.write(" ".join(seen))
"""


def test_strace_counts_when_per_syscall_and_per_thread(tmp_path, figures):
    """The counting rule the kill points rely on (module docstring), checked on this machine's
    strace: with ``inject=write,fsync:error=EIO:when=2`` exactly the 2nd write and the 2nd fsync of
    each of two threads fail. A per-set count would fail one call only; a per-process count would
    spare the second thread."""
    problem = st.strace_problem()
    if problem is not None:
        pytest.skip(problem)
    strace = shutil.which("strace")
    inject = ["-e", "trace=write,fsync", "-e", "inject=write,fsync:error=EIO:when=2"]
    target = [sys.executable, "-I", "-S", "-c", _COUNTING_SCRIPT, str(tmp_path / "file")]
    done = subprocess.run(
        [strace, "-f", "-qq", "-o", os.devnull, *inject, *target],
        capture_output=True,
        text=True,
        timeout=60,
    )
    eio = errno.EIO
    want = f"main.write2:{eio} main.fsync2:{eio} thread.write2:{eio} thread.fsync2:{eio}"
    assert done.stdout == want, f"strace counts when= differently: {done.stdout!r} {done.stderr[-500:]}"
    figures.note(
        "kills.strace_counting",
        "strace when=N counts per syscall name and per thread (checked in the run: "
        "inject=write,fsync:error=EIO:when=2 failed the 2nd write and the 2nd fsync of each of two "
        "threads); kill point N is injected as <name of the N-th call>:when=<its ordinal in its "
        "thread>; the target is a child forked from a zygote that imported torch, traced from "
        "strace -p attach to its exit",
    )


# -- checks -----------------------------------------------------------------------------------
@dataclass
class Tally:
    """Invariant checks passed, and kill points that really killed."""

    checks: int = 0
    killed: int = 0

    def ok(self, problems: list[str], what: str) -> None:
        assert problems == [], f"{what}: {problems}"
        self.checks += 1


# -- the operations ---------------------------------------------------------------------------
@dataclass
class Operation:
    """One operation killed at each syscall: how to build the run before it, what it is, what may
    be visible after it (and holding what), and the next operation that must then succeed."""

    name: str
    build: Callable[[Path, Any], None]  # (root, zygote)
    op: Callable[[Path], dict[str, Any]]
    # (case root, tally, states, zygote): the promises after a kill, the next operation, its checks.
    after: Callable[[Path, Tally, dict[str, Any], Any], None]


def ckpt(name: str) -> str:
    return f"run/{name}"


def _catalog_synced(root: Path) -> None:
    """Syncs the catalog before the operation, so a kill tests that the next sync sees the change
    (not only that a rebuild from nothing works)."""
    with Catalog(root) as catalog:
        catalog.find()


def build_plain(root: Path, zygote: Any) -> None:
    for step in (1, 2):
        ckptvault.save(root / ckpt(f"step_{step:08d}"), st.small_state(step), metadata={"step": step})
    _catalog_synced(root)


def after_plain_save(root: Path, tally: Tally, states: dict[str, Any], zygote: Any) -> None:
    s1, s2, s3 = st.small_state(1), st.small_state(2), st.small_state(3)
    names = [ckpt(f"step_{i:08d}") for i in (1, 2, 3)]
    expected = dict(zip(names, ([s1], [s2], [s3]), strict=True))
    tally.ok(check_checkpoints(root, expected=expected, must_exist=names[:2], may_exist=names), "after kill")
    tally.ok(check_catalog(root), "catalog after kill")
    committed = names[2] in visible_checkpoints(root)
    # The same save again: a committed one is replaced (the plain save would rightly refuse).
    ckptvault.save(root / names[2], s3, metadata={"step": 3}, overwrite=committed)
    tally.ok(leftovers(root) + st.stray_files(root / "run"), "leftovers after the next save")
    tally.ok(check_checkpoints(root, expected=expected, must_exist=names, may_exist=names), "next save")


def after_overwrite(root: Path, tally: Tally, states: dict[str, Any], zygote: Any) -> None:
    old, new = st.small_state(2), st.small_state(22)
    names = [ckpt("step_00000001"), ckpt("step_00000002")]
    expected = {names[0]: [st.small_state(1)], names[1]: [old, new]}  # exactly old or exactly new
    tally.ok(check_checkpoints(root, expected=expected, must_exist=names, may_exist=names), "after kill")
    tally.ok(check_catalog(root), "catalog after kill")
    ckptvault.save(root / names[1], new, metadata={"step": 2}, overwrite=True)
    tally.ok(leftovers(root) + st.stray_files(root / "run"), "leftovers after the next save")
    expected[names[1]] = [new]
    tally.ok(check_checkpoints(root, expected=expected, must_exist=names, may_exist=names), "next save")


def build_incremental(root: Path, zygote: Any) -> None:
    chunked = {"incremental": True, "chunk_bytes": st.CHUNK_BYTES}
    ckptvault.save(root / ckpt("inc_00000001"), st.small_state(1), **chunked)
    ckptvault.save(root / ckpt("inc_00000002"), st.small_state(1, changed=(0,)), **chunked)
    _catalog_synced(root)


def after_incremental(root: Path, tally: Tally, states: dict[str, Any], zygote: Any) -> None:
    names = [ckpt(f"inc_{i:08d}") for i in (1, 2, 3)]
    new = st.small_state(1, changed=(1, 2))
    expected = dict(zip(names, ([st.small_state(1)], [st.small_state(1, changed=(0,))], [new]), strict=True))
    tally.ok(check_checkpoints(root, expected=expected, must_exist=names[:2], may_exist=names), "after kill")
    tally.ok(check_catalog(root), "catalog after kill")
    committed = names[2] in visible_checkpoints(root)
    ckptvault.save(root / names[2], new, overwrite=committed, incremental=True, chunk_bytes=st.CHUNK_BYTES)
    tally.ok(leftovers(root) + st.stray_files(root / "run"), "leftovers after the next save")
    collect_garbage(root / "run")
    tally.ok(st.store_problems(root / "run"), "store after the next collection")
    tally.ok(check_checkpoints(root, expected=expected, must_exist=names, may_exist=names), "next save")


def build_gc(root: Path, zygote: Any) -> None:
    chunked = {"incremental": True, "chunk_bytes": st.CHUNK_BYTES}
    ckptvault.save(root / ckpt("inc_00000001"), st.small_state(1), **chunked)
    ckptvault.save(root / ckpt("inc_00000002"), st.small_state(1, changed=(0, 1)), **chunked)
    shutil.rmtree(root / ckpt("inc_00000001"))  # its w0 and w1 chunks are now garbage
    # What a save killed inside a chunk write leaves: a temporary file in a chunk directory.
    chunk_dir = next(p for p in (root / "run" / STORE_NAME / "chunks").iterdir())
    (chunk_dir / ".tmp-00000000deadbeef").write_bytes(b"half a chunk")
    _catalog_synced(root)


def after_gc(root: Path, tally: Tally, states: dict[str, Any], zygote: Any) -> None:
    name = ckpt("inc_00000002")
    expected = {name: [st.small_state(1, changed=(0, 1))]}  # loading it proves no live chunk went
    tally.ok(check_checkpoints(root, expected=expected, must_exist=[name], may_exist=[name]), "after kill")
    tally.ok(check_catalog(root), "catalog after kill")
    collect_garbage(root / "run")
    tally.ok(st.store_problems(root / "run"), "store after the next collection")
    tally.ok(leftovers(root) + st.stray_files(root / "run"), "leftovers after the next collection")
    tally.ok(check_checkpoints(root, expected=expected, must_exist=[name], may_exist=[name]), "after next gc")


def build_retention(root: Path, zygote: Any) -> None:
    for step in (1, 2):  # in the zygote: the manager's lazy imports stay out of this process
        done = zygote.run_untraced(manager_op(root, step))
        assert done.ok, done.result
    _catalog_synced(root)


def manager_op(root: Path, step: int) -> dict[str, Any]:
    return {"op": "manager", "run": str(root / "run"), "seed": 7, "step": step}


def after_retention(root: Path, tally: Tally, states: dict[str, Any], zygote: Any) -> None:
    names = [ckpt(f"step_{i:08d}") for i in (1, 2, 3)]
    expected = {name: [states[name]] for name in names}
    tally.ok(check_checkpoints(root, expected=expected, must_exist=names[1:2], may_exist=names), "after kill")
    visible = visible_checkpoints(root)
    # Retention deletes only after the new checkpoint's commit: never both gone.
    tally.ok(
        [] if names[0] in visible or names[2] in visible else ["step 1 deleted, step 3 never committed"],
        "retention order",
    )
    tally.ok(check_catalog(root), "catalog after kill")
    newest = 3 if names[2] in visible else 2
    done = zygote.run_untraced(manager_op(root, newest + 1))  # a fresh process resumes the run
    assert done.ok, f"the next step failed: {done.result}"
    saved = done.result["value"]
    keep = [ckpt(f"step_{i:08d}") for i in (saved - 1, saved)]
    tally.ok(check_checkpoints(root, must_exist=keep, may_exist=keep), "next step (keep_last=2)")
    tally.ok(leftovers(root) + st.stray_files(root / "run"), "leftovers after the next step")
    tally.ok(st.store_problems(root / "run"), "store after the next step's retention")


def build_catalog(root: Path, zygote: Any) -> None:
    build_plain(root, zygote)  # two checkpoints, catalog synced
    ckptvault.save(root / ckpt("step_00000003"), st.small_state(3), metadata={"step": 3})
    shutil.rmtree(root / ckpt("step_00000001"))  # the sync has a row to add and one to drop


def after_catalog(root: Path, tally: Tally, states: dict[str, Any], zygote: Any) -> None:
    names = [ckpt("step_00000002"), ckpt("step_00000003")]
    expected = {names[0]: [st.small_state(2)], names[1]: [st.small_state(3)]}
    tally.ok(check_checkpoints(root, expected=expected, must_exist=names, may_exist=names), "after kill")
    # The next sync (a fresh open, after SQLite recovers its journal) equals a rebuild.
    tally.ok(check_catalog(root), "catalog after kill")
    with Catalog(root) as catalog:
        rows = sorted(row.path for row in catalog.find())
    tally.ok([] if rows == names else [f"catalog lists {rows}"], "catalog rows after the next sync")
    tally.ok(leftovers(root), "leftovers after the next sync")


OPERATIONS = {
    "save": Operation(
        "save",
        build_plain,
        lambda root: {"op": "save", "target": str(root / ckpt("step_00000003")), "seed": 3, "step": 3},
        after_plain_save,
    ),
    "overwrite": Operation(
        "overwrite",
        build_plain,
        lambda root: {
            "op": "save",
            "target": str(root / ckpt("step_00000002")),
            "seed": 22,
            "step": 2,
            "overwrite": True,
        },
        after_overwrite,
    ),
    "incremental": Operation(
        "incremental",
        build_incremental,
        lambda root: {
            "op": "save",
            "target": str(root / ckpt("inc_00000003")),
            "seed": 1,
            "changed": [1, 2],
            "incremental": True,
        },
        after_incremental,
    ),
    "gc": Operation("gc", build_gc, lambda root: {"op": "gc", "run": str(root / "run")}, after_gc),
    "catalog": Operation(
        "catalog", build_catalog, lambda root: {"op": "catalog", "root": str(root)}, after_catalog
    ),
    "retention": Operation(
        "retention",
        build_retention,
        lambda root: manager_op(root, 3),
        after_retention,
    ),
}


def spread(n_points: int, count: int | None) -> list[int]:
    """Indices 0..n_points-1: all of them, or ``count`` spread evenly (first and last included)."""
    if count is None or count >= n_points:
        return list(range(n_points))
    return sorted({round(i * (n_points - 1) / (count - 1)) for i in range(count)})


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_sigkill_at_each_syscall(name, zygote, tmp_path, figures):
    """Kills the operation at the entry of each write-family syscall it makes (all of them at full
    scale, an even spread in CI); every kill must leave the promises kept and the next operation
    must succeed and leave nothing behind."""
    operation = OPERATIONS[name]
    template = tmp_path / "template"
    operation.build(template, zygote)
    states: dict[str, Any] = {}
    for path in visible_checkpoints(template):
        states[path] = ckptvault.load(template / path)

    # Counting run, on a copy: the calls of an uninterrupted operation, and its result.
    reference = tmp_path / "reference"
    shutil.copytree(template, reference, symlinks=True)
    op = operation.op(reference) | {"env": ONE_THREAD}
    counted = zygote.run(op)
    assert counted.ok, f"uninterrupted {name} failed: {counted.result}"
    for path in visible_checkpoints(reference):
        states.setdefault(path, ckptvault.load(reference / path))
    again = zygote.run(operation.op(tmp_path / "unused") | {"env": ONE_THREAD, "op": "sleep"})
    assert again.calls == [], f"a child that runs nothing traced made calls: {again.log[:2000]}"
    points = st.kill_points(counted.calls)
    assert points, f"{name} made no write-family syscall?"

    tally = Tally()
    for index in spread(len(points), pick(10, None)):
        syscall, nth = points[index]
        case = tmp_path / f"kill_{index:04d}"
        shutil.copytree(template, case, symlinks=True)
        outcome = zygote.run(
            operation.op(case) | {"env": ONE_THREAD},
            "-e",
            f"inject={syscall}:signal=KILL:when={nth}",
        )
        where = f"{name}: kill at {syscall} #{nth} (point {index + 1} of {len(points)})"
        assert outcome.killed, f"{where}: not killed, status {outcome.status}, result {outcome.result}"
        tally.killed += 1
        try:
            operation.after(case, tally, states, zygote)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}\nstrace log tail:\n{outcome.log[-3000:]}") from exc
        shutil.rmtree(case)

    print(
        f"{name}: {len(counted.calls)} calls, {len(points)} points, {tally.killed} kills, {tally.checks} ok"
    )
    assert tally.killed == len(spread(len(points), pick(10, None)))
    figures.add(f"kills.syscall_points.{name}", tally.killed)
    figures.add("kills.syscall_calls_counted", len(counted.calls))
    figures.add("kills.nothing_lost_checks", tally.checks)


# -- random kills during long saves ----------------------------------------------------------
BIG_MB = 200


@pytest.mark.timeout(900)
def test_sigkill_at_random_times_during_long_saves(zygote, tmp_path, figures):
    """SIGKILL after a random delay within a ~200 MB save (plain and ``save_async``): only whole
    checkpoints appear, each holding exactly the state saved, the earlier checkpoint is intact, the
    catalog equals a rebuild, and the next save succeeds and sweeps everything the dead one left.
    (tests/faults/test_kill.py kills a loop of small saves; these saves last a second or more, so
    the kill lands inside the long write and fsync of a large data file.)"""
    rng = random.Random(20240611)
    big = st.big_state(5, BIG_MB)
    root = tmp_path / "root"
    run = root / "run"
    earlier = "run/earlier"
    ckptvault.save(root / earlier, st.small_state(1))
    duration = {}
    for mode in (False, True):  # each kind's own duration is its kill window
        op = {
            "op": "save",
            "target": str(tmp_path / f"timed_{mode}"),
            "seed": 5,
            "big": BIG_MB,
            "async": mode,
        }
        timed = zygote.run_untraced(op)
        assert timed.ok, timed.result
        shutil.rmtree(tmp_path / f"timed_{mode}")
        duration[mode] = timed.seconds

    tally = Tally()
    mid_save = 0
    kills = pick(3, 30)
    for k in range(kills):
        name = f"run/big_{k:03d}"
        mode = k % 2 == 1
        op = {"op": "save", "target": str(root / name), "seed": 5, "big": BIG_MB, "async": mode}
        pid = zygote.start(op)
        zygote.go()
        time.sleep(rng.uniform(0, duration[mode]))  # the kill's moment: random by design, not a sync
        with contextlib.suppress(ProcessLookupError):  # the save finished first: a commit
            os.kill(pid, signal.SIGKILL)
        status, _, result = zygote.wait()
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed or (result and result["ok"]), f"kill {k}: the save failed by itself: {result}"
        visible = visible_checkpoints(root)
        committed = name in visible
        mid_save += killed and not committed
        allowed = [earlier, name]
        tally.ok(
            check_checkpoints(
                root,
                expected={name: [big], earlier: [st.small_state(1)]},
                must_exist=[earlier],
                may_exist=allowed,
            ),
            f"kill {k} after {'async ' if mode else ''}save",
        )
        tally.ok(check_catalog(root), f"catalog after kill {k}")
        ckptvault.save(run / f"next_{k:03d}", st.small_state(2))
        tally.ok(leftovers(root) + st.stray_files(run), f"leftovers after the save following kill {k}")
        for path in [name, f"run/next_{k:03d}"]:
            shutil.rmtree(root / path, ignore_errors=True)  # 200 MB each: keep the disk and loads small

    print(
        f"save {duration[False]:.2f}s, async {duration[True]:.2f}s, {kills} kills, "
        f"{mid_save} inside a save, {tally.checks} checks"
    )
    assert mid_save > 0, "no kill landed inside a save: the window tests nothing"
    figures.add("kills.random", kills)
    figures.add("kills.random_inside_save", mid_save)
    figures.add("kills.nothing_lost_checks", tally.checks)
