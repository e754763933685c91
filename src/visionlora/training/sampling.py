"""A seeded weighted sampler for --balanced-sampler, the same for a given (seed, epoch)."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch


class EpochWeightedSampler(torch.utils.data.Sampler[int]):
    """Draws ``len(weights)`` indices per epoch with replacement, in proportion to ``weights``.

    The draw depends only on (seed, epoch), so a resumed run sees the same order.
    """

    def __init__(self, weights: Sequence[float], seed: int):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist())
