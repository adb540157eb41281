"""Data position: resume a ``DataLoader`` mid-epoch at the next unseen batch, exactly.

A standard ``DataLoader(shuffle=True)`` draws its permutation (and its workers' base seed) from the
global RNG when an iterator is created, so an interrupted run that re-creates the iterator mid-epoch
sees a different order and disturbs the RNG stream. Instead, each epoch gets one recorded
``epoch_seed``; the epoch's loader is rebuilt with a sampler that derives the permutation from that
seed and starts after the samples already consumed (skipping happens on indices: no skipped sample is
ever loaded), and with its own ``torch.Generator`` seeded from it, so creating the iterator consumes
nothing from the global RNG and workers get the same base seed as in an uninterrupted run.

Samplers other than ``RandomSampler``/``SequentialSampler`` are iterated for their indices and the
consumed ones dropped, which is exact when the sampler is deterministic given its own state (as
``DistributedSampler`` is after ``set_epoch``). Loaders with their own ``state_dict`` (torchdata's
``StatefulDataLoader``) are used through it unchanged.

Randomness drawn while loading a sample (augmentation in ``__getitem__``, in workers or not) is made
a function of its place in the epoch by seeded loading (:mod:`.sample_rng`, per batch by default),
so it too resumes exactly, whatever ``num_workers`` was before and after. Loaders over iterable
datasets are handled by :mod:`.iterable`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .sample_rng import BATCH, GRANULARITIES, OFF, SeededCollate, SeededPositions, SeededSamples


@dataclass
class DataPosition:
    """Where the run is inside the current epoch."""

    epoch_seed: int | None = None  # drawn when an epoch starts; None between epochs
    batches_done: int = 0
    exhausted: bool = False  # every batch of the epoch was consumed: we are in the epoch's tail
    workers: int | None = None  # iterable datasets: the num_workers that loaded the epoch (replay needs it)
    # map-style datasets: the loader RNG granularity the epoch started with; a resumed epoch finishes
    # with it even when the restoring TrainState asks for another (the next epoch uses the new one)
    loader_rng: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "epoch_seed": self.epoch_seed,
            "batches_done": self.batches_done,
            "exhausted": self.exhausted,
        }
        if self.workers is not None:
            data["workers"] = self.workers
        if self.loader_rng is not None:
            data["loader_rng"] = self.loader_rng
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        seed, done, exhausted = (
            data.get("epoch_seed"),
            data.get("batches_done", 0),
            data.get("exhausted", False),
        )
        if (seed is not None and type(seed) is not int) or type(done) is not int or done < 0:
            raise ValueError(f"bad data position {data!r}")
        workers, granularity = data.get("workers"), data.get("loader_rng")
        if type(exhausted) is not bool or (workers is not None and (type(workers) is not int or workers < 0)):
            raise ValueError(f"bad data position {data!r}")
        if granularity is not None and granularity not in GRANULARITIES:
            raise ValueError(f"bad data position {data!r}: unknown loader_rng")
        return cls(seed, done, exhausted, workers, granularity)


def is_stateful_loader(loader: Any) -> bool:
    """torchdata's StatefulDataLoader and anything else that checkpoints its own position."""
    return callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    )


def draw_epoch_seed(loader: Any) -> int:
    """A fresh seed for an epoch, from the loader's generator if it has one, else torch's global RNG
    (exactly one draw either way, so the RNG stream advances identically in every run)."""
    import torch

    generator = getattr(loader, "generator", None)
    return int(torch.randint(0, 2**62, (), generator=generator).item())


def rebuilt_options(loader: Any, epoch_seed: int, collate_fn: Any) -> dict[str, Any]:
    """The user's ``DataLoader`` settings for the epoch's rebuilt loader, with its own generator
    seeded from the epoch seed (creating its iterator draws nothing from the global RNG)."""
    import torch

    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "generator": torch.Generator().manual_seed(epoch_seed),
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
        options["multiprocessing_context"] = loader.multiprocessing_context
    return options


class _ResumedSampler:
    """Yields the epoch's index order from ``start`` on; the order is fixed by ``indices``."""

    def __init__(self, indices: list[int], start: int) -> None:
        self._indices = indices
        self._start = start

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices[self._start :])

    def __len__(self) -> int:
        return max(0, len(self._indices) - self._start)


def _epoch_indices(loader: Any, seed: int) -> list[int]:
    import torch
    from torch.utils.data import RandomSampler, SequentialSampler

    sampler = loader.sampler
    if type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(len(sampler.data_source), generator=generator).tolist()
    if type(sampler) is SequentialSampler:
        return list(range(len(sampler.data_source)))
    return [int(i) for i in sampler]  # a deterministic custom sampler


class EpochLoaders:
    """Builds the loader to iterate for the rest of the current epoch (see the module docstring).

    With per-batch or per-sample RNG (:mod:`.sample_rng`) the dataset and ``collate_fn`` are wrapped
    and the sampler yields ``(seed, index)`` keys. A loader with ``persistent_workers=True`` is built
    once and kept: each later epoch only resets its sampler, so its workers live as long as the run
    (without seeded loading their streams would then run on across epochs, which a resumed run cannot
    reproduce; seeded loading makes that irrelevant)."""

    def __init__(self, loader_rng: str = BATCH) -> None:
        if loader_rng not in GRANULARITIES:
            raise ValueError(f"loader_rng must be one of {GRANULARITIES}, got {loader_rng!r}")
        self.loader_rng = loader_rng
        # (user loader, granularity, built loader, its sampler)
        self._kept: tuple[Any, str, Any, Any] | None = None

    def for_epoch(self, loader: Any, position: DataPosition) -> Any:
        from torch.utils.data import DataLoader, IterableDataset

        if position.epoch_seed is None:
            position.epoch_seed = draw_epoch_seed(loader)
            position.loader_rng = self.loader_rng
        # a checkpoint written before the granularity was recorded: the configured one
        granularity = position.loader_rng or self.loader_rng
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            raise TypeError(
                "TrainState.batches() resumes torch DataLoaders, or loaders with their own "
                f"state_dict() (torchdata StatefulDataLoader); got {type(loader).__qualname__}"
            )
        if loader.batch_size is None:
            raise TypeError(
                "loaders built with a custom batch_sampler are not resumable yet; pass batch_size"
            )
        start = position.batches_done * loader.batch_size
        indices = _epoch_indices(loader, position.epoch_seed)
        seeded = granularity != OFF
        persistent = seeded and loader.num_workers > 0 and loader.persistent_workers
        if persistent and self._kept is not None and self._kept[:2] == (loader, granularity):
            _, _, kept, kept_sampler = self._kept
            kept_sampler.reset(indices, start, position.epoch_seed)
            kept.generator.manual_seed(position.epoch_seed)
            return kept
        dataset: Any = loader.dataset
        collate_fn = loader.collate_fn
        sampler: Any
        if seeded:
            samples = SeededSamples(dataset, granularity)
            dataset, collate_fn = samples, SeededCollate(collate_fn, samples)
            sampler = SeededPositions(indices, start, position.epoch_seed)
        else:
            sampler = _ResumedSampler(indices, start)
        options = rebuilt_options(loader, position.epoch_seed, collate_fn)
        options.update(batch_size=loader.batch_size, drop_last=loader.drop_last)
        if loader.num_workers > 0:
            options["persistent_workers"] = persistent
        built = DataLoader(dataset, sampler=sampler, **options)
        if persistent:
            self._kept = (loader, granularity, built, sampler)
        return built
