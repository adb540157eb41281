"""An IterableDataset streaming loop with 2 workers (an LLM pre-training shape: one pass over a
stream, no epochs to speak of). Each worker reads its own shard (get_worker_info) and draws random
masking from torch's RNG; with no state_dict of its own, a mid-epoch resume replays and discards."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

import ckptvault as cv

DOCUMENTS, SEQ, VOCAB, BATCH = 120, 8, 32, 6


class TokenStream(torch.utils.data.IterableDataset[torch.Tensor]):
    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        shard, shards = (info.id, info.num_workers) if info is not None else (0, 1)
        for doc in range(shard, DOCUMENTS, shards):
            tokens = torch.arange(doc, doc + SEQ) % VOCAB
            mask = torch.rand(SEQ) < 0.15  # the worker's RNG stream, as in masked-LM collators
            yield torch.where(mask, torch.zeros_like(tokens), tokens)


def main() -> None:
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    loader = torch.utils.data.DataLoader(TokenStream(), batch_size=BATCH, num_workers=2)
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Flatten(), nn.Linear(16 * SEQ, VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = cv.TrainState(model, optimizer, loader=loader)
    with cv.CheckpointManager(every_n_steps=3, keep_last=2) as manager:
        manager.restore(state)
        for _epoch in state.epochs(2):
            for tokens in state.batches():
                loss = nn.functional.cross_entropy(model(tokens), tokens[:, 0])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                manager.step(state, metrics={"loss": loss.item()})
        manager.save(state)


if __name__ == "__main__":
    main()
