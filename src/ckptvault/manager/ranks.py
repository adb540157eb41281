"""L3: the manager inside a torch.distributed job -- one agreed decision per step, one checkpoint
per save written by every rank, one writer of the run's records.

Every rank runs the same training loop and calls the same manager methods. What must never
diverge is decided once and shared:

* **whether to save, and why.** Step and epoch triggers agree by themselves (every rank has the
  same step), but a time trigger, a metric seen only by some ranks, or a preemption signal that
  reached one rank would not. So each :meth:`RankGroup.agree` (one per ``step``) takes the
  coordinator's trigger decisions and the OR of every rank's preemption flag, in two small
  collectives on a gloo group of their own with a timeout: a rank that dies makes the others fail
  at the next step instead of hanging;
* **which checkpoint to restore**: the coordinator chooses (verifying candidates as a single
  process would) and broadcasts the name;
* **the run's records**: only the coordinator holds the run's lease, writes the index, applies
  retention, runs validation, the catalog and the trackers. The other ranks write their shards and
  nothing else.

The checkpoint itself is written by :func:`ckptvault.distributed.save` from every rank: model and
optimizer state through torch's ``get_model_state_dict`` / ``get_optimizer_state_dict`` (sharded
DTensors stay sharded, FSDP2 included), rank-local parts -- RNG states, the data position, the
metrics history -- under ``ranks.<rank>`` so each rank gets its own back
(:mod:`ckptvault.training.sharded_state`).
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError

DEFAULT_TIMEOUT_SECONDS = 600.0


@dataclass
class RankGroup:
    """This process's place in the job, and the group the manager's collectives use."""

    rank: int
    world: int
    group: Any
    _async: Any = None

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    @classmethod
    def detect(cls, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> RankGroup | None:
        """The job this process belongs to, or None outside an initialised process group (then the
        manager is the ordinary single-process one). Creating the group is itself collective:
        every rank constructs its manager at the same point of the script."""
        if "torch.distributed" not in sys.modules:
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
        return cls(dist.get_rank(), dist.get_world_size(), group)

    def agree(self, preempted: bool, reasons: list[str | None]) -> tuple[bool, list[str | None]]:
        """(any rank preempted, the coordinator's trigger decisions): the same on every rank."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if preempted else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item()), self.share(reasons)

    def share(self, value: Any) -> Any:
        """The coordinator's ``value`` on every rank (small, plain values only)."""
        import torch.distributed as dist

        box = [value if self.is_coordinator else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def lead(self, work: Callable[[], Any]) -> Any:
        """``work()`` run on the coordinator alone (the run's books), its result on every rank.

        Its failure is raised on every rank -- as itself on the coordinator, as a
        :class:`CheckpointError` naming it on the others -- instead of leaving them to time out in
        the next collective while rank 0 has already given up. Every rank waits until the books are
        written, so what a follower reads of them next (``latest()``) is already up to date."""
        value: Any = None
        failure: BaseException | None = None
        if self.is_coordinator:
            try:
                value = work()
            except Exception as exc:
                failure = exc
        text = None if failure is None else f"{type(failure).__name__}: {failure}"
        value, text = self.share((value, text))
        if failure is not None:
            raise failure
        if text is not None:
            raise CheckpointError(f"rank 0 failed to record the checkpoint: {text}")
        return value

    def check(self, problem: str | None, what: str) -> None:
        """Raises :class:`~ckptvault.distributed.DistributedCheckpointError` on every rank when any
        rank has a ``problem`` (text), naming each failed rank. For failures one rank finds before a
        collective its peers are already waiting in: without it they would wait for the whole
        collective timeout, and the default group would be unusable afterwards."""
        import torch.distributed as dist

        from ..distributed.commit import DistributedCheckpointError

        problems: list[str | None] = [None] * self.world
        dist.all_gather_object(problems, problem, group=self.group)
        failures = {rank: text for rank, text in enumerate(problems) if text is not None}
        if failures:
            listed = "; ".join(f"rank {rank}: {text}" for rank, text in failures.items())
            raise DistributedCheckpointError(
                f"{what} failed on rank(s) {sorted(failures)}: {listed}", failures
            )

    def async_group(self) -> Any:
        """A second gloo group, for background saves: DCP's thread runs its collectives there while
        the loop's own (:meth:`agree`) keep using :attr:`group`. Created at the first background
        save, which every rank reaches at the same step."""
        if self._async is None:
            import torch.distributed as dist

            timeout = datetime.timedelta(seconds=DEFAULT_TIMEOUT_SECONDS)
            self._async = dist.new_group(backend="gloo", timeout=timeout)
        return self._async

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group(self.group)
