"""Two-tier checkpoints: CheckpointManager(mirror=...) uploads each commit in the background.

The mirror is the in-memory backend (object-store semantics) behind a gate that holds uploads
(``begin``) until a test opens it, or fails them on purpose; or the local backend in another
directory, given as a location string. Nothing sleeps to wait for the uploader: tests wait on the
gate's events or on ``Mirror.flush``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import ckptvault as cv
from ckptvault.cli.main import app
from ckptvault.engine.gc import collect_garbage
from ckptvault.engine.rundir import RunDirectory
from ckptvault.manager import kept_reasons
from ckptvault.manager.mirror import Mirror
from ckptvault.manager.tiers import read_tiers, tier_of
from ckptvault.storage.base import Storage
from ckptvault.storage.local import LocalStorage
from ckptvault.storage.memory import MemoryStorage

KEY = "bucket/run"


class GatedStorage:
    """A storage whose checkpoint writes (``begin``) wait for ``gate`` and fail ``failures`` times
    first; everything else goes straight to ``inner``."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.failures = 0
        self.begins = 0
        self.broken_reads = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open(self, target: str) -> Any:
        if self.broken_reads:
            raise cv.StorageError(errno.ECONNRESET, "simulated outage of the mirror (reads)")
        return self.inner.open(target)

    def begin(self, target: str, *, overwrite: bool) -> Any:
        self.begins += 1
        self.entered.set()
        if self.failures > 0:
            self.failures -= 1
            raise cv.StorageError(errno.EIO, "simulated outage of the mirror")
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner.begin(target, overwrite=overwrite)


@pytest.fixture
def remote() -> GatedStorage:
    return GatedStorage(MemoryStorage())


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Mirror, "BACKOFF_SECONDS", 0.01)


def make_state(seed: int = 0, width: int = 32) -> cv.TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(width, width)
    return cv.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def train_step(state: cv.TrainState) -> None:
    model = state.parts["model"]["model"]
    optimizer = state.parts["optimizer"]["optimizer"]
    loss = model(torch.randn(8, model.in_features)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def local_names(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.is_dir() and not p.name.startswith("."))


def remote_names(storage: Storage, key: str = KEY) -> list[str]:
    return sorted(e.name for e in storage.list(key) if e.kind == "checkpoint")


def mirrored(run: Path, storage: Any, **options: Any) -> cv.CheckpointManager:
    settings: dict[str, Any] = {"every_n_steps": 1, "validate": "checksum", "mirror": (storage, KEY)}
    return cv.CheckpointManager(run, **{**settings, **options})


def steps(manager: cv.CheckpointManager, state: cv.TrainState, n: int) -> None:
    for _ in range(n):
        train_step(state)
        manager.step(state)


@pytest.fixture
def recorded() -> Iterator[list[warnings.WarningMessage]]:
    """Warnings from any thread (the uploader's included) while the test runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def texts(caught: list[warnings.WarningMessage], part: str) -> list[str]:
    return [str(w.message) for w in caught if part in str(w.message)]


def test_the_loop_does_not_wait_for_the_upload(tmp_path: Path, remote: GatedStorage) -> None:
    remote.gate.clear()
    state = make_state()
    with mirrored(tmp_path / "run", remote) as manager:
        train_step(state)
        info = manager.step(state)  # returns while the upload is held at the gate
        assert info is not None and local_names(tmp_path / "run") == ["step_00000001"]
        assert remote.entered.wait(10)
        assert remote_names(remote.inner) == []
        assert manager.mirror is not None and manager.mirror.unuploaded() == ["step_00000001"]
        tiers = read_tiers(RunDirectory(tmp_path / "run"))
        assert (
            tiers is not None
            and tier_of(tiers, "step_00000001", info.checkpoint_id, local=True) == "uploading"
        )
        remote.gate.set()
        assert manager.mirror.flush(10)
        assert remote_names(remote.inner) == ["step_00000001"]
        tiers = read_tiers(RunDirectory(tmp_path / "run"))
        assert tiers is not None and tier_of(tiers, "step_00000001", info.checkpoint_id, local=True) == "both"
    back = cv.load(tmp_path / "run" / "step_00000001")
    assert torch.equal(back["model"]["model"]["weight"], state.parts["model"]["model"].weight)


def test_retention_never_deletes_what_the_mirror_lacks(tmp_path: Path, remote: GatedStorage) -> None:
    remote.gate.clear()
    state = make_state()
    run = tmp_path / "run"
    with mirrored(run, remote, keep_last=1) as manager:
        assert manager.mirror is not None
        steps(manager, state, 3)
        assert local_names(run) == ["step_00000001", "step_00000002", "step_00000003"]  # none uploaded
        remote.gate.set()
        assert manager.mirror.flush(10)
        steps(manager, state, 1)  # the newest the mirror holds (3) stays, and 4 is not uploaded yet
        assert local_names(run) == ["step_00000003", "step_00000004"]
        assert manager.mirror.flush(10)
        steps(manager, state, 1)
        assert local_names(run) == ["step_00000004", "step_00000005"]
    assert local_names(run) == ["step_00000005"]  # closing uploaded the rest: retention ran once more
    assert remote_names(remote.inner) == [f"step_{i:08d}" for i in range(1, 6)]  # mirror_keep_last=None


def test_a_local_budget_deletes_the_oldest_uploaded_first(
    tmp_path: Path, remote: GatedStorage, recorded: list[warnings.WarningMessage]
) -> None:
    state = make_state(width=128)
    run = tmp_path / "run"
    with mirrored(run, remote) as manager:  # no keep_last: only the budget deletes
        assert manager.mirror is not None
        steps(manager, state, 1)
        one = sum(p.stat().st_size for p in (run / "step_00000001").iterdir())
        manager.close()
    with mirrored(run, remote, local_budget_bytes=int(2.5 * one)) as manager:
        assert manager.mirror is not None
        for _ in range(4):
            assert manager.mirror.flush(10)
            steps(manager, state, 1)
        assert local_names(run) == ["step_00000004", "step_00000005"]
        assert texts(recorded, "local_budget_bytes") == []
        remote.gate.clear()  # un-uploaded checkpoints stay, over the budget or not
        assert manager.mirror.flush(10)
        steps(manager, state, 3)
        assert local_names(run) == ["step_00000006", "step_00000007", "step_00000008"]
        assert texts(recorded, "over local_budget_bytes")
        remote.gate.set()
        assert manager.mirror.flush(10)
    assert remote_names(remote.inner) == [f"step_{i:08d}" for i in range(1, 9)]


def test_falling_behind_raises_a_typed_error_and_each_failure_warns(
    tmp_path: Path, remote: GatedStorage, recorded: list[warnings.WarningMessage]
) -> None:
    remote.failures = 10**6
    state = make_state()
    with mirrored(tmp_path / "run", remote, mirror_max_behind=2) as manager:
        assert manager.mirror is not None
        steps(manager, state, 2)
        train_step(state)
        with pytest.raises(cv.MirrorBehindError) as caught:
            manager.step(state)
        assert isinstance(caught.value, cv.StorageError) and "3 checkpoints behind" in str(caught.value)
        assert "step_00000003" in local_names(tmp_path / "run")  # committed locally before the error
        assert manager.mirror.flush(10)
        assert len(texts(recorded, "failed (attempt")) == 3 * Mirror.RETRIES
        with pytest.raises(cv.MirrorBehindError, match="simulated outage"):
            manager.save(state)
    assert texts(recorded, "closing with step_00000001, step_00000002, step_00000003")
    assert remote_names(remote.inner) == []


def test_a_failed_upload_is_retried(
    tmp_path: Path, remote: GatedStorage, recorded: list[warnings.WarningMessage]
) -> None:
    remote.failures = 2
    state = make_state()
    with mirrored(tmp_path / "run", remote) as manager:
        assert manager.mirror is not None
        steps(manager, state, 1)
        assert manager.mirror.flush(10)
        assert manager.mirror.unuploaded() == []
    assert remote.begins == 3 and remote_names(remote.inner) == ["step_00000001"]
    failed = texts(recorded, "failed (attempt")
    assert len(failed) == 2 and all("retrying" in text for text in failed)


def test_what_one_manager_left_unuploaded_the_next_uploads(
    tmp_path: Path, remote: GatedStorage, recorded: list[warnings.WarningMessage]
) -> None:
    remote.failures = 10**6
    state = make_state()
    with mirrored(tmp_path / "run", remote) as manager:
        steps(manager, state, 2)
    assert texts(recorded, "not uploaded to the mirror")
    remote.failures = 0
    with mirrored(tmp_path / "run", remote) as manager:
        assert manager.mirror is not None and manager.mirror.flush(10)
    assert remote_names(remote.inner) == ["step_00000001", "step_00000002"]


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_restore_on_an_empty_run_pulls_from_the_mirror_and_resumes_exactly(tmp_path: Path, kind: str) -> None:
    reference = make_state(0)
    for _ in range(6):
        train_step(reference)
    target: Any = (MemoryStorage(), KEY) if kind == "memory" else str(tmp_path / "mirror")
    options: dict[str, Any] = {"every_n_steps": 3, "validate": "checksum", "mirror": target}
    options |= {"incremental": True, "chunk_bytes": 4096}
    first = make_state(0)
    with cv.CheckpointManager(tmp_path / "machine_a", **options) as manager:
        assert manager.restore(first) is None
        steps(manager, first, 3)
    resumed = make_state(seed=99)  # another machine: another initialization, nothing on its disk
    with cv.CheckpointManager(tmp_path / "machine_b", **options) as manager:
        info = manager.restore(resumed)
        assert info is not None and info.step == 3 and resumed.step == 3
        assert local_names(tmp_path / "machine_b") == ["step_00000003"]
        steps(manager, resumed, 3)
    assert resumed.step == 6
    got, want = resumed.parts["model"]["model"], reference.parts["model"]["model"]
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    momentum = [s["momentum_buffer"] for s in resumed.parts["optimizer"]["optimizer"].state.values()]
    expected = [s["momentum_buffer"] for s in reference.parts["optimizer"]["optimizer"].state.values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, expected, strict=True))
    storage, key = target if kind == "memory" else (LocalStorage(target), target)
    assert remote_names(storage, key) == ["step_00000003", "step_00000006"]  # the resumed run mirrors too


def test_sigterm_gives_the_uploads_a_bounded_grace(
    tmp_path: Path, remote: GatedStorage, recorded: list[warnings.WarningMessage]
) -> None:
    state = make_state()
    with mirrored(tmp_path / "run", remote, every_n_steps=1000, mirror_grace_seconds=30) as manager:
        steps(manager, state, 1)
        os.kill(os.getpid(), signal.SIGTERM)  # uploads healthy: the preemption checkpoint makes it
        train_step(state)
        info = manager.step(state)
        assert manager.should_stop and info is not None and info.metadata["reason"] == "preemption"
        assert remote_names(remote.inner) == ["step_00000002"] and not texts(recorded, "preemption:")
    remote.gate.clear()
    with mirrored(tmp_path / "run", remote, every_n_steps=1000, mirror_grace_seconds=0.3) as manager:
        os.kill(os.getpid(), signal.SIGTERM)
        train_step(state)
        started = time.monotonic()
        info = manager.step(state)
        waited = time.monotonic() - started
        assert info is not None and info.step == 3 and manager.should_stop
        assert 0.3 <= waited < 5.0
        (left,) = texts(recorded, "preemption:")
        assert "step_00000003" in left and "mirror_grace_seconds=0.3" in left
        remote.gate.set()  # (lets the held upload end, so the test leaves no thread behind)
    assert "step_00000003" in local_names(tmp_path / "run")


def test_ls_shows_each_checkpoints_tier(tmp_path: Path, remote: GatedStorage) -> None:
    state = make_state()
    run = tmp_path / "run"

    def listed() -> dict[str, dict[str, Any]]:
        result = CliRunner().invoke(app, ["ls", "--json", str(run)])
        assert result.exit_code == 0, result.output
        return {Path(row["path"]).name: row for row in json.loads(result.output)}

    def tiers() -> dict[str, str]:
        return {name: row["tier"] for name, row in listed().items()}

    with mirrored(run, remote, keep_last=1) as manager:
        assert manager.mirror is not None
        for _ in range(3):
            steps(manager, state, 1)
            assert manager.mirror.flush(10)
        assert tiers() == {"step_00000001": "remote", "step_00000002": "both", "step_00000003": "both"}
        remote.gate.clear()
        remote.entered.clear()
        steps(manager, state, 1)
        assert remote.entered.wait(10)
        assert tiers()["step_00000004"] == "uploading"
        rows = listed()  # what keep_last=1 alone would delete, and why the mirror keeps it
        assert rows["step_00000004"]["kept_because"] == ["latest", "last 1", "not on the mirror yet"]
        assert rows["step_00000003"]["kept_because"] == ["newest on the mirror"]
        remote.gate.set()
    result = CliRunner().invoke(app, ["ls", str(run)])
    assert result.exit_code == 0 and "tier" in result.output and "remote" in result.output
    plain = tmp_path / "plain"
    with cv.CheckpointManager(plain, every_n_steps=1, validate="checksum") as manager:
        steps(manager, make_state(), 1)
    result = CliRunner().invoke(app, ["ls", "--json", str(plain)])
    assert result.exit_code == 0 and "tier" not in json.loads(result.output)[0]  # not mirrored: no column


def test_the_mirror_is_a_run_with_its_own_retention(tmp_path: Path, remote: GatedStorage) -> None:
    state = make_state(width=64)
    with mirrored(
        tmp_path / "run", remote, incremental=True, chunk_bytes=4096, mirror_keep_last=2
    ) as manager:
        assert manager.mirror is not None
        for _ in range(4):
            steps(manager, state, 1)
            assert manager.mirror.flush(10)
    mirror_run = RunDirectory(KEY, remote.inner)
    assert remote_names(remote.inner) == ["step_00000003", "step_00000004"]
    doc = mirror_run.read_run()
    assert doc is not None and doc["scopes"]["full"]["keep_last"] == 2
    assert [r["name"] for r in mirror_run.read_index()["records"]] == ["step_00000003", "step_00000004"]
    assert set(kept_reasons(mirror_run)) == {"step_00000003", "step_00000004"}
    assert collect_garbage(KEY, storage=remote.inner, dry_run=True).deleted_chunks == 0  # already swept
    for name in ("step_00000003", "step_00000004"):
        assert cv.verify(tmp_path / "run" / name).ok


def test_one_writer_per_mirror(tmp_path: Path, remote: GatedStorage) -> None:
    with mirrored(tmp_path / "a", remote), pytest.raises(cv.ConcurrentWriteError):
        mirrored(tmp_path / "b", remote)
    with mirrored(tmp_path / "b", remote) as manager:  # released by the first one's close
        assert manager.mirror is not None


def test_a_damaged_mirrored_checkpoint_is_skipped_for_the_next_older(
    tmp_path: Path, recorded: list[warnings.WarningMessage]
) -> None:
    mirror = tmp_path / "mirror"
    options: dict[str, Any] = {"every_n_steps": 3, "validate": "checksum", "mirror": str(mirror)}
    state = make_state()
    with cv.CheckpointManager(tmp_path / "machine_a", **options) as manager:
        steps(manager, state, 6)
    data = mirror / "step_00000006" / "data-00000.safetensors"
    damaged = bytearray(data.read_bytes())
    damaged[-10] ^= 0x01
    data.write_bytes(bytes(damaged))
    with cv.CheckpointManager(tmp_path / "machine_b", **options) as manager:
        info = manager.restore(make_state(seed=5))
        assert info is not None and info.step == 3
    (skipped,) = texts(recorded, "could not pull")
    assert "step_00000006" in skipped and "digest" in skipped
    assert local_names(tmp_path / "machine_b") == ["step_00000003"]  # nothing of the damaged one


def test_a_failing_mirror_fails_the_restore_instead_of_starting_fresh(
    tmp_path: Path, remote: GatedStorage
) -> None:
    state = make_state()
    with mirrored(tmp_path / "machine_a", remote) as manager:
        steps(manager, state, 2)
    with mirrored(tmp_path / "machine_b", remote) as manager:
        remote.broken_reads = True
        with pytest.raises(cv.StorageError, match="simulated outage"):
            manager.restore(make_state(seed=5))
        assert local_names(tmp_path / "machine_b") == []
        remote.broken_reads = False
        info = manager.restore(make_state(seed=5))  # the outage over: the newest one comes back
        assert info is not None and info.step == 2


def test_async_saves_are_mirrored_once_committed(tmp_path: Path, remote: GatedStorage) -> None:
    remote.gate.clear()
    state = make_state()
    with mirrored(tmp_path / "run", remote, async_save=True, mirror_keep_last=2) as manager:
        assert manager.mirror is not None
        steps(manager, state, 3)  # each step waits only for the host copy (and the previous commit)
        manager.wait()
        assert local_names(tmp_path / "run") == ["step_00000001", "step_00000002", "step_00000003"]
        assert remote_names(remote.inner) == []
        remote.gate.set()
        assert manager.mirror.flush(10) and manager.mirror.unuploaded() == []
    assert remote_names(remote.inner) == ["step_00000002", "step_00000003"]


def test_uploads_hold_while_the_loop_saves(
    tmp_path: Path, remote: GatedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's save must not share the CPU and disk with an upload: the uploader waits at its
    next part boundary while a local save runs, and goes on after."""
    from ckptvault.manager.mirror_config import LeaseRenewer

    state = make_state()
    with mirrored(tmp_path / "run", remote) as manager:
        assert manager.mirror is not None
        seen: list[bool] = []
        save = manager._saver.save

        def watching(*args: Any, **kwargs: Any) -> Any:
            seen.append(manager.mirror.loop_idle.is_set())  # type: ignore[union-attr]
            return save(*args, **kwargs)

        monkeypatch.setattr(manager._saver, "save", watching)
        steps(manager, state, 2)
        assert seen == [False, False] and manager.mirror.loop_idle.is_set()
        assert manager.mirror.flush(10)
    idle = threading.Event()
    renewer = LeaseRenewer(manager.mirror._lease, idle)  # type: ignore[union-attr]
    passed = threading.Event()
    worker = threading.Thread(target=lambda: (renewer(1), passed.set()))
    worker.start()
    assert not passed.wait(0.3)  # held while the loop saves
    idle.set()
    assert passed.wait(5)
    worker.join()


def test_a_pull_shows_a_progress_bar_on_a_terminal_and_counts_every_byte() -> None:
    import io

    from ckptvault.manager.mirror_config import ProgressLog

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    with ProgressLog("pulling step_00000003 from s3://b/[run]", total=40 << 20, stream=screen) as progress:
        threads = [threading.Thread(target=lambda: [progress(1 << 20) for _ in range(10)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert progress.done == 40 << 20  # from four threads at once, nothing lost
    assert "pulling step_00000003" in screen.getvalue() and "[run]" in screen.getvalue()
    quiet = io.StringIO()  # not a terminal: no bar, only log lines
    with ProgressLog("pulling", stream=quiet) as progress:
        progress(5)
    assert quiet.getvalue() == "" and progress.done == 5


def test_a_run_mirrored_to_an_object_store_writes_files_at_its_size(tmp_path: Path) -> None:
    """Copies keep files as they are, so the local run writes them at the mirror's preferred size:
    they then upload and pull as mid-sized objects, several at once."""
    store = MemoryStorage()
    store.file_bytes = 64 * 1024  # as an object store would prefer (S3Storage: 64 MiB)
    state = make_state(width=256)  # ~260 KiB of weights
    with mirrored(tmp_path / "run", store) as manager:
        steps(manager, state, 1)
        assert manager.mirror is not None and manager.mirror.flush(10)
    files = [p for p in (tmp_path / "run" / "step_00000001").iterdir() if p.name.endswith(".safetensors")]
    assert len(files) >= 3  # one ~260 KiB state in several files (a bigger tensor gets its own)
    with cv.CheckpointManager(tmp_path / "plain", every_n_steps=1, validate="checksum") as manager:
        steps(manager, make_state(width=256), 1)
    plain = [p for p in (tmp_path / "plain" / "step_00000001").iterdir() if p.name.endswith(".safetensors")]
    assert len(plain) == 1  # without a mirror: the local default (one file up to 4 GiB)
    resumed = make_state(seed=5, width=256)
    with mirrored(tmp_path / "fresh", store) as manager:
        info = manager.restore(resumed)
    assert info is not None and torch.equal(
        resumed.parts["model"]["model"].weight, state.parts["model"]["model"].weight
    )
