"""Rank functions for ``test_manager_ranks.py``: CheckpointManager + TrainState in real gloo jobs.

In an importable module because ``run_ranks`` starts its ranks with ``spawn``. Starting a rank costs
seconds (importing torch), so :func:`scenarios` runs every world-2 scenario in one job, each in a
run directory of its own, and returns what the test asserts on: whole tensors (gathered from the
FSDP2 shards), RNG draws, checkpoint names, counts of run-bookkeeping writes per rank.
"""

from __future__ import annotations

import os
import random
import signal
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ckptvault as cv
from ckptvault.engine.rundir import RunDirectory
from ckptvault.manager import core

EPOCHS = 2  # 40 samples, 2 ranks, batches of 4: 5 steps an epoch, 10 in all
FULL_OPTIONS = StateDictOptions(full_state_dict=True)


class Holder:
    """An ``extras`` part whose value can be made unencodable (a lambda) on one rank."""

    def __init__(self) -> None:
        self.value: Any = 1

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


def build(rank: int, world: int) -> dict[str, Any]:
    """The canonical loop's objects: FSDP2 model, AdamW, StepLR, a DistributedSampler loader."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 16, generator=gen), torch.randn(40, 4, generator=gen))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=7)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    holder = Holder()
    state = cv.TrainState(
        model=model, optimizer=opt, scheduler=sched, loader=loader, extras={"holder": holder}
    )
    return {"model": model, "opt": opt, "sched": sched, "sampler": sampler, "state": state, "holder": holder}


def loop(
    parts: dict[str, Any],
    mgr: cv.CheckpointManager,
    stop_at: int = 10**9,
    hook: Callable[[Any], None] | None = None,
) -> list[int]:
    """The canonical loop (epochs, mid-epoch resumable batches); returns the sample ids it saw."""
    state, model, opt, sched = parts["state"], parts["model"], parts["opt"], parts["sched"]
    seen: list[int] = []
    for epoch in state.epochs(EPOCHS):
        parts["sampler"].set_epoch(epoch)
        for x, y in state.batches():
            seen.append(int(x[0, 0].mul(1e4).round().item()))
            noise = torch.randn(x.shape) * 1e-3  # the loop consumes the global RNG too
            loss = ((model(x + noise) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            mgr.step(state, {"loss": loss.detach()})
            if hook is not None:
                hook(state)
            if state.step >= stop_at or mgr.should_stop:
                return seen
    return seen


def consolidated(parts: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Whole model and optimizer tensors (collective), flat: what must be bitwise equal."""
    out: dict[str, torch.Tensor] = {}
    for key, value in get_model_state_dict(parts["model"], options=FULL_OPTIONS).items():
        out[f"model.{key}"] = value.detach().clone()
    osd = get_optimizer_state_dict(parts["model"], parts["opt"], options=FULL_OPTIONS)
    for fqn, moments in osd["state"].items():
        for key, value in moments.items():
            out[f"optim.{fqn}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def draws() -> list[float]:
    """Draws from every global RNG after training: equal only if each rank's streams resumed."""
    return [torch.rand(()).item(), random.random(), float(np.random.rand())]


def manager(run_dir: str, **options: Any) -> cv.CheckpointManager:
    return cv.CheckpointManager(run_dir, validate="checksum", **options)


def views(mgr: cv.CheckpointManager) -> tuple[list[str], str | None]:
    """What this rank's manager says the run holds."""
    latest = mgr.latest()
    return [r.name for r in mgr.checkpoints()], None if latest is None else os.path.basename(latest.path)


BOOKKEEPING = ("write_index", "append_event", "acquire", "delete_checkpoint", "write_run")


def spy_bookkeeping(counts: dict[str, int]) -> None:
    """Counts this process's calls of the run's bookkeeping writes (RunDirectory methods)."""
    for name in BOOKKEEPING:
        original = getattr(RunDirectory, name)

        def counted(self: Any, *args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            counts[_name] = counts.get(_name, 0) + 1
            return _original(self, *args, **kw)

        setattr(RunDirectory, name, counted)


def fresh(rank: int, world: int) -> dict[str, Any]:
    parts = build(rank, world)
    torch.manual_seed(100 + rank)
    random.seed(200 + rank)
    np.random.seed(300 + rank)
    return parts


def run_reference(rank: int, world: int, root: str, counts: dict[str, int]) -> dict[str, Any]:
    parts = fresh(rank, world)
    mgr = manager(f"{root}/ref", every_n_steps=2, keep_last=2)
    seen = loop(parts, mgr)
    views_before_close = views(mgr)
    mgr.close()
    return {
        "seen": seen,
        "tensors": consolidated(parts),
        "lr": parts["sched"].get_last_lr(),
        "draws": draws(),
        "history": parts["state"].metrics_history.to_tree(),
        "views": views_before_close,
        "counts": dict(counts),
    }


def run_resumed(rank: int, world: int, root: str) -> dict[str, Any]:
    parts = fresh(rank, world)
    mgr = manager(f"{root}/cut", every_n_steps=2, keep_last=2)
    seen = loop(parts, mgr, stop_at=7)  # killed after step 7: the newest checkpoint is step 6
    mgr.close()
    parts = build(rank, world)
    torch.manual_seed(999)  # whatever the new process's RNG: restore must bring each rank's back
    mgr = manager(f"{root}/cut", every_n_steps=2, keep_last=2)
    info = mgr.restore(parts["state"])
    position = parts["state"].position.batches_done
    seen += loop(parts, mgr)
    mgr.close()
    return {
        "restored": None if info is None else info.step,
        "position": position,
        "seen": seen,
        "tensors": consolidated(parts),
        "lr": parts["sched"].get_last_lr(),
        "draws": draws(),
        "history": parts["state"].metrics_history.to_tree(),
    }


def run_preempted(rank: int, world: int, root: str) -> dict[str, Any]:
    parts = fresh(rank, world)
    mgr = manager(f"{root}/preempt", every_n_steps=100)

    def hook(state: Any) -> None:
        if rank == 1 and state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's notice reached rank 1 only

    loop(parts, mgr, hook=hook)
    out = {"step": parts["state"].step, "should_stop": mgr.should_stop, "views": views(mgr)}
    mgr.close()
    return out


def run_clock(rank: int, world: int, root: str) -> dict[str, Any]:
    """every_seconds fires on one rank only: rank 1's clock jumps at step 2 (rank 0's decision, no
    save, wins), rank 0's at step 4 (its save is every rank's)."""
    parts = fresh(rank, world)
    mgr = manager(f"{root}/clock", every_seconds=3600.0)
    saved: list[int] = []
    real = time.time

    def hook(state: Any) -> None:
        jump = (rank == 1 and state.step == 1) or (rank == 0 and state.step == 3)
        core.time = types.SimpleNamespace(time=lambda: real() + 7200, perf_counter=time.perf_counter)
        if not jump:
            core.time = time

    original_step = mgr.step

    def step(state: Any, metrics: Any = None) -> Any:
        info = original_step(state, metrics)
        core.time = time
        if info is not None:
            saved.append(state.step)
        return info

    mgr.step = step  # type: ignore[method-assign]
    loop(parts, mgr, stop_at=6, hook=hook)
    out = {"saved": saved, "views": views(mgr)}
    mgr.close()
    return out


def run_failing(rank: int, world: int, root: str) -> dict[str, Any]:
    """Rank 1's state becomes unencodable after step 2's checkpoint: step 4's save must fail on
    every rank, promptly, and step 2's checkpoint must still restore."""
    parts = fresh(rank, world)
    mgr = manager(f"{root}/fail", every_n_steps=2)

    def hook(state: Any) -> None:
        if rank == 1 and state.step == 3:
            parts["holder"].value = lambda: 0

    started = time.monotonic()
    error = None
    try:
        loop(parts, mgr, stop_at=4, hook=hook)
    except Exception as exc:
        error = (type(exc).__name__, isinstance(exc, cv.CheckpointError), str(exc)[:500])
    seconds = time.monotonic() - started
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr.close()
    parts = build(rank, world)
    mgr = manager(f"{root}/fail", every_n_steps=2)
    info = mgr.restore(parts["state"])
    out = {
        "error": error,
        "seconds": seconds,
        "restored": None if info is None else info.step,
        "views": views(mgr),
    }
    mgr.close()
    return out


def scenarios(rank: int, world: int, root: str) -> dict[str, Any]:
    """Every world-2 scenario, in one job (see the module docstring)."""
    counts: dict[str, int] = {}
    spy_bookkeeping(counts)
    out: dict[str, Any] = {"reference": run_reference(rank, world, root, counts)}
    out["resumed"] = run_resumed(rank, world, root)
    out["preempted"] = run_preempted(rank, world, root)
    out["clock"] = run_clock(rank, world, root)
    out["failing"] = run_failing(rank, world, root)
    dist.barrier()
    return out


def restore_at(rank: int, world: int, run_dir: str) -> dict[str, Any]:
    """Restores the reference run's newest checkpoint at another world size (FSDP2 on this mesh)."""
    parts = build(rank, world)
    mgr = manager(run_dir, every_n_steps=2, keep_last=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = mgr.restore(parts["state"])
    out = {
        "restored": None if info is None else info.step,
        "tensors": consolidated(parts),
        "lr": parts["sched"].get_last_lr(),
        "warnings": [str(w.message) for w in caught],
    }
    mgr.close()
    return out
