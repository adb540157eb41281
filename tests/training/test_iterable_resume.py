"""``TrainState.batches()`` over an ``IterableDataset`` (issue 19 item 2): exact mid-epoch resume through
the dataset's own ``state_dict`` when it has one and is iterated in the main process, else by replaying
and discarding the consumed batches (sharded by worker, random in the workers), with the cost logged."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import ckptvault as cv

ITEMS, BATCH = 30, 4


class Stream(IterableDataset[torch.Tensor]):
    """Sharded by worker; each item draws noise from torch's and numpy's global RNGs."""

    def __init__(self) -> None:
        self.produced = 0  # items produced by this copy (the main process's, with num_workers=0)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        shard, shards = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(shard, ITEMS, shards):
            self.produced += 1
            yield torch.tensor([float(i), float(torch.rand(())), float(np.random.rand())])


class Resumable(IterableDataset[torch.Tensor]):
    """Has its own position (as HF ``datasets`` streaming and torchdata nodes do) and its own RNG."""

    def __init__(self) -> None:
        self.next_item, self.produced = 0, 0
        self.rng = random.Random(0)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while self.next_item < ITEMS:
            i, self.next_item = self.next_item, self.next_item + 1
            self.produced += 1
            yield torch.tensor([float(i), self.rng.random()])
        self.next_item = 0  # the next epoch starts over

    def state_dict(self) -> dict[str, Any]:
        return {"next_item": self.next_item, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_item = state["next_item"]
        self.rng.setstate(state["rng"])


def _state(dataset: IterableDataset[torch.Tensor], workers: int, **options: Any) -> cv.TrainState:
    return cv.TrainState(loader=DataLoader(dataset, batch_size=BATCH, num_workers=workers, **options))


def _run(state: cv.TrainState, limit: int | None = None) -> list[tuple[torch.Tensor, float]]:
    """Batches, each with a draw the training loop makes after it (dropout, say)."""
    out = []
    for batch in state.batches():
        out.append((batch, float(torch.rand(()))))
        if limit is not None and len(out) == limit:
            break
    return out


def _reference(make: Any, workers: int, **options: Any) -> list[tuple[torch.Tensor, float]]:
    torch.manual_seed(0)
    np.random.seed(0)
    return _run(_state(make(), workers, **options))


def _resumed(
    make: Any, workers: int, stop: int, **options: Any
) -> tuple[list[tuple[torch.Tensor, float]], cv.TrainState]:
    torch.manual_seed(0)
    np.random.seed(0)
    state = _state(make(), workers, **options)
    head = _run(state, limit=stop)
    tree = state.capture()
    torch.manual_seed(99)
    np.random.seed(99)
    resumed = _state(make(), workers, **options)
    resumed.restore(tree)
    return head + _run(resumed), resumed


def _assert_same(a: list[tuple[torch.Tensor, float]], b: list[tuple[torch.Tensor, float]]) -> None:
    assert len(a) == len(b)
    for (xa, da), (xb, db) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and da == db


@pytest.mark.parametrize("workers", [0, 2])
def test_replay_resumes_exactly_and_reports_its_cost(workers: int, caplog: pytest.LogCaptureFixture) -> None:
    reference = _reference(Stream, workers)
    assert len(reference) == (ITEMS + BATCH - 1) // BATCH if workers == 0 else len(reference) > 0
    with caplog.at_level(logging.INFO, logger="ckptvault"):
        got, resumed = _resumed(Stream, workers, stop=3)
    _assert_same(reference, got)
    assert resumed.last_replay is not None and resumed.last_replay.batches == 3
    assert resumed.last_replay.samples == 3 * BATCH and resumed.last_replay.seconds >= 0
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "will be loaded again and discarded" in logged and "replayed and discarded 3 batches" in logged


def test_replay_in_the_main_process_does_not_move_the_loops_rng() -> None:
    """The loop's own draws after each batch equal a run where the dataset draws nothing: the
    dataset's draws come from private states."""

    class Quiet(Stream):
        def __iter__(self) -> Iterator[torch.Tensor]:
            for i in range(ITEMS):
                yield torch.tensor([float(i), 0.0, 0.0])

    draws = [d for _, d in _reference(Stream, 0)]
    assert draws == [d for _, d in _reference(Quiet, 0)]


def test_a_dataset_with_its_own_state_is_resumed_through_it_not_replayed() -> None:
    reference = _reference(Resumable, 0)
    got, resumed = _resumed(Resumable, 0, stop=3)
    _assert_same(reference, got)
    assert resumed.last_replay is None
    dataset = resumed.loader.dataset
    assert isinstance(dataset, Resumable) and dataset.produced == ITEMS - 3 * BATCH  # nothing loaded twice


def test_two_epochs_with_a_resume_in_the_second() -> None:
    def epochs(stop: int | None) -> list[tuple[torch.Tensor, float]]:
        torch.manual_seed(0)
        state = _state(Stream(), 2)
        out: list[tuple[torch.Tensor, float]] = []
        for epoch in state.epochs(2):
            if stop is not None and epoch == 1:
                out += _run(state, limit=stop)
                tree = state.capture()
                state = _state(Stream(), 2)
                state.restore(tree)
                stop = None
                out += _run(state)
                continue
            out += _run(state)
        return out

    _assert_same(epochs(None), epochs(2))


def test_replay_refuses_a_different_worker_count() -> None:
    state = _state(Stream(), 2)
    _run(state, limit=2)
    tree = state.capture()
    other = _state(Stream(), 0)
    other.restore(tree)
    with pytest.raises(ValueError, match="same worker count"):
        _run(other)


def test_drop_last_drops_each_workers_partial_batch() -> None:
    batches = [b for b, _ in _reference(Stream, 2, drop_last=True)]
    plain = list(DataLoader(Stream(), batch_size=BATCH, num_workers=2, drop_last=True))
    assert [len(b) for b in batches] == [len(b) for b in plain] and all(len(b) == BATCH for b in batches)
    assert [b[:, 0].tolist() for b in batches] == [b[:, 0].tolist() for b in plain]  # same items, same order
