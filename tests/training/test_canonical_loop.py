"""The README's canonical loop, run in-process: preemption without an inner ``break``, and a crash
right after the post-evaluation save, both resume to the same result as an uninterrupted run."""

from __future__ import annotations

import contextlib
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import assert_exact

import ckptvault as cv

EPOCHS = 3


class Crash(Exception):
    pass


def run(
    run_dir: Path,
    *,
    preempt_at: int | None = None,
    crash_after_eval_of: int | None = None,
    async_save: bool = False,
) -> dict:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6), torch.randint(0, 2, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = cv.TrainState(model=model, optimizer=opt, loader=loader)
    with cv.CheckpointManager(
        run_dir, every_n_steps=5, keep_last=2, keep_best=1, monitor="val_acc", mode="max"
    ) as manager:
        manager.restore(state)
        for epoch in state.epochs(EPOCHS):
            for x, y in state.batches():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if preempt_at is not None and state.step + 1 == preempt_at:
                    os.kill(os.getpid(), signal.SIGUSR1)
                manager.step(state, metrics={"loss": loss.item()})
            acc = float(torch.rand(()).item())  # "evaluation" that consumes randomness
            manager.save(state, metrics={"val_acc": acc})
            if crash_after_eval_of == epoch:
                raise Crash
        if manager.should_stop:
            return {}
        manager.save(state)
    return state.capture()


@pytest.mark.parametrize("async_save", [False, True])
def test_preemption_without_break_stops_and_resumes_exactly(tmp_path: Path, async_save: bool) -> None:
    reference = run(tmp_path / "ref")
    assert run(tmp_path / "run", preempt_at=11, async_save=async_save) == {}  # stopped early, cleanly
    newest = cv.info(max(cv.list_checkpoints(tmp_path / "run")))
    assert newest.step == 11 and newest.metadata["reason"] == "preemption"
    assert_exact(reference, run(tmp_path / "run", async_save=async_save))


def test_crash_after_the_evaluation_save_does_not_repeat_the_epoch_tail(tmp_path: Path) -> None:
    reference = run(tmp_path / "ref")
    with contextlib.suppress(Crash):
        run(tmp_path / "run", crash_after_eval_of=1)
    resumed = run(tmp_path / "run")
    assert_exact(reference, resumed)  # includes the metrics history: no duplicated val_acc row


def test_seed_recipe_keeps_each_explicit_weights_save(tmp_path: Path) -> None:
    state = cv.TrainState(torch.nn.Linear(2, 2))
    with cv.CheckpointManager(
        tmp_path,
        every_n_epochs=10,
        weights=cv.Scope(every_n_epochs=1, keep_best=3, monitor="val_acc", mode="max"),
    ) as manager:
        for epoch in state.epochs(4):
            manager.step(state)
            manager.save(state, metrics={"val_acc": epoch / 10}, scope="weights")
    reasons = {cv.info(p).metadata["reason"] for p in cv.list_checkpoints(tmp_path)}
    assert reasons == {"explicit"}  # the epoch trigger did not rewrite the post-evaluation save
