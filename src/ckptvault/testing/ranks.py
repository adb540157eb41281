"""Real ``torch.distributed`` jobs on one machine, for tests, benchmarks and ``check-resume --nproc``.

:func:`run_ranks` starts ``world`` fresh Python processes (the ``spawn`` start method: no state
inherited from the caller), each joining a gloo process group on 127.0.0.1 with a collective
timeout, runs ``fn(rank, world, *args)`` in each and returns every rank's result in rank order.
Why not ``torch.multiprocessing.spawn``: a test must be able to kill one rank mid-save and still
collect what the others did, bound the whole job by a deadline (a hung collective must fail the
test, not the CI run), and get each rank's exception back as text.

``fn`` must be importable by module and name (a module-level function in an importable module) and
its arguments and result picklable -- the usual ``spawn`` rules. Not for production use.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .s3server import LOOPBACK, free_port


@dataclass(frozen=True)
class RankOutcome:
    """What one rank did: its return value, or the exception it raised (as text), or its exit code
    when it died without answering (killed, crashed)."""

    rank: int
    value: Any = None
    error: str | None = None
    exitcode: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.exitcode in (0, None)


class RanksFailedError(AssertionError):
    """At least one rank raised or died; the message shows each rank's failure."""

    def __init__(self, outcomes: list[RankOutcome]) -> None:
        self.outcomes = outcomes
        lines = [f"rank {o.rank}: {o.error or f'exit code {o.exitcode}'}" for o in outcomes if not o.ok]
        super().__init__("\n".join(lines))


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    port: int,
    timeout: float,
    args: tuple[Any, ...],
    results: Any,
    collected: Any,
    env: dict[str, str],
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR=LOOPBACK,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    try:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
        )
        try:
            value = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, value, None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()[-4000:]))
    # Tensors in a result travel as shared memory that this process must keep alive until the
    # parent has taken them (torch's queue reductions): exit only once everything is collected.
    collected.wait(60)


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout: float = 120.0,
    collective_timeout: float = 30.0,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> list[RankOutcome]:
    """Runs ``fn(rank, world, *args)`` on ``world`` ranks (see module doc); every process is gone
    when this returns. ``timeout`` bounds the whole job (stragglers are killed); ``check`` raises
    :class:`RanksFailedError` unless every rank returned."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    collected = ctx.Event()
    port = free_port()
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    # Not daemonic: a rank may start processes of its own (DCP's process-based async save). Every
    # rank is joined or killed below, whatever happens here.
    procs = [
        ctx.Process(
            target=_entry, args=(fn, rank, world, port, collective_timeout, args, results, collected, env)
        )
        for rank in range(world)
    ]
    answers: dict[int, tuple[Any, str | None]] = {}
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.start()
        while len(answers) < world and time.monotonic() < deadline:
            try:
                rank, value, error = results.get(timeout=0.2)
                answers[rank] = (value, error)
            except queue.Empty:
                # Stop waiting once every rank that has not answered is gone (killed, crashed):
                # the ranks that did answer wait for ``collected`` and would otherwise be waited on.
                if all(not procs[r].is_alive() for r in range(world) if r not in answers):
                    _drain(results, answers)
                    break
    finally:
        collected.set()
        for proc in procs:
            if proc.pid is None:
                continue
            proc.join(timeout=max(0.0, deadline - time.monotonic()) if proc.is_alive() else 0)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    outcomes = []
    for rank, proc in enumerate(procs):
        if rank in answers:
            value, error = answers[rank]
            outcomes.append(RankOutcome(rank, value, error, proc.exitcode))
        else:
            # no answer: killed, crashed, or it left without one (exit code as the kernel gave it)
            code = -9 if proc.exitcode is None else proc.exitcode
            outcomes.append(RankOutcome(rank, error=f"no answer (exit code {code})", exitcode=code))
    if check and not all(o.ok for o in outcomes):
        raise RanksFailedError(outcomes)
    return outcomes


def _drain(results: Any, answers: dict[int, tuple[Any, str | None]]) -> None:
    """What ranks put in the queue before they ended."""
    while True:
        try:
            rank, value, error = results.get(timeout=0.5)
        except queue.Empty:
            return
        answers[rank] = (value, error)
