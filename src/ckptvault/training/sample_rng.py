"""Seeded loading: random augmentation depends on its place in the epoch, not on a worker.

A plain ``DataLoader`` gives each worker one RNG stream (seeded from the iterator's base seed and the
worker id) and the worker draws every augmentation of every sample it loads from that stream. After a
mid-epoch resume the rebuilt loader's workers start their streams again at the epoch's worker seeds
while the samples they load are the epoch's later ones, so every augmentation after the resume point
differs from the uninterrupted run (and it differs again when ``num_workers`` changes).

Here the epoch's sampler yields ``(seed, index)`` keys, the seed derived in the main process from
(epoch seed, position in the epoch's order), and the dataset is wrapped so that right before each
``__getitem__`` torch's CPU generator, numpy's global ``RandomState`` and Python's ``random`` are seeded
from the key. A worker's stream is simply replaced; nothing of it survives between samples. Collation
is seeded the same way from the batch's first key. So a sample's augmentation is a function of the
epoch seed and its position alone: resume is exact after skipping, with any ``num_workers`` on either
side of the interruption, persistent workers or not, and two draws of the same index in one epoch
(a sampler with replacement) still get different augmentations.

In the main process (``num_workers=0``) the global RNG states are saved before a batch's samples are
loaded and put back after its collation, so loading data never moves the training loop's own RNG
stream (dropout, noise) -- otherwise that stream would depend on how many workers load the data.

``"batch"`` granularity (``TrainState``'s default) seeds once per batch instead, from the batch's first
key, and loads the batch's samples (through the dataset's own ``__getitems__`` when it has one) and
collates them in that one stream. A sample's augmentation then depends on its batch-mates' draws too,
but batches are fixed sets of positions (a resume starts at a batch boundary), so resume is just as
exact and as independent of ``num_workers``. It is the default because of cost: reseeding three
generators right before a sample's transforms, with their states and the seeding code evicted from
the CPU caches by the previous sample, costs 17-26 us (measured in benchmarks/loader_rng.py), 7 % of a
cheap 250-340 us augmentation; once per batch it is noise.

CUDA generators are not seeded per sample: data loading runs on the CPU. A dataset holding its *own*
generator (``self.rng = np.random.default_rng(0)``) is not reseeded either; derive it from
:func:`current_sample_seed` inside ``__getitem__`` instead.
"""

from __future__ import annotations

import _random
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

_MASK64 = (1 << 64) - 1
SAMPLE, BATCH, OFF = "sample", "batch", "off"
GRANULARITIES = (SAMPLE, BATCH, OFF)
_COLLATE_SALT = 0xC011A7E5EED
_current_seed: int | None = None  # the seed of the sample being loaded in this process, if any


def sample_seed(epoch_seed: int, position: int) -> int:
    """A 64-bit seed for the sample at ``position`` of an epoch (splitmix64 of the pair): nearby
    positions and nearby epoch seeds give unrelated seeds."""
    z = (epoch_seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def current_sample_seed() -> int | None:
    """The seed of the sample being loaded right now (inside ``__getitem__`` under per-sample RNG), for
    a dataset that keeps its own generator: ``rng = np.random.default_rng(current_sample_seed())``.
    None outside per-sample loading."""
    return _current_seed


_seeder: Callable[[int], None] | None = None


def _seeders() -> Callable[[int], None]:
    """The three seeders bound once per process (torch imported lazily, as everywhere here)."""
    global _seeder
    if _seeder is None:
        import torch

        torch_seed = torch.default_generator.manual_seed
        numpy_seed = np.random.mtrand._rand.seed  # np.random.seed's target; drops the cached Gaussian
        python_seed, python = _random.Random.seed, random._inst

        def seed_all(seed: int) -> None:
            torch_seed(seed)
            numpy_seed((seed ^ (seed >> 32)) & 0xFFFFFFFF)
            python_seed(python, seed)
            python.gauss_next = None  # type: ignore[attr-defined]

        _seeder = seed_all
    return _seeder


def seed_global_rngs(seed: int) -> None:
    """Seeds torch's CPU generator, numpy's global RandomState and Python's ``random`` from ``seed``.

    Under ``loader_rng="sample"`` this runs before every sample, so it goes straight to the seeders
    bound once (~5 us for all three instead of ~7-9 us through the public functions) while seeding
    exactly as the public functions do: ``torch.default_generator.manual_seed`` rather than
    ``torch.manual_seed`` (which also queues seeds for every accelerator backend, ~100x dearer);
    the global ``RandomState``'s own ``seed`` (what ``np.random.seed`` forwards to); the C
    ``Random.seed`` of ``random``'s shared instance plus the ``gauss_next`` reset that ``random.seed``
    adds in Python. tests/training/test_sample_rng_seed.py holds the equivalence."""
    global _current_seed
    _current_seed = seed
    _seeders()(seed)


GlobalRngState = tuple[Any, Any, Any]


def capture_global_rngs() -> GlobalRngState:
    import torch

    return torch.default_generator.get_state(), np.random.get_state(), random.getstate()


def restore_global_rngs(saved: GlobalRngState) -> None:
    global _current_seed
    import torch

    torch.default_generator.set_state(saved[0])
    np.random.set_state(saved[1])
    random.setstate(saved[2])
    _current_seed = None


def _in_main_process() -> bool:
    from torch.utils.data import get_worker_info

    return get_worker_info() is None


class SeededPositions:
    """The epoch's sampler under per-sample RNG: ``(seed, index)`` keys for positions ``start`` on.

    Mutable (:meth:`reset`) so that one ``DataLoader`` with persistent workers serves every epoch: the
    sampler lives in the main process, so the workers never need to know the epoch."""

    def __init__(self, indices: Sequence[int], start: int, epoch_seed: int) -> None:
        self.reset(indices, start, epoch_seed)

    def reset(self, indices: Sequence[int], start: int, epoch_seed: int) -> None:
        self._indices, self._start, self._epoch_seed = indices, start, epoch_seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed, indices = self._epoch_seed, self._indices
        for position in range(self._start, len(indices)):
            yield sample_seed(seed, position), indices[position]

    def __len__(self) -> int:
        return max(0, len(self._indices) - self._start)


class SeededSamples:
    """A map-style view of the user's dataset whose keys are ``(seed, index)``; see the module docstring.

    ``__getitems__`` (which the ``DataLoader`` prefers for a whole batch) is where the main process
    saves its RNG states; :class:`SeededCollate` puts them back once the batch is collated. Per sample,
    a user dataset's own ``__getitems__`` is bypassed (samples are loaded one at a time, each under its
    seed); per batch it is used."""

    def __init__(self, dataset: Any, granularity: str = SAMPLE) -> None:
        self.dataset = dataset
        self.per_batch = granularity == BATCH
        self.pending: GlobalRngState | None = None  # main process: the states to put back after collate

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        seed, index = key
        saved = capture_global_rngs() if _in_main_process() else None
        try:
            seed_global_rngs(seed)
            return self.dataset[index]
        finally:
            if saved is not None:
                restore_global_rngs(saved)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        saved = capture_global_rngs() if _in_main_process() else None
        try:
            if self.per_batch:
                if keys:
                    seed_global_rngs(keys[0][0])
                items = self._fetch(keys)
            else:
                items = self._each(keys)
                if keys:
                    seed_global_rngs(sample_seed(keys[0][0], _COLLATE_SALT))
        except BaseException:
            if saved is not None:
                restore_global_rngs(saved)
            raise
        self.pending = saved
        return items

    def _each(self, keys: list[tuple[int, int]]) -> list[Any]:
        """Each sample under its own seed: the loop holds the bound seeders (this is the hot path)."""
        global _current_seed
        seed_all, dataset, items = _seeders(), self.dataset, []
        for seed, index in keys:
            _current_seed = seed
            seed_all(seed)
            items.append(dataset[index])
        return items

    def _fetch(self, keys: list[tuple[int, int]]) -> list[Any]:
        """One batch in one stream; :func:`current_sample_seed` still names each sample's own seed
        (the batch's when the dataset's ``__getitems__`` loads them all at once)."""
        global _current_seed
        batched = getattr(self.dataset, "__getitems__", None)
        if batched:
            return list(batched([index for _, index in keys]))
        items = []
        for seed, index in keys:
            _current_seed = seed
            items.append(self.dataset[index])
        return items


class SeededCollate:
    """The user's ``collate_fn`` (run under the batch's collate seed); afterwards, in the main
    process, the RNG states saved by :meth:`SeededSamples.__getitems__` are put back."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], samples: SeededSamples) -> None:
        self.collate_fn = collate_fn
        self.samples = samples

    def __call__(self, items: list[Any]) -> Any:
        try:
            return self.collate_fn(items)
        finally:
            saved, self.samples.pending = self.samples.pending, None
            if saved is not None:
                restore_global_rngs(saved)
