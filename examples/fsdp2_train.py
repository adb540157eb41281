"""FSDP2 training on CPU ranks (gloo) with a CheckpointManager: resumes exactly after a kill.

Run it as the ranks of one job, e.g. ``torchrun --standalone --nproc-per-node 2 examples/fsdp2_train.py``,
or let ckptvault prove the resume exact by killing the whole job at random moments::

    ckptvault check-resume --nproc 2 --kills 3 -- python examples/fsdp2_train.py --steps 40

Every rank builds the same model and calls the same manager methods; the manager agrees its
decisions across ranks, every rank writes its own shards of each checkpoint, rank 0 keeps the run's
records. The run directory comes from ``--run-dir`` or ``CKPTVAULT_RUN_DIR`` (check-resume sets it).
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptvault


def build_model(world: int) -> torch.nn.Module:
    """The same initial weights on every rank (seeded), then sharded over the job's ranks."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=4, help="checkpoint every N steps")
    parser.add_argument("--step-seconds", type=float, default=0.05, help="simulated work per step")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the launcher
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    state = ckptvault.TrainState(model=model, optimizer=optimizer, scheduler=scheduler)
    manager = ckptvault.CheckpointManager(
        args.run_dir, every_n_steps=args.every, keep_last=2, validate="checksum"
    )
    if manager.restore(state) is None:  # a fresh run: seed every global RNG (restored on resume)
        torch.manual_seed(1000 + rank)  # each rank its own data stream
        random.seed(1000 + rank)
        np.random.seed(1000 + rank)  # unseeded, numpy's stream would differ between fresh runs
    while state.step < args.steps and not manager.should_stop:
        x = torch.randn(8, 16)
        y = x[:, :4].sin()
        loss = ((model(x) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        time.sleep(args.step_seconds)
        manager.step(state, {"loss": loss.detach()})
    manager.save(state)  # the final state, which check-resume compares
    manager.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
