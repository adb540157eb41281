"""A child for the Accelerate kill test: ``python accelerate_save_script.py RUN_DIR OUT``.

Saves step 1 through VaultAccelerate, writes the step-1 weights to OUT (ckptvault, for the parent
to compare), prints ``saved 1``, takes a training step and saves step 2 -- the save the parent
kills while its files are being written. The model is big enough (~64 MiB) that the write takes a
while."""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator

import ckptvault
from ckptvault.integrations.transformers_accelerate import VaultAccelerate


def main() -> None:
    run, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    vault = VaultAccelerate(accelerator, run, keep_last=1, validate="checksum")

    def train_step() -> None:
        model(torch.ones(4, 2048)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step()
    vault.save_state()
    ckptvault.save(out, {k: v.detach().clone() for k, v in model.state_dict().items()})
    print("saved 1", flush=True)
    train_step()
    vault.save_state()
    print("saved 2", flush=True)


if __name__ == "__main__":
    main()
