"""The one rule for train and validation parts, for every format and for ``evaluate``.

- A folder with a ``train/`` (or ``training/``) child is laid out in parts: that child
  trains, and a ``val/``, ``validation/``, ``valid/`` or ``test/`` child validates.
- Otherwise the folder (or file) is one training part.
- ``--val-data`` names the validation part instead (its own ``val/`` child if it has one).
- Without a validation part, a format's own validation split is used (a Hugging Face
  dataset's), else a seeded share of the training records is held out: ``--val-fraction``,
  else the format's own share (DeepLabCut's TrainingFraction), else 0.2.
- ``evaluate --data`` reads a folder's validation child if it has one, else all of it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Sequence, TypeVar

T = TypeVar("T")

TRAIN_DIRS = ("train", "training")
VAL_DIRS = ("val", "validation", "valid", "test")
DEFAULT_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Layout:
    """Where the training part is, and the validation part when there is one."""

    train: Path
    val: Path | None


def first_child(root: Path, names: Sequence[str]) -> Path | None:
    """The first of ``root/<name>`` that is a folder."""
    if not root.is_dir():
        return None
    return next((root / n for n in names if (root / n).is_dir()), None)


def locate_parts(data: str | Path, val_data: str | Path | None = None) -> Layout:
    """The training and validation parts of ``data`` (see the module rule)."""
    root = Path(data)
    train_dir = first_child(root, TRAIN_DIRS)
    if val_data:
        val = evaluation_part(val_data)
    else:
        val = first_child(root, VAL_DIRS) if train_dir else None
    return Layout(train_dir or root, val)


def evaluation_part(data: str | Path) -> Path:
    """The part of ``data`` to evaluate on: its validation child if it has one, else itself."""
    path = Path(data)
    return first_child(path, VAL_DIRS) or path


def holdout_fraction(requested: float | None, format_share: float | None) -> float:
    """The validation share: the user's, else the format's own, else the default."""
    return requested or format_share or DEFAULT_VAL_FRACTION


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
