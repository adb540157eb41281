"""A plain PyTorch training loop checkpointed with CheckpointManager: the canonical loop, as is.

A small MLP learns a synthetic 4-class problem (data made here, fixed by a seed): a shuffling
DataLoader, dropout, AdamW, a cosine LR schedule and an evaluation after every epoch. Run it, stop
it with ``kill -TERM <pid>`` (what a cluster scheduler sends), run it again: it resumes at the next
unseen batch and ends bit-identical to an uninterrupted run. Prove that with::

    ckptvault check-resume -- python examples/plain_loop.py

The run directory is ``--run-dir``, else ``$CKPTVAULT_RUN_DIR`` (which ``check-resume`` sets).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

import ckptvault

CONFIG = {"seed": 0, "samples": 2048, "features": 32, "hidden": 128, "classes": 4, "batch": 32,
          "lr": 3e-3, "weight_decay": 0.01, "dropout": 0.1}  # fmt: skip


def synthetic_data() -> tuple[torch.utils.data.TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    """Train and validation sets from their own generator: the same in every process."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(CONFIG["samples"] + 512, CONFIG["features"], generator=generator)
    w = torch.randn(CONFIG["features"], CONFIG["classes"], generator=generator)
    y = (x @ w + 0.5 * torch.randn(len(x), CONFIG["classes"], generator=generator)).argmax(dim=1)
    n = CONFIG["samples"]
    return torch.utils.data.TensorDataset(x[:n], y[:n]), (x[n:], y[n:])


def evaluate(model: torch.nn.Module, val: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(val[0]).argmax(dim=1) == val[1]).float().mean().item()
    model.train()
    return acc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="default: $CKPTVAULT_RUN_DIR")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--every-n-steps", type=int, default=40)
    args = parser.parse_args()

    random.seed(CONFIG["seed"])  # every RNG: the model's init and the first epoch's shuffle
    np.random.seed(CONFIG["seed"])  # depend on them (a resumed run restores them instead)
    torch.manual_seed(CONFIG["seed"])
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and results don't depend on cores

    train_set, val = synthetic_data()
    loader = torch.utils.data.DataLoader(train_set, batch_size=CONFIG["batch"], shuffle=True)
    model = torch.nn.Sequential(
        torch.nn.Linear(CONFIG["features"], CONFIG["hidden"]),
        torch.nn.ReLU(),
        torch.nn.Dropout(CONFIG["dropout"]),
        torch.nn.Linear(CONFIG["hidden"], CONFIG["hidden"]),
        torch.nn.ReLU(),
        torch.nn.Linear(CONFIG["hidden"], CONFIG["classes"]),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=CONFIG["lr"], weight_decay=CONFIG["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * len(loader))

    manager = ckptvault.CheckpointManager(
        args.run_dir,  # None: $CKPTVAULT_RUN_DIR
        every_n_steps=args.every_n_steps,
        keep_last=3,
        keep_best=3,
        monitor="val_acc",
        mode="max",
        config={**CONFIG, "epochs": args.epochs},
    )
    state = ckptvault.TrainState(model=model, optimizer=opt, scheduler=sched, loader=loader)
    info = manager.restore(state)  # newest valid checkpoint; None for a fresh run
    if info is None:
        print(f"fresh run in {manager.directory}", flush=True)
    else:
        print(f"resumed from {Path(info.path).name}: epoch {state.epoch}, "
              f"batch {state.position.batches_done}/{len(loader)}", flush=True)  # fmt: skip

    for epoch in state.epochs(args.epochs):  # resumes at the saved epoch
        for x, y in state.batches():  # resumes mid-epoch at the next unseen batch
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            saved = manager.step(state, metrics={"loss": loss.item()})  # saves when a trigger fires
            if saved is not None:
                print(f"  step {state.step} (epoch {epoch}, batch {state.position.batches_done}/"
                      f"{len(loader)}): saved {Path(saved.path).name}", flush=True)  # fmt: skip
        if manager.should_stop:  # preempted: batches() ended early; skip the (expensive) evaluation
            break
        acc = evaluate(model, val)
        manager.save(state, metrics={"val_acc": acc})  # explicit save after evaluation
        print(f"epoch {epoch}: val_acc {acc:.4f}, lr {sched.get_last_lr()[0]:.2e}", flush=True)

    if manager.should_stop:  # the preemption checkpoint is committed; epochs() already stopped
        print(f"preempted: stopping at step {state.step}; run again to resume", flush=True)
        manager.close()
        return 0
    manager.save(state)  # the complete final state (check-resume compares it)
    manager.wait()
    manager.close()
    print(f"done: step {state.step}, epoch {state.epoch}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
