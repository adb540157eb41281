"""A Hugging Face Trainer run mirrored into ckptvault, offline, on CPU (seconds).

Every Trainer save is committed atomically into a ckptvault run (model, optimizer, scheduler, RNG
states and the TrainerState, verified); resuming picks the newest *complete* Trainer checkpoint --
``transformers.trainer_utils.get_last_checkpoint`` picks the highest-numbered one even when its save
was interrupted -- or rebuilds one from the mirror. docs/integrations/transformers.md says more.

    python examples/hf_trainer.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a tiny model from a config: nothing is downloaded

import torch
import transformers

import ckptvault
from ckptvault.integrations.transformers import (
    VaultCallback,
    latest_complete_checkpoint,
    materialize_checkpoint,
)


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.data = torch.randint(0, 64, (32, 8), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def make_trainer(out: Path, callbacks: list[transformers.TrainerCallback]) -> transformers.Trainer:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=6,
        save_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=Tokens(), callbacks=callbacks
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ckptvault-hf-"))
    run_dir = out / "vault"
    make_trainer(out, [VaultCallback(run_dir, keep_last=2)]).train()
    print("mirror:", [Path(p).name for p in ckptvault.list_checkpoints(run_dir)])
    print("newest complete Trainer checkpoint:", latest_complete_checkpoint(out / "trainer", run_dir))
    rebuilt = materialize_checkpoint(run_dir, out / "from-vault")  # a checkpoint-N Trainer resumes from
    print("rebuilt from the mirror:", rebuilt)


if __name__ == "__main__":
    main()
