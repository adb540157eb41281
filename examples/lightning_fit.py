"""Lightning with ckptvault checkpoints: fit, resume from "last", verify (CPU, a few seconds).

.venv/bin/python examples/lightning_fit.py [RUN_DIR]
"""

from __future__ import annotations

import sys
import tempfile

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import ckptvault
from ckptvault.integrations.lightning import VaultCheckpointIO


class Regressor(L.LightningModule):
    """A two-layer regressor; its hyper-parameters go into every checkpoint as a plain dict."""

    def __init__(self, hidden: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def trainer(run_dir: str, max_steps: int) -> L.Trainer:
    """Checkpoints every 8 steps (one epoch here), the best two by step kept, plus last.ckpt."""
    checkpoints = ModelCheckpoint(
        dirpath=run_dir, every_n_train_steps=8, save_top_k=2, monitor="step", mode="max", save_last=True
    )
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        callbacks=[checkpoints],
        plugins=[VaultCheckpointIO()],
    )


def main() -> None:
    run_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="ckptvault-lightning-")
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=8)
    L.seed_everything(0)
    trainer(run_dir, 16).fit(Regressor(), data)
    resumed = trainer(run_dir, 32)
    resumed.fit(Regressor(), data, ckpt_path="last")  # the newest committed last*.ckpt
    for path in ckptvault.list_checkpoints(run_dir):
        print(f"{path}: step {ckptvault.info(path).step}, verified {ckptvault.verify(path).ok}")
    print(f"resumed to step {resumed.global_step}")


if __name__ == "__main__":
    main()
