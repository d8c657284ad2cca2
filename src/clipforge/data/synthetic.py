"""Synthetic batches for smoke runs and launcher tests: no files, deterministic per step.

Batch b of rank r is a pure function of (seed, rank, b), so resuming at any step continues
the same stream without saving anything but the batch count.

    python -m clipforge.train experiment=smoke_cpu run_dir=/tmp/smoke     # data=synthetic
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from clipforge.data.plan import seed_for


class SyntheticLoader:
    def __init__(
        self,
        batch_size: int,
        image_size: int,
        context_length: int,
        vocab_size: int,
        seed: int,
        rank: int,
    ):
        self.batch_size, self.image_size = batch_size, image_size
        self.context_length, self.vocab_size = context_length, vocab_size
        self.seed, self.rank = seed, rank
        self.batches = 0
        self.errors = 0

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any], own: bool = True) -> None:
        # Batches are drawn from (seed, rank, index): another rank's count is as good as its own.
        self.batches = state["batches"]

    def metrics(self) -> dict[str, float]:
        """The loader counters the trainer logs (same names as TrainLoader.metrics)."""
        return {"data_errors": self.errors}

    def make_batch(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed_for(self.seed, self.rank, index))
        b, L = self.batch_size, self.context_length
        image = torch.randn(b, 3, self.image_size, self.image_size, generator=g)
        # Token layout of our tokenizer: SOS(2) words... EOS(3) then pad(0).
        lengths = torch.randint(1, L - 1, (b,), generator=g)
        text = torch.zeros(b, L, dtype=torch.long)
        words = torch.randint(4, max(5, self.vocab_size), (b, L), generator=g)
        for i, n in enumerate(lengths.tolist()):
            text[i, 0] = 2
            text[i, 1 : n + 1] = words[i, :n]
            text[i, n + 1] = 3
        return {"image": image, "text": text}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            batch = self.make_batch(self.batches)
            self.batches += 1
            yield batch
