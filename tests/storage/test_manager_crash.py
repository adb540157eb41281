"""A training run killed at any storage call leaves a run that a restarted process can resume.

Why: the torture suite's crash replay kills a run at the os boundary of the local backend; this is
the same replay at the :class:`~ckptvault.storage.base.Storage` boundary, so it holds for the
protocol's semantics (here :class:`~ckptvault.storage.memory.MemoryStorage`, an object store with
no rename), not for one backend's files. The scenario is a whole run of the manager -- open, four
incremental saves (chunk store, retention with ``keep_last=2``, the chunk GC retention triggers), a
pin, close -- on :class:`~ckptvault.testing.fault_storage.FaultyStorage`. It is run once without a
fault to count its storage calls (N), then once per crash point ``k`` in ``1..N``, dying before the
call and (a separate case) just after it took effect. Every ``k`` is replayed: no sampling (N is
about 170 and one replay with its checks takes a few hundredths of a second).

After each crash a "restarted process" looks at the inner backend with no faults and checks:

(a) a new manager can take the run over once the dead writer's lease has expired -- and not before,
    when the dead writer held it (the lease is the only single-writer guard an object store has);
(b) every checkpoint the run lists verifies completely (before and after the new manager opened
    the run: opening must not damage what is there);
(c) ``restore("latest")`` restores the last save whose commit reached the backend (known from the
    call log: save i commits step i; retention never deletes the newest checkpoint), bit for bit the
    state that save was given (model, optimizer, step, RNG); None only when no commit took effect;
(d) a step recorded in the pin list still has its checkpoint (the pin is written after the pinned
    step's save returned, so a recorded pin implies a committed checkpoint retention must keep);
(e) after a chunk garbage collection every remaining checkpoint still verifies (a crash must not
    leave a checkpoint referencing chunks the store does not count as live);
and the restarted run saves once more and closes cleanly.
"""

from __future__ import annotations

import contextlib
import copy
import random
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptvault as cv
from ckptvault.engine.gc import collect_garbage
from ckptvault.engine.rundir import RunDirectory
from ckptvault.engine.verify import verify_checkpoint
from ckptvault.errors import ConcurrentWriteError
from ckptvault.storage.base import Storage
from ckptvault.storage.memory import MemoryStorage
from ckptvault.testing.fault_storage import FaultyStorage, SimulatedCrash
from ckptvault.training import provenance

RUN = "run"
STEPS = 4
PINNED = 2  # retention (keep_last=2) would delete it at step 4 without the pin
LEASE_TTL = 300.0  # RunDirectory.acquire's default: the manager does not configure it
OPTIONS: dict[str, Any] = {
    "every_n_steps": 1,
    "keep_last": 2,
    "incremental": True,
    "chunk_bytes": 4096,  # the smallest allowed: the 32x32 weight (4 KiB) is one chunk
    "validate": "checksum",  # no background validation thread or process
    "preemption_signals": (),  # a dead manager must not leave signal handlers installed
}


class FakeClock:
    """The inner backend's clock: lease expiry moves when the test says, never by sleeping."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def new_state() -> cv.TrainState:
    """The smallest state with chunked tensors: a 32x32 linear layer and SGD with momentum. Every
    RNG is seeded: the saved RNG states are chunked too, so the run's calls depend on them."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 32)
    return cv.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def train_step(state: cv.TrainState) -> None:
    model = state.parts["model"]["model"]
    optimizer = state.parts["optimizer"]["optimizer"]
    loss = model(torch.randn(8, 32)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def scenario(storage: Storage, saved: dict[int, dict[str, Any]]) -> None:
    """The training run. ``saved`` gets, by step, a copy of the state each save is given -- taken
    before the save starts, since a crash just after its commit never returns to the loop."""
    state = new_state()
    manager = cv.CheckpointManager(RUN, storage=storage, **OPTIONS)
    try:
        for _ in range(STEPS):
            train_step(state)
            snapshot = copy.deepcopy(state.capture())
            snapshot["step"] = state.step + 1  # what manager.step makes it before saving
            saved[snapshot["step"]] = snapshot
            manager.step(state)
            if state.step == PINNED:
                manager.pin(PINNED)
    except BaseException:
        # A dead process runs no cleanup against storage: every call raises now. close() still
        # shuts the manager's threads down where it gets that far; its failure is expected.
        with contextlib.suppress(SimulatedCrash):
            manager.close()
        raise
    manager.close()


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of captured state trees (tensors, arrays, RNG tuples, plain values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b)) and np.asarray(a).dtype == np.asarray(b).dtype
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def listed(storage: Storage) -> list[str]:
    return [entry.key for entry in RunDirectory(RUN, storage).checkpoints()]


def assert_all_verify(storage: Storage, where: str) -> list[str]:
    keys = listed(storage)
    for key in keys:
        report = verify_checkpoint(storage, key)
        assert report.ok, f"{where}: {key} fails verification: {report.problems}"
    return keys


def open_after_crash(
    inner: MemoryStorage, clock: FakeClock, lease_held: bool, where: str
) -> cv.CheckpointManager:
    """(a): the dead writer's lease, when it held one, keeps a new manager out until it expires --
    and then no longer; a lease it never took or already released keeps nobody out."""
    if lease_held:
        with pytest.raises(ConcurrentWriteError):
            cv.CheckpointManager(RUN, storage=inner, **OPTIONS)
        clock.now += LEASE_TTL + 1
    try:
        return cv.CheckpointManager(RUN, storage=inner, **OPTIONS)
    except Exception as exc:  # the failure message is the point
        raise AssertionError(f"{where}: the run cannot be opened after the crash: {exc!r}") from exc


def check_recovery(
    inner: MemoryStorage,
    clock: FakeClock,
    saved: dict[int, dict[str, Any]],
    *,
    lease_held: bool,
    committed: int,
    where: str,
) -> None:
    """The invariants (a)-(e) of the module docstring, on the inner backend with no faults."""
    before = assert_all_verify(inner, f"{where}, before reopening")  # (b)
    manager = open_after_crash(inner, clock, lease_held, where)  # (a)
    try:
        keys = assert_all_verify(inner, f"{where}, after reopening")  # (b)
        assert keys == before, f"{where}: opening the run changed its checkpoints {before} -> {keys}"
        fresh = new_state()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a skipped (unverifiable) checkpoint warns: fail on it
            info = manager.restore(fresh)  # (c)
        if not committed:
            assert not keys, f"{where}: {keys} listed although no save committed"
            assert info is None, f"{where}: restored {info} although no save committed"
        else:
            # Retention never deletes the newest checkpoint: the last committed step is there.
            assert keys and keys[-1].endswith(f"step_{committed:08d}"), f"{where}: step {committed}: {keys}"
            assert info is not None, f"{where}: nothing restored although {keys} are listed"
            assert info.step == committed, f"{where}: restored step {info.step}, not {committed}"
            assert same(fresh.capture(), saved[info.step]), f"{where}: step {info.step} restored differs"
        pins = RunDirectory(RUN, inner).read_pins()  # (d)
        assert pins <= {PINNED}, f"{where}: pins {pins}"
        if PINNED in pins:
            assert any(k.endswith(f"step_{PINNED:08d}") for k in keys), f"{where}: pinned step gone: {keys}"
        collect_garbage(RUN, storage=inner)  # (e)
        assert assert_all_verify(inner, f"{where}, after gc") == keys
        # The restarted run goes on: one more save (reusing chunks the store kept), then a clean close.
        train_step(fresh)
        manager.step(fresh)
    finally:
        manager.close()
    assert_all_verify(inner, f"{where}, after the resumed save")


@pytest.fixture(autouse=True)
def _quick_and_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Five things, none about storage. One I/O thread: chunks are put by a thread pool, and with
    more than one thread the order of the calls -- so what crash point k means -- would vary.
    Opening a new run captures its provenance (installed packages, git): a quarter of a second,
    ~1000 times here, so it is captured once and reused. restore() sets the process's RNG states
    to the checkpoint's: other tests get theirs back. The run name is relative: run from an empty
    directory so nothing could land in the tree. Torch gets one intra-op thread: for a 32x32
    layer more only contend for the cores (it halves the file's runtime on a busy machine)."""
    monkeypatch.setenv("CKPTVAULT_IO_THREADS", "1")
    once = provenance.capture_provenance()
    monkeypatch.setattr(provenance, "capture_provenance", lambda **_: copy.deepcopy(once))
    monkeypatch.chdir(tmp_path)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def count_calls() -> list[str]:
    faulty = FaultyStorage(MemoryStorage(clock=FakeClock()))
    scenario(faulty, {})
    return faulty.log


def took_effect(call: int, k: int, after: bool) -> bool:
    """Whether call number ``call`` reached the inner backend in a run that died at call ``k``."""
    return call < k or (call == k and after)


def lease_held_at_crash(calls: list[str], k: int, after: bool) -> bool:
    """Whether the dead writer's run lease was taken and not released when it died at call k."""
    took = calls.index("acquire_lease") + 1
    gave = len(calls) - calls[::-1].index("lease.release")
    return took_effect(took, k, after) and not took_effect(gave, k, after)


def commits_at_crash(calls: list[str], k: int, after: bool) -> int:
    """How many of the run's saves had committed (save i commits step i) when it died at call k."""
    return sum(took_effect(i, k, after) for i, name in enumerate(calls, 1) if name == "txn.commit")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("after", [False, True], ids=["before-call", "after-call"])
def test_a_run_killed_at_any_storage_call_can_be_resumed(after: bool) -> None:
    calls = count_calls()
    # open (lease, recover, documents), 4 x (chunks, staged files, commit), a delete and its sweep, close
    assert len(calls) > 100, calls
    for name in ("acquire_lease", "txn.commit", "delete", "chunks.sweep", "lease.release"):
        assert name in calls, name
    threads = threading.active_count()
    with_checkpoints = without_checkpoints = 0
    for k in range(1, len(calls) + 1):
        where = f"crash {'after' if after else 'before'} call {k} ({calls[k - 1]})"
        clock = FakeClock()
        inner = MemoryStorage(clock=clock)
        faulty = FaultyStorage(inner, fail_at=k, after=after)
        saved: dict[int, dict[str, Any]] = {}
        with pytest.raises(SimulatedCrash):
            scenario(faulty, saved)
        assert faulty.calls == k, where
        assert faulty.log == calls[:k], f"{where}: the run is not deterministic"
        if listed(inner):
            with_checkpoints += 1
        else:
            without_checkpoints += 1
        check_recovery(
            inner,
            clock,
            saved,
            lease_held=lease_held_at_crash(calls, k, after),
            committed=commits_at_crash(calls, k, after),
            where=where,
        )
    assert with_checkpoints and without_checkpoints  # the crash points span "nothing committed" to "all done"
    # A dead manager's close() got as far as it could: no saver or validator thread left running.
    assert threading.active_count() <= threads
