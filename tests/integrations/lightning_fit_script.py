"""A tiny deterministic Lightning fit for the plugin's tests and benchmark, runnable as a script.

``python -m tests.integrations.lightning_fit_script ROOT STEPS [--resume] [--plugin vault|torch]
[--every N] [--sleep S] [--async] [--incremental] [--out WEIGHTS]``: fits :class:`TinyModule` on
fixed data for STEPS optimizer steps with ModelCheckpoint(every_n_train_steps=N, save_top_k=2,
save_last=True) in ROOT, resuming from ``ckpt_path="last"`` with ``--resume``; ``--out`` writes the
final weights with ckptvault (the SIGKILL test compares them bit for bit).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset


class TinyModule(L.LightningModule):
    """Two linear layers, SGD with momentum and a step LR schedule: optimizer and scheduler state
    that a resume must restore exactly for the weights to match."""

    def __init__(self, hidden: int = 32, lr: float = 0.05, **extra: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(n: int = 64, batch: int = 8) -> DataLoader[Any]:
    """Fixed data, fixed order: the same batches whatever process runs it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = x.sum(dim=1, keepdim=True).sin()
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False, num_workers=0)


class Slow(Callback):
    """Sleeps after each step so a test can kill the process between checkpoints."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(self.seconds)


def make_trainer(
    root: str, steps: int, plugin: Any, every: int, extra: list[Callback] | None = None
) -> L.Trainer:
    """The Trainer both the tests and the benchmark use (CPU, no logger, no progress bar)."""
    checkpoint = ModelCheckpoint(
        dirpath=root, every_n_train_steps=every, save_top_k=2, save_last=True, monitor="step", mode="max"
    )
    return L.Trainer(
        default_root_dir=root,
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[checkpoint, *(extra or [])],
        plugins=[plugin] if plugin is not None else None,
        num_sanity_val_steps=0,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--plugin", choices=["vault", "torch"], default="vault")
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--async", dest="async_save", action="store_true")
    parser.add_argument("--incremental", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    import ckptvault
    from ckptvault.integrations.lightning import VaultCheckpointIO

    L.seed_everything(0, workers=True)
    plugin = (
        VaultCheckpointIO(async_save=args.async_save, incremental=args.incremental)
        if args.plugin == "vault"
        else None
    )
    extra: list[Callback] = [Slow(args.sleep)] if args.sleep else []
    trainer = make_trainer(args.root, args.steps, plugin, args.every, extra)
    model = TinyModule()
    trainer.fit(model, loader(), ckpt_path="last" if args.resume else None)
    if args.out:
        ckptvault.save(
            args.out, {"weights": model.state_dict(), "global_step": trainer.global_step}, overwrite=True
        )


if __name__ == "__main__":
    main()
