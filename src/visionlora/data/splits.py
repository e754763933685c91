"""The one rule for train and validation parts, for every format and for ``evaluate``.

- A folder with a ``train/`` (or ``training/``) child is laid out in parts: that child
  trains, a ``val/``, ``validation/`` or ``valid/`` child validates (picks the best epoch
  and drives early stopping), and a ``test/`` child is held out, evaluated once at the end.
- Otherwise the folder (or file) is one training part.
- ``--val-data`` and ``--test-data`` name those parts instead (their own ``val/`` or
  ``test/`` child if they have one).
- Without a validation part, a format's own validation split is used (a Hugging Face
  dataset's), else a seeded share of the training records is held out: ``--val-fraction``,
  else the format's own share (DeepLabCut's TrainingFraction), else 0.2.
- ``evaluate --data`` reads a folder's validation child, else its test child, else all of it.
- ``--fold I/K`` (cross-validation) pools the training and validation records, deals them into K
  seeded folds (each group in proportion) and validates on fold I, training on the others.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Sequence, TypeVar

from visionlora.errors import VisionLoraError

T = TypeVar("T")

TRAIN_DIRS = ("train", "training")
VAL_DIRS = ("val", "validation", "valid")
TEST_DIRS = ("test",)
DEFAULT_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Layout:
    """Where the training part is, and the validation and test parts when there are ones."""

    train: Path
    val: Path | None
    test: Path | None = None


def first_child(root: Path, names: Sequence[str]) -> Path | None:
    """The first of ``root/<name>`` that is a folder."""
    if not root.is_dir():
        return None
    return next((root / n for n in names if (root / n).is_dir()), None)


NO_TEST = "none"  # --test-data none: no test part, even where the data has one


def locate_parts(data: str | Path, val_data: str | Path | None = None, test_data: str | Path | None = None) -> Layout:
    """The training, validation and test parts of ``data`` (see the module rule)."""
    root = Path(data)
    train_dir = first_child(root, TRAIN_DIRS)
    val = (first_child(Path(val_data), VAL_DIRS) or Path(val_data)) if val_data else (
        first_child(root, VAL_DIRS) if train_dir else None)
    test = (first_child(Path(test_data), TEST_DIRS) or Path(test_data)) if test_data else (
        first_child(root, TEST_DIRS) if train_dir else None)
    if test_data == NO_TEST:
        test = None
    return Layout(train_dir or root, val, test)


def evaluation_part(data: str | Path) -> Path:
    """The part of ``data`` to evaluate on: its validation child, else its test child, else itself."""
    path = Path(data)
    return first_child(path, VAL_DIRS) or first_child(path, TEST_DIRS) or path


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


def parse_fold(text: str) -> tuple[int, int]:
    """``"I/K"`` as (I, K): fold I (1 to K) of K folds, K at least 2."""
    index, _, count = str(text).partition("/")
    try:
        fold, folds = int(index), int(count)
    except ValueError:
        raise VisionLoraError(f"--fold must be I/K (fold I of K, e.g. 2/5), not {text!r}") from None
    if folds < 2 or not 1 <= fold <= folds:
        raise VisionLoraError(f"--fold {text}: needs 2 or more folds and a fold from 1 to {max(folds, 2)}")
    return fold, folds


def seeded_folds(items: Sequence[T], folds: int, seed: int, group: Callable[[T], Hashable] | None = None) -> list[int]:
    """The fold (0 to ``folds`` - 1) of each item: each group shuffled by ``seed`` and dealt in turn, so
    every fold holds its share of each group; depends only on the items' order, ``folds`` and ``seed``."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[group(item) if group else None].append(index)
    rng = random.Random(seed)
    assigned = [0] * len(items)
    dealt = 0
    for key in sorted(groups, key=repr):
        indices = groups[key][:]
        rng.shuffle(indices)
        for position, index in enumerate(indices):
            assigned[index] = (dealt + position) % folds
        dealt += len(indices)
    return assigned
