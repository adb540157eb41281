"""Real errors from a real kernel: a full file system (ENOSPC on a small tmpfs), an fsync that fails
(EIO), a rename across devices (EXDEV). Each must fail the operation with a typed
:class:`ckptvault.StorageError` carrying the errno, leave nothing visible, harm no earlier checkpoint
and leave nothing behind; the next operation, once the cause is gone, must succeed.

ENOSPC comes from the kernel itself: a 4 MiB tmpfs is mounted (we run as root; where mounting is not
allowed the tests skip and say so in the figures). EIO and EXDEV are injected with strace
(``-e inject=fsync:error=EIO:when=N``): the syscall is not executed and returns the error, exactly
what a failing disk or a cross-device rename returns. strace counts ``when=`` per syscall name and
per thread (see test_kills.py), so ``when=1`` fails the first fsync of *every* thread.

**A failed fsync is fatal and never retried as success.** After an fsync error the kernel may have
dropped the dirty pages and cleared the error, so a second fsync can succeed although the data is
lost (the "fsyncgate" problem of 2018). The proof here has two halves: with only the first fsync of
each thread failing, every save still fails (a retry would be the thread's second fsync, which
succeeds, so a retrying library would report success); and the strace log shows no second fsync of
a descriptor whose fsync failed before that descriptor is closed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptvault
from ckptvault.catalog.store import Catalog
from ckptvault.engine.gc import collect_garbage
from ckptvault.storage.chunkstore import STORE_NAME, ChunkStore
from ckptvault.testing.invariants import check_catalog, check_checkpoints, leftovers, visible_checkpoints

from . import _strace_target as st
from .conftest import pick

CHUNKED = {"incremental": True, "chunk_bytes": st.CHUNK_BYTES}


def ok(problems: list[str], what: str, figures) -> None:
    assert problems == [], f"{what}: {problems}"
    figures.add("errors.nothing_lost_checks")


def assert_storage_error(exc: BaseException | dict[str, Any] | None, code: int, what: str) -> None:
    """A typed StorageError with errno ``code`` (an exception here, or a child's result dict)."""
    if isinstance(exc, dict):
        assert not exc["ok"], f"{what}: the operation succeeded"
        assert exc["storage_error"], f"{what}: {exc['error']} instead of StorageError: {exc['traceback']}"
        assert exc["errno"] == code, f"{what}: errno {exc['errno']}, expected {code}: {exc['message']}"
        return
    assert isinstance(exc, ckptvault.StorageError), f"{what}: {type(exc).__name__}: {exc}"
    assert exc.errno == code, f"{what}: errno {exc.errno}, expected {code}: {exc}"


# -- ENOSPC on a small tmpfs -----------------------------------------------------------------
TINY = 4 * 1024 * 1024
PAGE = 4096


@pytest.fixture
def tiny_fs(tmp_path, figures):
    """A 4 MiB tmpfs, unmounted at the end whatever happens."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    tool = shutil.which("mount")
    done = (
        subprocess.run([tool, "-t", "tmpfs", "-o", f"size={TINY}", "tmpfs", str(mount)], capture_output=True)
        if tool
        else None
    )
    if done is None or done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip() if done is not None else "no mount command"
        figures.note("errors.enospc", f"skipped: cannot mount a tmpfs here ({why})")
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root and CAP_SYS_ADMIN): {why}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def free_bytes(path: Path) -> int:
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize


class Filler:
    """A file that takes all but ``leave`` bytes of the file system (page granular)."""

    def __init__(self, root: Path) -> None:
        self.path = root / "filler"

    def fill(self, leave: int) -> None:
        self.free()
        size = free_bytes(self.path.parent) - leave
        if size > 0:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        assert abs(free_bytes(self.path.parent) - leave) <= PAGE, "tmpfs did not fill as asked"

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def leaves(needed: int) -> list[int]:
    """Free space to leave for a save that needs ``needed`` bytes: every page from none to a little
    beyond at full scale; in CI none, half, and the last pages (where the small files go: the
    sidecar, then the manifest), one exactly enough and one more."""
    pages = needed // PAGE
    if pick(False, True):
        return [p * PAGE for p in range(pages + 8)]
    return [p * PAGE for p in sorted({0, pages // 2, *range(max(0, pages - 3), pages + 2)})]


def space_needed(root: Path, save: Callable[[], Any], undo: Callable[[], Any]) -> int:
    """The bytes ``save`` takes on this file system (measured: run, then undone)."""
    before = free_bytes(root)
    save()
    needed = before - free_bytes(root)
    undo()
    assert free_bytes(root) == before, "undoing the measuring save did not give the space back"
    return needed


def stage_of(message: str) -> str:
    """Where in the save the disk ran out: the action and the file ("cannot write manifest.json")."""
    found = re.search(r"\] ([a-z ]+?) (/\S+?):? ", message)
    if not found:
        return message[:40]
    name = re.sub(r"[0-9a-f]{64}", "<digest>", os.path.basename(found.group(2)))
    return f"{found.group(1)} {name}"


@pytest.mark.timeout(300)
def test_enospc_plain_save(tiny_fs, figures):
    """A state larger than the disk, then a save that runs out at every point from its first byte to
    its manifest: a typed ENOSPC each time, nothing visible, the earlier checkpoint intact, no
    staging left; with the space back, the same save succeeds."""
    root, run = tiny_fs, tiny_fs / "run"
    earlier, new = "run/step_00000001", "run/step_00000002"
    ckptvault.save(root / earlier, st.small_state(1), metadata={"step": 1})
    kept = {earlier: [st.small_state(1)]}

    with pytest.raises(ckptvault.CheckpointError) as caught:
        ckptvault.save(root / new, st.big_state(3, 8))  # 8 MiB into 4 MiB
    assert_storage_error(caught.value, errno.ENOSPC, "state larger than the disk")
    ok(check_checkpoints(root, expected=kept, must_exist=[earlier], may_exist=[earlier]), "too big", figures)
    ok(leftovers(root), "leftovers of the too-big save", figures)
    cases, stages = 1, set()

    needed = space_needed(
        root, lambda: ckptvault.save(root / new, st.small_state(2)), lambda: shutil.rmtree(root / new)
    )
    filler = Filler(root)
    committed_at = None
    for leave in leaves(needed):
        filler.fill(leave)
        try:
            ckptvault.save(root / new, st.small_state(2), metadata={"step": 2})
        except ckptvault.CheckpointError as exc:
            assert_storage_error(exc, errno.ENOSPC, f"{leave} bytes free")
            stages.add(stage_of(str(exc)))
            cases += 1
            where = f"ENOSPC with {leave} bytes free"
            ok(
                check_checkpoints(root, expected=kept, must_exist=[earlier], may_exist=[earlier]),
                where,
                figures,
            )
            ok(leftovers(root) + st.stray_files(run), where, figures)
            continue
        committed_at = leave  # it fitted: it must be whole
        both = {**kept, new: [st.small_state(2)]}
        ok(
            check_checkpoints(root, expected=both, must_exist=[earlier, new], may_exist=both),
            "fitted",
            figures,
        )
        shutil.rmtree(root / new)
    filler.free()
    assert committed_at is not None, "the save never fitted: the sweep never reached enough space"

    ckptvault.save(root / new, st.small_state(2), metadata={"step": 2})  # space back: it succeeds
    both = {**kept, new: [st.small_state(2)]}
    ok(
        check_checkpoints(root, expected=both, must_exist=both, may_exist=both),
        "after freeing space",
        figures,
    )
    ok(leftovers(root) + st.stray_files(run), "after freeing space", figures)
    ok(check_catalog(root), "catalog", figures)
    assert len(stages) >= pick(2, 3), f"the disk ran out at too few points of the save: {stages}"
    figures.add("errors.enospc_cases", cases)
    figures.note("errors.enospc_stages", ", ".join(sorted(stages)))


@pytest.mark.timeout(300)
def test_enospc_incremental_save(tiny_fs, figures):
    """The disk fills while an incremental save puts its chunks: ENOSPC, nothing visible, the
    earlier incremental checkpoint intact, no temporary chunk file left; the chunks the failed save
    did write are garbage that a collection removes, and then the save succeeds."""
    root, run = tiny_fs, tiny_fs / "run"
    earlier, new = "run/inc_00000001", "run/inc_00000002"
    ckptvault.save(root / earlier, st.small_state(1), **CHUNKED)
    kept = {earlier: [st.small_state(1)]}
    fresh = st.small_state(1, changed=(0, 1, 2, 3))  # every chunk new: 16 chunk files
    needed = space_needed(
        root,
        lambda: ckptvault.save(root / new, fresh, **CHUNKED),
        lambda: (shutil.rmtree(root / new), collect_garbage(run)),
    )
    filler = Filler(root)
    cases = 0
    for leave in leaves(needed):
        filler.fill(leave)
        try:
            ckptvault.save(root / new, fresh, **CHUNKED)
        except ckptvault.CheckpointError as exc:
            assert_storage_error(exc, errno.ENOSPC, f"{leave} bytes free")
            cases += 1
            where = f"ENOSPC with {leave} bytes free"
            ok(
                check_checkpoints(root, expected=kept, must_exist=[earlier], may_exist=[earlier]),
                where,
                figures,
            )
            ok(leftovers(root) + st.stray_files(run), where, figures)
            temporary = [p.name for p, d in ChunkStore(run / STORE_NAME).iter_files() if d is None]
            ok(temporary, f"temporary chunk files after {where}", figures)
            filler.free()
            collect_garbage(run)
            ok(st.store_problems(run), f"store after collecting {where}", figures)
            continue
        filler.free()
        shutil.rmtree(root / new)
        collect_garbage(run)
    filler.free()
    ckptvault.save(root / new, fresh, **CHUNKED)
    both = {**kept, new: [fresh]}
    ok(
        check_checkpoints(root, expected=both, must_exist=both, may_exist=both),
        "after freeing space",
        figures,
    )
    ok(leftovers(root) + st.stray_files(run), "after freeing space", figures)
    collect_garbage(run)
    ok(st.store_problems(run), "store", figures)
    ok(check_catalog(root), "catalog", figures)
    assert cases >= pick(3, 10), f"only {cases} saves ran out of space"
    figures.add("errors.enospc_cases", cases)


@pytest.mark.timeout(300)
def test_enospc_manager_save_with_retention(tiny_fs, figures):
    """A manager with ``keep_last=1`` whose next save finds the disk full: the step raises a typed
    ENOSPC, and retention, which runs only after a commit, has not deleted the one good checkpoint;
    with space back the next step saves and retention then removes the old one."""
    root, run = tiny_fs, tiny_fs / "run"
    state = st.train_state(0)
    model = state.parts["model"]["model"]
    with ckptvault.CheckpointManager(
        run, every_n_steps=1, keep_last=1, validate="checksum", preemption_signals=(), **CHUNKED
    ) as manager:
        manager.step(state)
        first = "run/step_00000001"
        kept = {first: [ckptvault.load(root / first)]}
        filler = Filler(root)
        cases = 0
        for leave in leaves(8 * PAGE):  # a step saves one new 16 KiB chunk and small files
            with torch.no_grad():
                model.fc.weight[0] += 1.0
            filler.fill(leave)
            try:
                manager.step(state)
            except ckptvault.CheckpointError as exc:
                assert_storage_error(exc, errno.ENOSPC, f"manager step with {leave} bytes free")
                cases += 1
                where = f"manager ENOSPC with {leave} bytes free"
                ok(
                    check_checkpoints(root, expected=kept, must_exist=[first], may_exist=[first]),
                    where,
                    figures,
                )
                ok(leftovers(root), where, figures)
                continue
            finally:
                filler.free()
            break  # it fitted: the run moved on
        newest = state.step
        manager.step(state)  # space back (and the step before may have fitted): saves, keeps one
    names = visible_checkpoints(root)
    assert names == [f"run/step_{state.step:08d}"], f"keep_last=1 after step {newest + 1}: {names}"
    ok(check_checkpoints(root, must_exist=names, may_exist=names), "after the next step", figures)
    ok(leftovers(root) + st.stray_files(run), "after the next step", figures)
    ok(st.store_problems(run), "store after retention", figures)
    ok(check_catalog(root), "catalog", figures)
    assert cases >= 1, "the manager's save never ran out of space"
    figures.add("errors.enospc_cases", cases)


# -- EIO on fsync and EXDEV on rename, injected with strace -----------------------------------
TRACE = "fsync,fdatasync,close,openat,rename,renameat,renameat2"


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    problem = st.strace_problem()
    if problem is not None:
        pytest.skip(problem)
    return st.shared_zygote(tmp_path_factory.mktemp("zygote"))


PLAIN, OLD, NEW, INC = "run/step_00000001", "run/step_00000002", "run/step_00000003", "run/inc_00000001"
BEFORE = {PLAIN: [st.small_state(1)], OLD: [st.small_state(2)], INC: [st.small_state(1)]}


def build(root: Path) -> None:
    ckptvault.save(root / PLAIN, st.small_state(1))
    ckptvault.save(root / OLD, st.small_state(2))
    ckptvault.save(root / INC, st.small_state(1), **CHUNKED)
    with Catalog(root) as catalog:  # synced before: the check after sees whether a sync follows
        catalog.find()


KINDS: dict[str, tuple[str, dict[str, Any], Any]] = {
    # kind: (target, save arguments for the child, the state it saves)
    "plain": (NEW, {"seed": 3}, st.small_state(3)),
    "overwrite": (OLD, {"seed": 22, "overwrite": True}, st.small_state(22)),
    "incremental": ("run/inc_00000002", {"seed": 1, "changed": [0, 1], "incremental": True}, None),
}


def save_op(root: Path, kind: str) -> dict[str, Any]:
    target, args, _ = KINDS[kind]
    # One chunk writer thread: the per-thread fsync numbers are then the same in every run.
    return {"op": "save", "target": str(root / target), "env": {"CKPTVAULT_IO_THREADS": "1"}} | args


def state_of(kind: str) -> Any:
    return KINDS[kind][2] if KINDS[kind][2] is not None else st.small_state(1, changed=(0, 1))


def check_failed_save(root: Path, kind: str, result: dict[str, Any], code: int, what: str, figures) -> None:
    """The promises after a save that failed with ``code``, then the same save without the fault."""
    assert_storage_error(result, code, what)
    target = KINDS[kind][0]
    ok(check_checkpoints(root, expected=BEFORE, must_exist=BEFORE, may_exist=BEFORE), what, figures)
    ok(leftovers(root) + st.stray_files(root / "run"), what, figures)
    ok(check_catalog(root), f"catalog after {what}", figures)
    chunked = CHUNKED if kind == "incremental" else {}
    ckptvault.save(root / target, state_of(kind), overwrite=kind == "overwrite", **chunked)
    after = {**BEFORE, target: [state_of(kind)]}
    ok(
        check_checkpoints(root, expected=after, must_exist=after, may_exist=after),
        f"next save: {what}",
        figures,
    )
    ok(leftovers(root) + st.stray_files(root / "run"), f"next save: {what}", figures)
    collect_garbage(root / "run")
    ok(st.store_problems(root / "run"), f"store after {what}", figures)


def fsync_retries(calls: list[Any]) -> list[str]:
    """fsyncs of a descriptor whose fsync already failed, before that descriptor was closed."""
    failed: set[str] = set()
    retries = []
    for call in calls:
        fd = call.rest.split(")", 1)[0].split(",", 1)[0]
        if call.name in ("fsync", "fdatasync"):
            if fd in failed:
                retries.append(f"{call.name}({fd}) again after it failed: {call.rest[:80]}")
            if call.failed_with is not None:
                failed.add(fd)
        elif call.name == "close":
            failed.discard(fd)
    return retries


def fsync_numbers(calls: list[Any]) -> list[int]:
    """The ``when=`` numbers that reach the operation's fsyncs (per thread, see kill_points)."""
    return sorted({n for name, n in st.kill_points(calls) if name == "fsync"})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", list(KINDS))
def test_eio_on_each_fsync(kind, zygote, tmp_path, figures):
    """EIO from the n-th fsync of each thread, for every n the save reaches (a spread in CI):
    the save fails with a typed EIO, nothing visible (also when the failing fsync is the parent
    directory's, after the rename: the rename is undone), earlier checkpoints intact (a failed
    overwrite leaves exactly the old state), no fsync retried; the next save succeeds."""
    template = tmp_path / "template"
    build(template)
    shutil.copytree(template, tmp_path / "count", symlinks=True)
    counted = zygote.run(save_op(tmp_path / "count", kind), trace=TRACE)
    assert counted.ok, counted.result
    numbers = fsync_numbers(counted.calls)
    count = pick(4, None)
    chosen = numbers if count is None or len(numbers) <= count else [*numbers[: count - 1], numbers[-1]]
    for n in chosen:
        case = tmp_path / f"eio_{n}"
        shutil.copytree(template, case, symlinks=True)
        outcome = zygote.run(save_op(case, kind), "-e", f"inject=fsync:error=EIO:when={n}", trace=TRACE)
        what = f"{kind} save, EIO on fsync #{n} of each thread"
        assert any(c.injected for c in outcome.calls), f"{what}: nothing injected"
        check_failed_save(case, kind, outcome.result, errno.EIO, what, figures)
        ok(fsync_retries(outcome.calls), f"{what}: fsync retried", figures)
        figures.add("errors.eio_fsync_cases")
        shutil.rmtree(case)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["plain", "overwrite"])
def test_eio_on_the_fsync_after_the_rename(kind, zygote, tmp_path, figures):
    """Regression: the fsync of the parent directory after the commit rename failed, the save raised,
    and yet the new checkpoint stayed visible (an overwrite had even deleted the old one). The fix
    undoes the rename; here the injection is aimed at exactly that fsync. strace counts ``when=``
    per thread and the save's fsync pool threads do several each, so ``-P`` limits tracing and
    injection to calls on the parent directory: a save fsyncs it once, after the rename."""
    build(tmp_path / "template")
    shutil.copytree(tmp_path / "template", tmp_path / "count", symlinks=True)
    parent = ("-P", str((tmp_path / "count" / KINDS[kind][0]).resolve().parent))
    counted = zygote.run(save_op(tmp_path / "count", kind), *parent, trace=TRACE)
    assert counted.ok, counted.result
    assert [c.name for c in counted.calls].count("fsync") == 1, counted.log
    case = tmp_path / "case"
    shutil.copytree(tmp_path / "template", case, symlinks=True)
    target = (case / KINDS[kind][0]).resolve()
    outcome = zygote.run(
        save_op(case, kind),
        "-P",
        str(target.parent),
        "-P",
        str(target),
        "-e",
        "inject=fsync:error=EIO:when=1",
        trace=TRACE,
    )
    injected = [c for c in outcome.calls if c.injected]
    assert [c.name for c in injected] == ["fsync"], outcome.log
    if kind == "plain":  # the undo moves the published target away again (an exchange is not traced)
        undo = [c for c in outcome.calls if c.name == "rename" and f'"{target}",' in c.rest.split(" ")[0]]
        assert undo, f"no undo of the rename after the failed parent fsync:\n{outcome.log}"
    check_failed_save(case, kind, outcome.result, errno.EIO, f"{kind}: EIO on the parent fsync", figures)
    figures.add("errors.eio_fsync_cases")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["plain", "incremental"])
def test_failed_fsync_is_never_retried_as_success(kind, zygote, tmp_path, figures):
    """Only the first fsync of each thread fails. A library that retried a failed fsync would get
    success from the second call and commit: the save must fail instead, and the log must show no
    second fsync of that descriptor."""
    build(tmp_path)
    outcome = zygote.run(save_op(tmp_path, kind), "-e", "inject=fsync:error=EIO:when=1", trace=TRACE)
    failed = [c for c in outcome.calls if c.name == "fsync" and c.injected]
    assert failed, f"no fsync failed:\n{outcome.log}"
    assert_storage_error(outcome.result, errno.EIO, f"{kind}: first fsync of each thread failed")
    ok(fsync_retries(outcome.calls), f"{kind}: fsync retried", figures)
    ok(check_checkpoints(tmp_path, expected=BEFORE, must_exist=BEFORE, may_exist=BEFORE), kind, figures)
    figures.add("errors.eio_fsync_cases")


@pytest.mark.timeout(120)
def test_eio_on_fdatasync(zygote, tmp_path, figures):
    """fdatasync failing everywhere: a save that calls it must fail; one that does not (this
    version: every durability point is an fsync) must be untouched by the injection."""
    build(tmp_path)
    outcome = zygote.run(save_op(tmp_path, "plain"), "-e", "inject=fdatasync:error=EIO", trace=TRACE)
    calls = [c for c in outcome.calls if c.name == "fdatasync"]
    if calls:
        assert_storage_error(outcome.result, errno.EIO, "EIO on every fdatasync")
        ok(fsync_retries(outcome.calls), "fdatasync retried", figures)
        figures.add("errors.eio_fsync_cases")
    else:
        assert outcome.ok, f"a save without fdatasync calls failed: {outcome.result}"
        figures.note("errors.fdatasync", "a save makes no fdatasync calls (every durability point is fsync)")
    ok(check_checkpoints(tmp_path, must_exist=BEFORE), "after fdatasync injection", figures)


EXDEV_CASES = {
    # name: (kind, strace injections)
    "plain": ("plain", ["inject=rename,renameat,renameat2:error=EXDEV"]),
    "overwrite": ("overwrite", ["inject=rename,renameat,renameat2:error=EXDEV"]),
    "incremental": ("incremental", ["inject=rename,renameat,renameat2:error=EXDEV"]),
    # Without renameat2 (EINVAL: as on file systems that lack it) an overwrite moves the old
    # checkpoint aside, then renames the new one in. Regression: when that second rename failed, the
    # old checkpoint stayed under its hidden name (and the next save's sweep deleted it).
    "overwrite-fallback": (
        "overwrite",
        ["inject=renameat2:error=EINVAL", "inject=rename:error=EXDEV:when=2"],
    ),
    "overwrite-fallback-fsync": (
        "overwrite",
        ["inject=renameat2:error=EINVAL", "inject=fsync:error=EIO:when=3"],
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(EXDEV_CASES))
def test_exdev_on_rename(name, zygote, tmp_path, figures):
    """A rename that fails with EXDEV (a target on another device): typed error, nothing visible,
    earlier checkpoints intact (an overwrite keeps exactly the old state), the next save succeeds."""
    kind, injections = EXDEV_CASES[name]
    build(tmp_path)
    args = [arg for injection in injections for arg in ("-e", injection)]
    outcome = zygote.run(save_op(tmp_path, kind), *args, trace=TRACE)
    code = errno.EIO if name.endswith("fsync") else errno.EXDEV
    assert any(c.injected and c.failed_with == errno.errorcode[code] for c in outcome.calls), outcome.log
    check_failed_save(tmp_path, kind, outcome.result, code, f"{name}: {injections}", figures)
    figures.add("errors.eio_fsync_cases" if code == errno.EIO else "errors.exdev_cases")
