"""Per-sample RNG in ``TrainState.batches()`` (issue 19 item 1): augmentation drawn in ``__getitem__``
from torch, numpy and Python's global RNGs resumes exactly mid-epoch, with any ``num_workers`` on
either side of the interruption, persistent workers, user ``worker_init_fn``s, ``generator=`` loaders
and custom samplers -- and loading in the main process never moves the training loop's RNG stream."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

import ckptvault as cv
from ckptvault.training.sample_rng import current_sample_seed, sample_seed

SAMPLES, BATCH = 24, 4


class Augmented(Dataset[tuple[torch.Tensor, int]]):
    """Each sample draws from all three global RNGs, as torchvision/albumentations transforms do."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        noise = torch.rand(3) + float(np.random.rand()) + random.random()
        return torch.full((3,), float(i)) + noise, i


def _loader(num_workers: int = 0, **options: Any) -> DataLoader[Any]:
    if num_workers == 0:
        options.pop("persistent_workers", None)
    return DataLoader(Augmented(), batch_size=BATCH, shuffle=True, num_workers=num_workers, **options)


def _batches(state: cv.TrainState, limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for batch in state.batches():
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def _epochs(make: Callable[[], DataLoader[Any]], epochs: int, **state_options: Any) -> list[Any]:
    torch.manual_seed(7)
    state = cv.TrainState(loader=make(), **state_options)
    seen = []
    for _ in state.epochs(epochs):
        seen += _batches(state)
    return seen


def _assert_same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for (xa, ia), (xb, ib) in zip(a, b, strict=True):
        assert torch.equal(ia, ib)
        assert torch.equal(xa, xb)


def _interrupted(
    first: Callable[[], DataLoader[Any]], then: Callable[[], DataLoader[Any]], stop: int, **state_options: Any
) -> list[Any]:
    """One epoch: ``stop`` batches from a run on ``first``, captured; the rest from a fresh state on
    ``then`` restored from that capture."""
    torch.manual_seed(7)
    state = cv.TrainState(loader=first(), **state_options)
    head = _batches(state, limit=stop)
    tree = state.capture()
    torch.manual_seed(12345)  # the restarted process's RNGs start elsewhere; restore fixes them
    resumed = cv.TrainState(loader=then(), **state_options)
    resumed.restore(tree)
    return head + _batches(resumed)


@pytest.mark.parametrize("granularity", ["sample", "batch"])
@pytest.mark.parametrize("workers_before,workers_after", [(0, 0), (2, 2), (2, 0), (0, 2)])
def test_mid_epoch_resume_is_exact_with_augmentation_in_workers(
    workers_before: int, workers_after: int, granularity: str
) -> None:
    reference = _epochs(lambda: _loader(0), 1, loader_rng=granularity)
    got = _interrupted(
        lambda: _loader(workers_before), lambda: _loader(workers_after), stop=3, loader_rng=granularity
    )
    _assert_same(reference, got)


def test_per_batch_seeding_uses_the_datasets_own_getitems() -> None:
    class Batched(Augmented):
        calls = 0

        def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
            Batched.calls += 1
            return [self[i] for i in indices]

    seen = _epochs(lambda: DataLoader(Batched(), batch_size=BATCH, shuffle=True), 1, loader_rng="batch")
    assert Batched.calls == SAMPLES // BATCH and len(seen) == SAMPLES // BATCH
    per_sample = _epochs(
        lambda: DataLoader(Batched(), batch_size=BATCH, shuffle=True), 1, loader_rng="sample"
    )
    assert Batched.calls == SAMPLES // BATCH  # per sample, it is bypassed
    assert [i.tolist() for _, i in seen] == [i.tolist() for _, i in per_sample]  # same order
    assert not torch.equal(seen[0][0], per_sample[0][0])  # other draws: one stream per batch


def test_per_batch_is_the_default() -> None:
    default = _epochs(lambda: _loader(0), 1)
    _assert_same(default, _epochs(lambda: _loader(0), 1, loader_rng="batch"))
    assert not torch.equal(default[0][0], _epochs(lambda: _loader(0), 1, loader_rng="sample")[0][0])


@pytest.mark.parametrize("saved,restoring", [("sample", "batch"), ("batch", "sample"), ("off", "batch")])
def test_a_resumed_epoch_finishes_with_the_granularity_it_started_with(saved: str, restoring: str) -> None:
    """Changing ``loader_rng`` between runs (or upgrading past a change of its default) must not
    make the rest of the interrupted epoch differ; the next epoch uses the new setting."""
    np.random.seed(3), random.seed(3)  # "off" draws from the global streams as they are
    reference = _epochs(lambda: _loader(0), 1, loader_rng=saved)
    np.random.seed(3), random.seed(3)
    torch.manual_seed(7)
    state = cv.TrainState(loader=_loader(0), loader_rng=saved)
    head = _batches(state, limit=3)
    tree = state.capture()
    assert tree["data"]["loader_rng"] == saved
    resumed = cv.TrainState(loader=_loader(0), loader_rng=restoring)
    resumed.restore(tree)
    _assert_same(reference, head + _batches(resumed))
    resumed._complete_epoch()
    _batches(resumed, limit=1)
    assert resumed.position.loader_rng == restoring


def test_a_data_position_with_an_unknown_loader_rng_is_refused() -> None:
    from ckptvault.training.data import DataPosition

    assert DataPosition.from_dict({"epoch_seed": 1, "loader_rng": "batch"}).loader_rng == "batch"
    with pytest.raises(ValueError, match="loader_rng"):
        DataPosition.from_dict({"epoch_seed": 1, "loader_rng": "worker"})


def test_an_unknown_loader_rng_is_refused() -> None:
    with pytest.raises(ValueError, match="loader_rng"):
        cv.TrainState(loader=_loader(0), loader_rng="worker")


def test_two_workers_give_the_same_samples_as_the_main_process() -> None:
    _assert_same(_epochs(lambda: _loader(0), 2), _epochs(lambda: _loader(2), 2))


def test_with_loader_rng_off_worker_augmentation_does_not_resume() -> None:
    """The opt-out really is a plain DataLoader stream: the failure issue 19 reported comes back."""
    reference = _epochs(lambda: _loader(2), 1, loader_rng="off")
    got = _interrupted(lambda: _loader(2), lambda: _loader(2), stop=3, loader_rng="off")
    assert [torch.equal(a[0], b[0]) for a, b in zip(reference, got, strict=True)][3:] != [True] * 3


@pytest.mark.parametrize("granularity", ["sample", "batch"])
def test_loading_in_the_main_process_leaves_the_global_rngs_alone(granularity: str) -> None:
    state = cv.TrainState(loader=_loader(0), loader_rng=granularity)
    state.position.epoch_seed = 99  # drawing it is the one global draw an epoch makes
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    batches = _batches(state)
    after = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert len(batches) == SAMPLES // BATCH
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1])
    assert before[2] == after[2]
    assert current_sample_seed() is None


def test_the_loops_own_draws_are_the_same_with_and_without_workers() -> None:
    """Dropout-like draws between batches: identical whether samples load in workers or not."""

    def draws(workers: int) -> list[float]:
        torch.manual_seed(3)
        state = cv.TrainState(loader=_loader(workers))
        out = []
        for _ in state.batches():
            out.append(float(torch.rand(())))
        return out

    assert draws(0) == draws(2)


def test_persistent_workers_live_across_epochs_and_stay_exact() -> None:
    class Pids(Augmented):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            x, _ = super().__getitem__(i)
            return x, os.getpid()

    def make() -> DataLoader[Any]:
        return DataLoader(Pids(), batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)

    torch.manual_seed(7)
    state = cv.TrainState(loader=make())
    pids = []
    for _ in state.epochs(2):
        pids.append({int(p) for _, ps in _batches(state) for p in ps})
    assert pids[0] == pids[1] and os.getpid() not in pids[0]  # the same two workers served both epochs
    values = [x for x, _ in _epochs(make, 2)]
    plain = [x for x, _ in _epochs(lambda: _loader(0), 2)]
    assert all(torch.equal(a, b) for a, b in zip(values, plain, strict=True))


_INIT_CALLS: list[int] = []


def _mark_worker(worker_id: int) -> None:
    _INIT_CALLS.append(worker_id)
    torch.manual_seed(1000 + worker_id)  # a user seeding in worker_init_fn changes nothing per sample


class InitSeen(Augmented):
    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, index = super().__getitem__(i)
        return x, index + 1000 * len(_INIT_CALLS)  # 1000 in a worker whose init ran, 0 otherwise


def test_user_worker_init_fn_still_runs() -> None:
    torch.manual_seed(7)
    state = cv.TrainState(
        loader=DataLoader(InitSeen(), batch_size=BATCH, num_workers=2, worker_init_fn=_mark_worker)
    )
    batches = _batches(state)
    assert all(int(i.min()) >= 1000 for _, i in batches)
    plain = _epochs(lambda: DataLoader(Augmented(), batch_size=BATCH), 1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, plain, strict=True))


class EveryOtherReversed(Sampler[int]):
    """A custom (deterministic) sampler."""

    def __iter__(self) -> Iterator[int]:
        return iter(list(range(SAMPLES))[::-2] + list(range(SAMPLES))[::2])

    def __len__(self) -> int:
        return SAMPLES


def test_generator_loaders_and_custom_samplers_resume_exactly() -> None:
    def with_generator(workers: int) -> Callable[[], DataLoader[Any]]:
        return lambda: _loader(workers, generator=torch.Generator().manual_seed(5))

    def custom(workers: int) -> Callable[[], DataLoader[Any]]:
        return lambda: DataLoader(
            Augmented(), batch_size=BATCH, sampler=EveryOtherReversed(), num_workers=workers
        )

    for make in (with_generator, custom):
        _assert_same(_epochs(make(0), 1), _interrupted(make(2), make(0), stop=2))


def test_a_sample_drawn_twice_in_an_epoch_gets_two_augmentations() -> None:
    def make() -> DataLoader[Any]:
        sampler = torch.utils.data.RandomSampler(range(SAMPLES), replacement=True, num_samples=64)
        return DataLoader(Augmented(), batch_size=BATCH, sampler=sampler)

    seen: dict[int, list[torch.Tensor]] = {}
    for x, i in _epochs(make, 1):
        for row, index in zip(x, i.tolist(), strict=True):
            seen.setdefault(index, []).append(row)
    repeated = [rows for rows in seen.values() if len(rows) > 1]
    assert repeated and all(not torch.equal(rows[0], rows[1]) for rows in repeated)


class OwnGenerator(Augmented):
    """Keeps its own generator, derived from the sample's seed as the docs say."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        seed = current_sample_seed()
        assert seed is not None
        rng = np.random.default_rng(seed)
        return torch.full((3,), float(i)) + torch.from_numpy(rng.random(3)).float(), i


@pytest.mark.parametrize("granularity", ["sample", "batch"])
def test_a_datasets_own_generator_derived_from_the_sample_seed_resumes(granularity: str) -> None:
    def make(workers: int) -> Callable[[], DataLoader[Any]]:
        return lambda: DataLoader(OwnGenerator(), batch_size=BATCH, shuffle=True, num_workers=workers)

    reference = _epochs(make(0), 1, loader_rng=granularity)
    _assert_same(reference, _interrupted(make(2), make(0), stop=2, loader_rng=granularity))
    noise = torch.cat([x for x, _ in reference]) - torch.cat([i for _, i in reference])[:, None].float()
    assert len({tuple(row.tolist()) for row in noise}) == SAMPLES  # every sample its own draws


def test_sample_seeds_are_spread() -> None:
    seeds = {sample_seed(e, p) for e in range(50) for p in range(200)}
    assert len(seeds) == 50 * 200 and all(0 <= s < 2**64 for s in seeds)
