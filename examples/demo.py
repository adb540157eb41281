"""The `make demo` job: train a small model, checkpoint it, prove exact resume, inspect from the shell.

1. Trains a small MLP on synthetic data for a few hundred steps (Adam, a step LR schedule, dropout),
   saving the complete state (weights, optimizer, scheduler, every RNG, step, loss history) every
   ``--every`` steps with ``ckptvault.save``.
2. Simulates a crash: restores the middle checkpoint into fresh objects, trains to the end again and
   checks the final weights are bit-identical to the uninterrupted run.
3. Runs the ``ckptvault`` command: ``ls``, ``verify``, ``diff`` and ``show``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ckptvault as cv

CONFIG = {"hidden": 64, "lr": 3e-3, "batch": 32, "dropout": 0.1, "seed": 1234}


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = torch.nn.Sequential(
        torch.nn.Linear(16, CONFIG["hidden"]),
        torch.nn.ReLU(),
        torch.nn.Dropout(CONFIG["dropout"]),
        torch.nn.Linear(CONFIG["hidden"], 4),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=CONFIG["lr"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)
    return model, optimizer, scheduler


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic synthetic data: the same step always sees the same batch."""
    generator = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(CONFIG["batch"], 16, generator=generator)
    return x, (x[:, :4].sum(dim=1) > 0).long() + 2 * (x[:, 4] > 0).long()


def capture(step: int, model: Any, optimizer: Any, scheduler: Any, losses: list[float]) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "step": step,
        "losses": list(losses),
    }


def train(
    first: int,
    last: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    losses: list[float],
    run_dir: Path | None,
    every: int,
) -> None:
    for step in range(first + 1, last + 1):
        x, y = batch(step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if run_dir is not None and step % every == 0:
            info = cv.save(
                run_dir / f"step_{step:08d}",
                capture(step, model, optimizer, scheduler, losses),
                metadata={
                    "step": step,
                    "run_id": "demo-mlp",
                    "config": CONFIG,
                    "metrics": {"loss": losses[-1], "lr": scheduler.get_last_lr()[0]},
                },
            )
            print(f"  step {step:4d}  loss {losses[-1]:.4f}  saved {info.path} ({info.size_bytes} bytes)")


def restore(path: Path) -> tuple[int, Any, Any, Any, list[float]]:
    state = cv.load(path)
    model, optimizer, scheduler = build()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state["step"], model, optimizer, scheduler, state["losses"]


def cli(*args: str) -> None:
    print(f"\n$ ckptvault {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "ckptvault.cli.main", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-runs"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    run_dir = args.out / "mlp"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own directory only

    print(f"1. training {args.steps} steps, checkpoint every {args.every} -> {run_dir}")
    torch.manual_seed(CONFIG["seed"])
    random.seed(CONFIG["seed"])
    np.random.seed(CONFIG["seed"])
    model, optimizer, scheduler = build()
    losses: list[float] = []
    train(0, args.steps, model, optimizer, scheduler, losses, run_dir, args.every)

    checkpoints = cv.list_checkpoints(run_dir)
    middle = Path(checkpoints[len(checkpoints) // 2])
    print(f"\n2. crash and resume from {middle.name}")
    step, model2, optimizer2, scheduler2, losses2 = restore(middle)
    train(step, args.steps, model2, optimizer2, scheduler2, losses2, None, args.every)
    pairs = zip(model.state_dict().values(), model2.state_dict().values(), strict=True)
    identical = all(torch.equal(a, b) for a, b in pairs)
    print(f"   resumed run identical to uninterrupted run: weights {identical}, losses {losses == losses2}")
    if not (identical and losses == losses2):
        raise SystemExit("resume was not exact")

    print("\n3. the command line")
    cli("ls", str(run_dir))
    cli("verify", *checkpoints)
    cli("diff", checkpoints[0], checkpoints[-1])
    cli("show", checkpoints[-1])


if __name__ == "__main__":
    main()
