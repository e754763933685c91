"""Seeded train/validation splits, stratified when a grouping key is given."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable, Hashable, Sequence, TypeVar

T = TypeVar("T")


def seeded_split(
    items: Sequence[T], fraction: float, seed: int, group: Callable[[T], Hashable] | None = None
) -> tuple[list[T], list[T]]:
    """Hold out ``fraction`` of ``items`` (of each group, when ``group`` is given).

    Every group with at least two items keeps one or more on each side; the result
    depends only on the items' order, the fraction and the seed.
    """
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[group(item) if group else None].append(index)
    rng = random.Random(seed)
    held_out: set[int] = set()
    for key in sorted(groups, key=repr):
        indices = groups[key][:]
        rng.shuffle(indices)
        count = round(len(indices) * fraction)
        if len(indices) >= 2:
            count = min(max(count, 1), len(indices) - 1)
        held_out.update(indices[:count])
    train = [item for i, item in enumerate(items) if i not in held_out]
    val = [item for i, item in enumerate(items) if i in held_out]
    return train, val
