"""The batches of an iterable dataset, built per worker (or in the main process under private RNG
states); see :mod:`.iterable`. Its own module because it subclasses torch's ``IterableDataset``: it is
imported only once a loader over an iterable dataset is iterated, so ``import ckptvault`` stays
torch-free."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import IterableDataset

from .sample_rng import GlobalRngState, capture_global_rngs, restore_global_rngs, seed_global_rngs


class _PrivateRng:
    """RNG states of their own, swapped in with ``with``; the global ones are put back on exit."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._own: GlobalRngState | None = None
        self._saved: GlobalRngState | None = None

    def __enter__(self) -> None:
        self._saved = capture_global_rngs()
        if self._own is None:
            seed_global_rngs(self._seed)
        else:
            restore_global_rngs(self._own)

    def __exit__(self, *exc: object) -> None:
        self._own = capture_global_rngs()
        assert self._saved is not None
        restore_global_rngs(self._saved)


class BatchesOf(IterableDataset):  # type: ignore[type-arg]
    """An ``IterableDataset`` of collated batches of ``dataset``; see the module docstring."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool,
        collate_fn: Callable[[list[Any]], Any],
        seed: int | None,
    ) -> None:
        """``seed``: the main process's private RNG states start there; None: no private states (a
        dataset resumed through its own state draws from the global stream, as in a plain loader)."""
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.collate_fn, self.seed = collate_fn, seed

    def __iter__(self) -> Iterator[Any]:
        from torch.utils.data import get_worker_info

        private = _PrivateRng(self.seed) if get_worker_info() is None and self.seed is not None else None
        source: Iterator[Any] | None = None
        while True:
            with private if private is not None else _NO_SWAP:
                if source is None:
                    source = iter(self.dataset)
                items = []
                for item in source:
                    items.append(item)
                    if len(items) == self.batch_size:
                        break
                if not items or (self.drop_last and len(items) < self.batch_size):
                    return
                batch = self.collate_fn(items)
            yield batch


class _NoSwap:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SWAP = _NoSwap()


def keep_batch(batch: Any) -> Any:
    """The outer loader's collate_fn: batches arrive collated already."""
    return batch
