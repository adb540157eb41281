"""Stateful property test of a real run directory: saves with random metrics, pins, crashes and
restores, checking after every step that the newest, the best and the pinned checkpoints remain and
that nothing remains that no retention rule keeps."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import ckptvault as cv
from ckptvault.manager import kept_reasons
from ckptvault.storage.local import HOST_TAG, STAGING_MARK


class RunDirectory(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="ckptvault-stateful-"))
        self.model = torch.nn.Linear(2, 1)
        self.state = cv.TrainState(self.model)
        self.metrics: dict[int, float] = {}  # step -> val of every committed save
        self.pins: set[int] = set()
        self.manager = self._open()

    def _open(self) -> cv.CheckpointManager:
        # Retention alone is modelled here: background validation keeps the newest validated
        # checkpoint a little longer (tested in tests/test_validation.py), so it is off.
        return cv.CheckpointManager(
            self.root,
            keep_last=2,
            keep_best=2,
            monitor="val",
            mode="max",
            preemption_signals=(),
            validate="checksum",
        )

    def teardown(self) -> None:
        self.manager.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def on_disk(self) -> set[int]:
        return {int(p.name.split("_")[1]) for p in self.root.glob("step_*")}

    @rule(val=st.floats(min_value=0, max_value=1, allow_nan=False))
    def save(self, val: float) -> None:
        self.manager.step(self.state)
        self.manager.save(self.state, metrics={"val": val})
        self.metrics[self.state.step] = val

    @precondition(lambda self: bool(self.on_disk()))
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        step = data.draw(st.sampled_from(sorted(self.on_disk())))
        self.manager.pin(step)
        self.pins.add(step)

    @precondition(lambda self: bool(self.pins))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        step = data.draw(st.sampled_from(sorted(self.pins)))
        self.manager.unpin(step)
        self.pins.discard(step)

    @rule()
    def crash_and_restore(self) -> None:
        """The process dies (no close: the OS drops the lock) leaving a torn save behind; a new
        process opens the run and restores the newest checkpoint."""
        leftover = self.root / f".step_99999999{STAGING_MARK}{HOST_TAG}.999999999.dead"
        leftover.mkdir(exist_ok=True)
        (leftover / "data-00000.safetensors").write_bytes(b"torn")
        self.manager.close()
        self.manager = self._open()
        fresh = cv.TrainState(torch.nn.Linear(2, 1))
        info = self.manager.restore(fresh)
        if self.on_disk():
            assert info is not None and info.step == max(self.on_disk())
            self.state = fresh
        else:
            assert info is None

    @invariant()
    def newest_best_and_pinned_remain(self) -> None:
        disk = self.on_disk()
        if not self.metrics:
            return
        newest = max(self.metrics)
        assert newest in disk
        alive = {s: v for s, v in self.metrics.items() if s in disk}
        best_ever = max(self.metrics.values())  # the best checkpoint ever committed must survive
        assert any(v == best_ever for v in alive.values()), f"best {best_ever} deleted; alive {alive}"
        assert self.pins <= disk, f"pinned {self.pins - disk} deleted"

    @invariant()
    def nothing_unexplained_remains(self) -> None:
        if (self.root / "run.json").exists():
            reasons = kept_reasons(self.root)
            assert all(reasons.get(p.name) for p in self.root.glob("step_*")), reasons


TestRunDirectory = RunDirectory.TestCase
TestRunDirectory.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)
