"""Data position for a ``DataLoader`` over an ``IterableDataset`` (streams: corpora, generated data).

An iterable dataset has no indices to skip, so a mid-epoch resume reaches the next unseen batch one
of two ways:

* **its own state** -- a dataset with ``state_dict()``/``load_state_dict()`` (Hugging Face
  ``datasets`` streaming, torchdata nodes) loaded by ``num_workers=0``: its state is saved with the
  data position and loaded on restore, and iteration simply continues. (Loaded by workers, each
  worker's copy holds its own state, out of the main process's reach: then it is replayed.)
* **replay** -- otherwise the epoch is iterated again from its start and the batches already consumed
  are discarded. That is exact whenever the stream is a function of the epoch and of the worker's
  seeds: each epoch's loader gets a generator seeded from the epoch seed, so workers get the same
  seeds as in the uninterrupted run, and a dataset that shards itself with ``get_worker_info()`` sees
  the same worker ids, as long as ``num_workers`` is unchanged (a resume with another count is
  refused). It costs the time to load what is discarded: logged (``ckptvault`` logger) when the
  checkpoint is restored and again with the measured time when the replay is done, and kept in
  :attr:`IterableLoaders.last_replay`.

Batches are built by a wrapper dataset (the user's samples, ``batch_size`` at a time, collated by the
user's ``collate_fn``) -- per worker, exactly as a ``DataLoader`` batches an iterable dataset. In the
main process that wrapper draws on a private set of RNG states seeded from the epoch seed and swapped
in around each batch, so a replay (which loads the discarded batches again) cannot move the training
loop's own RNG stream, and the stream the dataset sees does not depend on the training loop's draws.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .data import DataPosition, draw_epoch_seed, rebuilt_options

logger = logging.getLogger("ckptvault")


def is_iterable_loader(loader: Any) -> bool:
    from torch.utils.data import DataLoader, IterableDataset

    return isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset)


def has_own_state(loader: Any) -> bool:
    """The dataset's own state is what resumes it: it has one and is iterated in this process."""
    dataset = loader.dataset
    return (
        loader.num_workers == 0
        and callable(getattr(dataset, "state_dict", None))
        and callable(getattr(dataset, "load_state_dict", None))
    )


@dataclass(frozen=True)
class Replay:
    """What the last replay cost: batches and samples discarded, seconds spent."""

    batches: int
    samples: int
    seconds: float


class IterableLoaders:
    """Builds each epoch's loader over an iterable dataset and skips what a restored run consumed."""

    def __init__(self) -> None:
        self.last_replay: Replay | None = None

    def for_epoch(self, loader: Any, position: DataPosition) -> Iterator[Any]:
        from torch.utils.data import DataLoader

        from .iterable_batches import BatchesOf, keep_batch

        if loader.batch_size is None:
            raise TypeError(
                "an IterableDataset loader is resumable with batch_size set (batches are counted)"
            )
        if position.epoch_seed is None:
            position.epoch_seed = draw_epoch_seed(loader)
        if position.workers is None:
            position.workers = loader.num_workers
        own_state = has_own_state(loader)
        if not own_state and position.batches_done and position.workers != loader.num_workers:
            raise ValueError(
                f"this epoch was loaded by {position.workers} workers and is resumed by replay, which "
                "needs the same worker count (the dataset shards by worker); "
                f"got num_workers={loader.num_workers}"
            )
        batches = BatchesOf(
            loader.dataset,
            loader.batch_size,
            loader.drop_last,
            loader.collate_fn,
            None if own_state else position.epoch_seed,
        )
        options = rebuilt_options(loader, position.epoch_seed, keep_batch)
        built = DataLoader(batches, batch_size=None, **options)
        return self._skipping(iter(built), 0 if own_state else position.batches_done, loader.batch_size)

    def _skipping(self, batches: Iterator[Any], skip: int, batch_size: int) -> Iterator[Any]:
        if skip:
            started = time.perf_counter()
            for _ in range(skip):
                next(batches)
            self.last_replay = Replay(skip, skip * batch_size, time.perf_counter() - started)
            logger.info(
                "replayed and discarded %d batches (%d samples) of an IterableDataset to resume "
                "mid-epoch in %.2f s",
                skip,
                skip * batch_size,
                self.last_replay.seconds,
            )
        yield from batches
