"""Garbage collection of the chunk store: frees exactly the unreferenced chunks, never a live one,
whether it completes, crashes, is SIGKILLed, or races a save."""

from __future__ import annotations

import json
import os
import pathlib
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tests.helpers import assert_exact
from typer.testing import CliRunner

import ckptvault as cv
from ckptvault.cli.main import app
from ckptvault.engine.gc import GcReport, collect_garbage
from ckptvault.engine.reader import CheckpointReader
from ckptvault.storage.chunkstore import STORE_NAME, ChunkStore
from ckptvault.storage.local import LocalStorage

CHUNK = 4096
REPO = Path(__file__).resolve().parents[2]


# -- helpers ------------------------------------------------------------------------------------
def store_files(run: Path) -> list[Path]:
    """Everything in the chunk directories (chunks, temporary and foreign files)."""
    root = run / STORE_NAME / "chunks"
    return sorted(p for p in root.glob("*/*")) if root.is_dir() else []


def chunk_files(run: Path) -> dict[str, list[Path]]:
    """digest -> its chunk files (normally one)."""
    found: dict[str, list[Path]] = {}
    for path in store_files(run):
        digest, _, codec = path.name.partition(".")
        is_entry = path.is_symlink() or path.is_file()  # a directory named like a chunk is not one
        if (
            is_entry
            and len(digest) == 64
            and codec in ("raw", "zstd", "lz4")
            and digest[:2] == path.parent.name
        ):
            found.setdefault(digest, []).append(path)
    return found


def committed(run: Path) -> list[Path]:
    return sorted(p for p in run.iterdir() if not p.name.startswith(".") and (p / "manifest.json").is_file())


def referenced(checkpoints: list[Path]) -> set[str]:
    """Chunk digests the manifests reference, read through the strict manifest parser."""
    digests: set[str] = set()
    for path in checkpoints:
        with CheckpointReader(LocalStorage(), str(path)) as reader:
            for tensor in reader.manifest.tensors.values():
                digests.update(c.digest for c in tensor.chunks or ())
    return digests


def assert_store_is_exactly_referenced(run: Path) -> None:
    live = referenced(committed(run))
    assert set(chunk_files(run)) == live
    assert not [p for p in store_files(run) if p.name.startswith(".tmp-")]


def state_variant(k: int) -> dict[str, Any]:
    """States that share some chunks with each other: a common tensor, one per variant, and a
    table of which one row depends on the variant."""
    rng = np.random.default_rng(1000 + k)
    table = np.random.default_rng(7).standard_normal((64, 64)).astype(np.float32)
    table[(17 * k) % 64] = k
    return {
        "shared": torch.from_numpy(np.random.default_rng(1).standard_normal(4096).astype(np.float32)),
        "own": rng.standard_normal(2048).astype(np.float32),
        "table": table,
        "step": k,
    }


def save_variant(path: Path, k: int, **kwargs: Any) -> None:
    cv.save(path, state_variant(k), incremental=True, chunk_bytes=CHUNK, **kwargs)


def check_intact(path: Path, k: int) -> None:
    report = cv.verify(path)
    assert report.ok, (path, report.problems)
    assert_exact(state_variant(k), cv.load(path))


# -- basic collection ---------------------------------------------------------------------------
def test_gc_frees_exactly_the_unreferenced_chunks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for k in range(4):
        save_variant(run / f"ck{k}", k)
    cv.save(run / "plain", {"x": torch.ones(3)})  # a checkpoint without chunks
    before = chunk_files(run)
    assert set(before) == referenced(committed(run))
    for k in (0, 2):
        shutil.rmtree(run / f"ck{k}")
    live = referenced(committed(run))
    doomed = set(before) - live
    assert doomed and live

    dry = collect_garbage(run, dry_run=True)
    assert chunk_files(run) == before  # dry run deletes nothing
    freed = sum(path.stat().st_size for d in doomed for path in before[d])
    assert dry == GcReport(3, len(live), len(doomed), freed, 0)

    report = collect_garbage(run)
    assert report == dry
    assert set(chunk_files(run)) == live
    for k in (1, 3):
        check_intact(run / f"ck{k}", k)
    assert collect_garbage(run) == GcReport(3, len(live), 0, 0, 0)  # idempotent


def test_gc_of_a_run_without_a_store(tmp_path: Path) -> None:
    cv.save(tmp_path / "plain", {"x": torch.ones(3)})
    assert collect_garbage(tmp_path) == GcReport(0, 0, 0, 0, 0)
    assert not (tmp_path / STORE_NAME).exists()


def test_gc_cli(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_variant(run / "a", 0)
    save_variant(run / "b", 1)
    shutil.rmtree(run / "a")
    doomed = set(chunk_files(run)) - referenced(committed(run))
    runner = CliRunner()

    dry = runner.invoke(app, ["gc", str(run), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] is True and doc["deleted_chunks"] == len(doomed) and doc["checkpoints"] == 1
    assert set(doomed) <= set(chunk_files(run))

    done = runner.invoke(app, ["gc", str(run), "--json"])
    assert done.exit_code == 0, done.output
    doc = json.loads(done.stdout)
    assert {k: v for k, v in doc.items() if k != "dry_run"} == {
        k: v for k, v in json.loads(dry.stdout).items() if k != "dry_run"
    }
    assert doc["dry_run"] is False and doc["live_chunks"] == len(chunk_files(run))
    assert_store_is_exactly_referenced(run)

    text = runner.invoke(app, ["gc", str(run)])
    assert text.exit_code == 0 and "freed 0 chunks" in text.stdout
    missing = runner.invoke(app, ["gc", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    check_intact(run / "b", 1)


def _unused_prefix(chunks: Path, *taken: str) -> str:
    return next(p for p in (f"{i:02x}" for i in range(256)) if not (chunks / p).exists() and p not in taken)


def test_gc_removes_temporary_files_and_leaves_foreign_files_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_variant(run / "a", 0)
    chunks = run / STORE_NAME / "chunks"
    sub = next(p for p in chunks.iterdir() if p.is_dir())  # a directory holding live chunks
    spare = _unused_prefix(chunks)
    (chunks / spare).mkdir()
    temporaries = [sub / f".tmp-{secrets.token_hex(8)}", chunks / spare / ".tmp-0123456789abcdef"]
    for path in temporaries:
        path.write_bytes(b"half a chunk from a killed writer")
    elsewhere = spare + secrets.token_hex(31)
    foreign = [
        sub / "README.txt",
        sub / f"{elsewhere}.raw",  # a chunk name in the wrong directory
        chunks / spare / f"{elsewhere}.gz",  # not one of our codecs
        chunks / spare / f"{elsewhere.upper()}.raw",
        chunks / spare / f"{elsewhere}",  # no codec
        chunks / "notes.txt",  # not in a chunk directory at all
    ]
    for path in foreign:
        path.write_text("not ours")
    outside = tmp_path / "outside"
    outside.mkdir()
    linked = _unused_prefix(chunks, spare)
    victim = outside / f"{linked + secrets.token_hex(31)}.raw"
    victim.write_text("someone else's file")
    (chunks / linked).symlink_to(outside)  # a chunk directory that leads out of the store
    link_target = tmp_path / "precious.bin"
    link_target.write_text("precious")
    link = chunks / spare / f"{spare + secrets.token_hex(31)}.raw"
    link.symlink_to(link_target)  # an unreferenced chunk that is a symlink: the link goes, not its target

    report = collect_garbage(run)
    assert report.deleted_temporary == len(temporaries)
    assert report.deleted_chunks == 1 and not link.is_symlink() and link_target.read_text() == "precious"
    assert not any(path.exists() for path in temporaries)
    assert all(path.read_text() == "not ours" for path in foreign)
    assert victim.read_text() == "someone else's file"
    check_intact(run / "a", 0)


def test_gc_survives_a_directory_named_like_a_chunk(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_variant(run / "a", 0)
    save_variant(run / "b", 1)
    shutil.rmtree(run / "a")
    odd = run / STORE_NAME / "chunks" / "ab" / f"ab{'0' * 62}.raw"
    odd.mkdir(parents=True)
    collect_garbage(run)
    assert odd.is_dir()
    assert_store_is_exactly_referenced(run)


def test_gc_keeps_what_a_damaged_manifest_mentions(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_variant(run / "a", 0)
    save_variant(run / "b", 1)
    live_a = referenced([run / "a"])
    manifest = run / "a" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:-40])  # no longer parses
    with pytest.raises(cv.CorruptCheckpointError):
        cv.load(run / "a")
    report = collect_garbage(run)
    assert report.deleted_chunks == 0 and report.checkpoints == 2
    assert live_a <= set(chunk_files(run))


def test_gc_ignores_hidden_directories_and_non_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_variant(run / "a", 0)
    save_variant(run / "b", 1)
    only_b = referenced([run / "b"]) - referenced([run / "a"])
    os.rename(run / "b", run / ".b-being-deleted")  # what retention does before rmtree
    (run / "notes").mkdir()
    (run / "notes" / "todo.txt").write_text("x")
    report = collect_garbage(run)
    assert report.checkpoints == 1 and report.deleted_chunks == len(only_b) > 0
    assert (run / "notes" / "todo.txt").exists()
    check_intact(run / "a", 0)


# -- retention ----------------------------------------------------------------------------------
def test_manager_retention_keeps_only_the_chunks_of_the_kept_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    frozen = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = cv.TrainState({"model": model, "frozen": frozen}, optimizer)
    expected: dict[int, torch.Tensor] = {}
    with cv.CheckpointManager(
        run, every_n_steps=1, keep_last=2, incremental=True, chunk_bytes=CHUNK
    ) as manager:
        for step in range(1, 9):
            loss = model(torch.randn(8, 64)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            manager.step(state)
            expected[step] = model[0].weight.detach().clone()
            kept = committed(run)
            assert [p.name for p in kept] == [f"step_{s:08d}" for s in range(max(1, step - 1), step + 1)]
            assert set(chunk_files(run)) == referenced(kept)
    frozen_refs = referenced([run / "step_00000007"]) & referenced([run / "step_00000008"])
    assert frozen_refs  # the frozen layer (and anything else unchanged) is shared, not duplicated
    for step in (7, 8):
        assert cv.verify(run / f"step_{step:08d}").ok
        tree = cv.load(run / f"step_{step:08d}")
        assert torch.equal(tree["model"]["model"]["0.weight"], expected[step])
    assert_store_is_exactly_referenced(run)


# -- property test: random operations, crashes included ----------------------------------------
class Crash(Exception):
    """An injected failure in the middle of a save or a collection."""


def _counting(original: Any, limit: int, counter: list[int], lock: threading.Lock) -> Any:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            counter[0] += 1
            if counter[0] > limit:
                raise Crash(f"injected after {limit} calls")
        return original(self, *args, **kwargs)

    return wrapper


SAVE = st.tuples(st.just("save"), st.integers(0, 3))
DELETE = st.tuples(st.just("delete"), st.integers(0, 20))
OPS = st.lists(
    st.one_of(
        SAVE,
        SAVE,
        DELETE,
        DELETE,
        st.tuples(st.just("gc"), st.just(0)),
        st.tuples(st.just("gc_crash"), st.integers(0, 4)),
        st.tuples(st.just("save_crash"), st.integers(0, 8)),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_random_saves_deletes_and_collections_never_lose_a_committed_chunk(
    ops: list[tuple[str, int]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        saved: dict[str, int] = {}  # checkpoint name -> variant
        lock = threading.Lock()
        for counter, (op, arg) in enumerate(ops):
            name = f"ck{counter:03d}"
            if op == "save":
                save_variant(run / name, arg)
                saved[name] = arg
            elif op == "delete" and saved:
                victim = sorted(saved)[arg % len(saved)]
                shutil.rmtree(run / victim)
                del saved[victim]
            elif op == "gc":
                report = collect_garbage(run)
                assert report.checkpoints == len(saved)
                assert_store_is_exactly_referenced(run)
            elif op == "gc_crash":
                calls = [0]
                before = len(store_files(run))
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(pathlib.Path, "unlink", _counting(pathlib.Path.unlink, arg, calls, lock))
                    try:
                        collect_garbage(run)
                        crashed = False
                    except Crash:
                        crashed = True
                event(f"gc crashed: {crashed}")
                assert calls[0] == arg + 1 if crashed else calls[0] <= arg
                deletions = min(calls[0], arg)
                assert len(store_files(run)) == before - deletions
                if not crashed:
                    assert_store_is_exactly_referenced(run)
            elif op == "save_crash":
                calls = [0]
                k = arg % 4
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(ChunkStore, "put", _counting(ChunkStore.put, arg, calls, lock))
                    try:
                        save_variant(run / name, k)
                        crashed = False
                    except Crash:
                        crashed = True
                event(f"save crashed: {crashed}")
                if crashed:
                    assert calls[0] > arg
                    assert not (run / name).exists()
                    assert not [p for p in run.iterdir() if ".ckptvault-tmp." in p.name]
                else:
                    assert calls[0] <= arg  # it needed no more new chunks than allowed
                    saved[name] = k
            # After every operation: every committed checkpoint is intact.
            assert sorted(p.name for p in committed(run)) == sorted(saved)
            assert sorted(Path(p).name for p in cv.list_checkpoints(run)) == sorted(saved)
            for ck, k in saved.items():
                check_intact(run / ck, k)
        collect_garbage(run)
        assert_store_is_exactly_referenced(run)


def test_gc_crashing_midway_deletes_only_garbage_and_a_rerun_finishes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for k in range(4):
        save_variant(run / f"ck{k}", k)
    shutil.rmtree(run / "ck0")
    shutil.rmtree(run / "ck2")
    garbage = set(chunk_files(run)) - referenced(committed(run))
    assert len(garbage) > 3
    calls = [0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pathlib.Path, "unlink", _counting(pathlib.Path.unlink, 2, calls, threading.Lock()))
        with pytest.raises(Crash):
            collect_garbage(run)
    assert calls[0] == 3
    left = set(chunk_files(run))
    assert len(garbage - left) == 2 and referenced(committed(run)) <= left
    for k in (1, 3):
        check_intact(run / f"ck{k}", k)
    report = collect_garbage(run)
    assert report.deleted_chunks == len(garbage) - 2
    assert_store_is_exactly_referenced(run)


def test_save_crashing_midway_leaves_nothing_visible(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_variant(run / "ck0", 0)
    before = set(chunk_files(run))
    calls = [0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ChunkStore, "put", _counting(ChunkStore.put, 2, calls, threading.Lock()))
        with pytest.raises(Crash):
            save_variant(run / "ck1", 1)
    assert calls[0] > 2
    assert not (run / "ck1").exists()
    assert sorted(p.name for p in run.iterdir()) == sorted([STORE_NAME, "ck0"])  # no staging leftovers
    orphans = set(chunk_files(run)) - before
    assert 0 < len(orphans) <= 2  # chunks put before the crash: unreferenced, collected below
    check_intact(run / "ck0", 0)
    assert collect_garbage(run).deleted_chunks == len(orphans)
    assert_store_is_exactly_referenced(run)
    save_variant(run / "ck1", 1)  # the same save works afterwards
    check_intact(run / "ck1", 1)


# -- a real kill --------------------------------------------------------------------------------
_GC_CHILD = """
import sys
from ckptvault.engine.gc import collect_garbage
print("ready", flush=True)
collect_garbage(sys.argv[1])
print("done", flush=True)
"""


def _plant_garbage(run: Path, count: int) -> None:
    root = run / STORE_NAME / "chunks"
    for _ in range(count):
        digest = secrets.token_hex(32)
        folder = root / digest[:2]
        folder.mkdir(exist_ok=True)
        (folder / f"{digest}.raw").write_bytes(b"g" * 64)
    for _ in range(5):
        (root / "00").mkdir(exist_ok=True)
        (root / "00" / f".tmp-{secrets.token_hex(8)}").write_bytes(b"t")


@pytest.mark.faults
def test_sigkilled_gc_never_harms_a_committed_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for k in range(3):
        save_variant(run / f"ck{k}", k)
    live = referenced(committed(run))
    rnd = random.Random(20240611)
    killed_running = 0
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for _ in range(5):
        _plant_garbage(run, 1500)
        child = subprocess.Popen(
            [sys.executable, "-c", _GC_CHILD, str(run)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.0, 0.02))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        killed_running += child.returncode == -signal.SIGKILL
        assert live <= set(chunk_files(run))
        for k in range(3):
            check_intact(run / f"ck{k}", k)
    assert killed_running > 0  # at least one kill hit a running collection
    report = collect_garbage(run)
    assert report.checkpoints == 3 and report.live_chunks == len(live)
    assert_store_is_exactly_referenced(run)
    for k in range(3):
        check_intact(run / f"ck{k}", k)


# -- concurrency --------------------------------------------------------------------------------
def test_gc_waits_for_a_save_between_its_chunks_and_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    save_variant(run / "old", 0)
    shutil.rmtree(run / "old")  # everything in the store is garbage now
    old_chunks = set(chunk_files(run))
    entered, release = threading.Event(), threading.Event()
    original_sync = ChunkStore.sync

    def blocking_sync(self: ChunkStore) -> None:
        entered.set()
        assert release.wait(30)
        original_sync(self)

    monkeypatch.setattr(ChunkStore, "sync", blocking_sync)
    errors: list[BaseException] = []

    def save() -> None:
        try:
            save_variant(run / "new", 2)
        except BaseException as exc:
            errors.append(exc)

    saver = threading.Thread(target=save)
    saver.start()
    assert entered.wait(30)
    pending = set(chunk_files(run)) - old_chunks  # written, not yet referenced by any manifest
    assert pending
    seen_at_release: dict[str, Any] = {}

    def let_go() -> None:
        seen_at_release["files"] = set(chunk_files(run))
        seen_at_release["committed"] = (run / "new").exists()
        release.set()

    timer = threading.Timer(0.5, let_go)
    started = time.monotonic()
    timer.start()
    report = collect_garbage(run)  # must wait for the save's shared lock
    elapsed = time.monotonic() - started
    saver.join(30)
    timer.join()
    assert not errors, errors
    assert elapsed >= 0.45
    assert seen_at_release == {"files": pending | old_chunks, "committed": False}
    assert report.checkpoints == 1
    assert report.deleted_chunks == len(old_chunks - referenced([run / "new"]))
    assert pending <= set(chunk_files(run))
    check_intact(run / "new", 2)
    assert_store_is_exactly_referenced(run)


def test_concurrent_saves_in_threads_and_gc_leave_every_checkpoint_intact(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for k in range(4):
        save_variant(run / f"seed{k}", k)
    errors: list[BaseException] = []
    stop = threading.Event()

    def saver(offset: int) -> None:
        try:
            for i in range(6):
                save_variant(run / f"t{offset}_{i}", (offset + i) % 4)
        except BaseException as exc:
            errors.append(exc)

    def collector() -> None:
        try:
            while not stop.is_set():
                collect_garbage(run)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=saver, args=(n,)) for n in range(2)]
    gc_thread = threading.Thread(target=collector)
    gc_thread.start()
    for thread in threads:
        thread.start()
    for k in range(4):
        shutil.rmtree(run / f"seed{k}")
    for thread in threads:
        thread.join(60)
    stop.set()
    gc_thread.join(60)
    assert not errors, errors
    collect_garbage(run)
    assert_store_is_exactly_referenced(run)
    for offset in range(2):
        for i in range(6):
            check_intact(run / f"t{offset}_{i}", (offset + i) % 4)
