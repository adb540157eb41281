"""Concurrent writers of one target, overwrite under a concurrent reader, and refusals that must
leave existing directories untouched."""

import fcntl
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ckptvault
from ckptvault import CheckpointError, CheckpointExistsError, ConcurrentWriteError

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_save_worker.py"
STAGING_MARK = ".ckptvault-tmp."
ROUNDS = 10
OVERWRITES = 120

pytestmark = pytest.mark.faults


def _worker_module():
    spec = importlib.util.spec_from_file_location("_ckptvault_save_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _worker_module()


def spawn(*args, cwd):
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )


def wait_for(paths, procs, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"helper exited early: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.001)


def snapshot(root):
    """Every path under root with its bytes (files) or None (directories)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = Path(path).read_bytes()
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_writers_one_target(tmp_path):
    procs = [spawn("race", tmp_path, worker, ROUNDS, cwd=tmp_path) for worker in (1, 2)]
    try:
        for r in range(ROUNDS):
            wait_for([tmp_path / f"ready{r}.{w}" for w in (1, 2)], procs)
            (tmp_path / f"go{r}").touch()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    results = [dict(line.split(" ", 1) for line in out.splitlines()) for out, _ in outputs]

    overlapped = 0
    for r in range(ROUNDS):
        outcome = {w: results[i][str(r)] for i, w in enumerate((1, 2))}
        winners = [w for w, text in outcome.items() if text == "ok"]
        assert len(winners) == 1, f"round {r}: {outcome}"
        (loser,) = set(outcome) - set(winners)
        error = outcome[loser].split(" ", 2)
        assert error[0] == "err" and error[1] in (
            CheckpointExistsError.__name__,
            ConcurrentWriteError.__name__,
        ), f"round {r}: loser got {outcome[loser]}"
        overlapped += "while this save ran" in outcome[loser] or error[1] == ConcurrentWriteError.__name__
        target = tmp_path / f"round{r}" / "ckpt"
        report = ckptvault.verify(target)
        assert report.ok, report.problems
        assert W.same(ckptvault.load(target), W.make_state(winners[0], r)), (
            f"round {r}: not the winner's state"
        )
        assert os.listdir(tmp_path / f"round{r}") == ["ckpt"], "the loser left something behind"
    print(f"rounds where both saves overlapped until the commit: {overlapped}/{ROUNDS}")
    assert overlapped >= 1, "the two writers never actually overlapped; the race was not exercised"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_overwrite_under_a_concurrent_reader(tmp_path):
    target = tmp_path / "run" / "ckpt"
    states = {tag: W.overwrite_state(tag) for tag in "AB"}
    ckptvault.save(target, states["A"])
    stop = tmp_path / "stop"
    reader = spawn("reader", target, stop, cwd=tmp_path)
    try:
        wait_for([Path(str(stop) + ".ready")], [reader])
        for i in range(OVERWRITES):
            ckptvault.save(target, states["B" if i % 2 == 0 else "A"], overwrite=True)
        stop.touch()
        out, err = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err[-2000:]
    result = json.loads(out.splitlines()[-1])
    print(result)
    assert result["n_errors"] == 0, (
        f"{result['n_errors']} loads failed during overwrite: {result['errors'][:5]}"
    )
    assert result["mixed"] == 0, result
    assert sum(result["counts"].values()) >= 5, result

    # Last save was A (OVERWRITES is even); the directory is exactly one committed checkpoint, nothing else.
    assert ckptvault.verify(target).ok
    assert W.same(ckptvault.load(target), states["A"])
    assert os.listdir(target.parent) == ["ckpt"], os.listdir(target.parent)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("hold_seconds", [0.05, None], ids=["momentary", "stuck"])
def test_sweeper_locking_a_fresh_staging_dir(tmp_path, monkeypatch, hold_seconds):
    # Another writer's sweep_staging() flocks every staging directory it finds for a moment, also a
    # live writer's that was created a moment ago. Simulate that deterministically: lock the staging
    # directory right after it is created (a second open file description), and release it after
    # ``hold_seconds`` (None: never, as if the other process hung while holding it).
    held = []
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        if STAGING_MARK in os.fspath(path) and not held:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(fd)
            if hold_seconds is not None:
                threading.Timer(hold_seconds, fcntl.flock, (fd, fcntl.LOCK_UN)).start()

    monkeypatch.setattr(os, "mkdir", mkdir)
    target = tmp_path / "ckpt"
    try:
        ckptvault.save(target, {"w": np.arange(3.0)})
    except CheckpointError as exc:
        if hold_seconds is not None:
            pytest.fail(f"a momentary lock by a sweeper failed the save: {exc!r}")
        assert not target.exists()
    except Exception as exc:
        pytest.fail(f"save raised {type(exc).__name__} (not a CheckpointError): {exc!r}")
    else:
        assert hold_seconds is not None, "saved although its staging directory was never locked by it"
        assert ckptvault.verify(target).ok
    finally:
        monkeypatch.undo()
        time.sleep(0.1 if hold_seconds else 0)
        for fd in held:
            os.close(fd)
    assert held, "the staging directory was never created through os.mkdir; the test did nothing"
    leftovers = [n for n in os.listdir(tmp_path) if STAGING_MARK in n]
    assert leftovers == [], f"the save left its staging directory behind: {leftovers}"


def test_save_over_existing_without_overwrite(tmp_path):
    target = tmp_path / "ckpt"
    old = {"w": np.arange(10.0), "tag": "old"}
    ckptvault.save(target, old, metadata={"step": 1})
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointExistsError):
        ckptvault.save(target, {"w": np.zeros(3), "tag": "new"})
    assert snapshot(tmp_path) == before
    assert ckptvault.verify(target).ok
    loaded = ckptvault.load(target)
    assert loaded["tag"] == "old"
    np.testing.assert_array_equal(loaded["w"], old["w"])


def test_overwrite_replaces_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "ckpt"
    ckptvault.save(target, {"tag": "old", "w": np.ones(5)})
    ckptvault.save(target, {"tag": "new", "w": np.zeros(7)}, overwrite=True)
    assert ckptvault.verify(target).ok
    assert ckptvault.load(target)["tag"] == "new"
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_into_non_empty_foreign_directory(tmp_path, overwrite):
    target = tmp_path / "data"
    (target / "nested").mkdir(parents=True)
    (target / "notes.txt").write_text("precious")
    (target / "nested" / "model.pt").write_bytes(b"\x80\x02legacy")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointExistsError):
        ckptvault.save(target, {"w": np.arange(4.0)}, overwrite=overwrite)
    assert snapshot(tmp_path) == before, "a refused save touched the directory or left staging behind"


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_onto_a_file_or_symlink(tmp_path, overwrite):
    real = tmp_path / "real"
    ckptvault.save(real, {"w": np.arange(4.0)})
    (tmp_path / "file").write_bytes(b"not a directory")
    os.symlink(real, tmp_path / "link")
    before = snapshot(tmp_path)
    for name in ("file", "link"):
        with pytest.raises(CheckpointExistsError):
            ckptvault.save(tmp_path / name, {"w": np.zeros(2)}, overwrite=overwrite)
    assert snapshot(tmp_path) == before
    assert ckptvault.verify(real).ok


def test_save_into_empty_existing_directory(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    ckptvault.save(target, {"w": np.arange(3.0)})
    assert ckptvault.verify(target).ok
    assert sorted(os.listdir(tmp_path)) == ["empty"]
