"""Tiny offline models and datasets for the transformers/accelerate integration tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import transformers

VOCAB = 64


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    """A one-layer GPT2 built from a config (nothing downloaded)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


class TokenDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Deterministic random token rows; labels = inputs (causal LM loss)."""

    def __init__(self, rows: int = 32, length: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.data = torch.randint(0, VOCAB, (rows, length), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def trainer(output_dir: Path, callbacks: list[Any], max_steps: int = 6, save_steps: int = 2) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=save_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=callbacks
    )
