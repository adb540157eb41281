"""TrainState: capture/restore round trips, and mid-epoch DataLoader resume at the next batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ckptvault as cv
from ckptvault.training.state import IncompleteStateError


def loader(num_workers: int = 0) -> torch.utils.data.DataLoader:
    data = torch.utils.data.TensorDataset(torch.arange(40).float().unsqueeze(1))
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_continues_with_the_next_unseen_batch(tmp_path: Path, num_workers: int) -> None:
    torch.manual_seed(7)
    state = cv.TrainState(loader=loader(num_workers))
    seen: list[list[float]] = []
    for _ in state.epochs(2):
        for (batch,) in state.batches():
            seen.append(batch.flatten().tolist())
            if len(seen) == 13:  # epoch 1, batch 3
                cv.save(tmp_path / "mid", state.capture())
                torch.rand(1)  # the rest of the uninterrupted run moves the RNG on
    torch.manual_seed(99)  # a different process start
    resumed = cv.TrainState(loader=loader(num_workers))
    resumed.restore(cv.load(tmp_path / "mid"))
    rest = []
    for _ in resumed.epochs(2):
        for (batch,) in resumed.batches():
            rest.append(batch.flatten().tolist())
            if len(rest) == 1:
                torch.rand(1)
    assert rest == seen[13:]
    first_epoch = [value for batch in seen[:10] for value in batch]
    assert sorted(first_epoch) == [float(i) for i in range(40)]  # an epoch is a permutation


def test_skipping_does_not_load_skipped_samples(tmp_path: Path) -> None:
    loads: list[int] = []

    class Counting(torch.utils.data.Dataset[int]):
        def __len__(self) -> int:
            return 20

        def __getitem__(self, index: int) -> int:
            loads.append(index)
            return index

    state = cv.TrainState(loader=torch.utils.data.DataLoader(Counting(), batch_size=5, shuffle=True))
    state.position.epoch_seed, state.position.batches_done = 123, 3
    assert len(list(state.batches())) == 1 and len(loads) == 5


def test_every_rng_round_trips(tmp_path: Path) -> None:
    np_gen = np.random.default_rng(3)
    torch_gen = torch.Generator().manual_seed(5)
    state = cv.TrainState(generators={"np": np_gen, "torch": torch_gen})
    cv.save(tmp_path / "r", state.capture())
    expected = (np_gen.random(), torch.rand(1, generator=torch_gen), np.random.rand(), torch.rand(1))
    state.restore(cv.load(tmp_path / "r"))
    got = (np_gen.random(), torch.rand(1, generator=torch_gen), np.random.rand(), torch.rand(1))
    assert expected[0] == got[0] and expected[2] == got[2]
    assert torch.equal(expected[1], got[1]) and torch.equal(expected[3], got[3])


def test_restore_refuses_mismatched_parts(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    full = cv.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    cv.save(tmp_path / "w", full.capture("weights"))
    with pytest.raises(IncompleteStateError, match="optimizer"):
        full.restore(cv.load(tmp_path / "w"))
    assert "optimizer 'optimizer'" in full.restore(cv.load(tmp_path / "w"), partial=True)[0]
    cv.save(tmp_path / "f", full.capture())
    with pytest.raises(cv.CheckpointError, match="was not given"):
        cv.TrainState(model).restore(cv.load(tmp_path / "f"))


def test_objects_without_state_dict_are_refused() -> None:
    with pytest.raises(TypeError, match="state_dict"):
        cv.TrainState(model=object())


def test_metrics_history_is_columnar_and_exact(tmp_path: Path) -> None:
    state = cv.TrainState()
    for step in range(1, 1001):
        state.step = step
        metrics: dict[str, object] = {"loss": 1.0 / step}
        if step % 100 == 0:
            metrics["val_acc"] = step / 1000
            metrics["note"] = "eval"  # not a number: not part of the history
        state.record_metrics(metrics)
    tree = state.capture()
    assert set(tree["metrics_history"]["metrics"]) == {"loss", "val_acc"}
    cv.save(tmp_path / "h", tree)
    restored = cv.TrainState()
    restored.restore(cv.load(tmp_path / "h"))
    assert list(restored.metrics_history.rows()) == list(state.metrics_history.rows())
    assert restored.metrics_history.column("val_acc")[99] == 0.1 and len(restored.metrics_history) == 1000


class CountingStatefulLoader:
    """The protocol of torchdata's StatefulDataLoader: iteration plus its own state_dict."""

    def __init__(self, n: int) -> None:
        self.n, self.next_index = n, 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        while self.next_index < self.n:
            self.next_index += 1
            yield self.next_index - 1
        self.next_index = 0

    def state_dict(self) -> dict[str, int]:
        return {"next_index": self.next_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_index = state["next_index"]


def test_stateful_loaders_resume_through_their_own_state_dict(tmp_path: Path) -> None:
    state = cv.TrainState(loader=CountingStatefulLoader(10))
    seen = []
    for batch in state.batches():
        seen.append(batch)
        if batch == 3:
            cv.save(tmp_path / "s", state.capture())
    resumed = cv.TrainState(loader=CountingStatefulLoader(10))
    resumed.restore(cv.load(tmp_path / "s"))
    assert list(resumed.batches()) == seen[4:]
