"""Find a task's data in whatever format it is, and apply the train/validation rule.

A task names the formats it reads (``Task.data_formats``); they are tried in that order, and
the first that finds its files in a part reads it. A new format is a reader module declaring
a :class:`~visionlora.data.records.DataFormat`, added to ``FORMATS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

from visionlora.data import (
    coco,
    coco_segmentation,
    deeplabcut,
    hf_datasets,
    hf_segmentation,
    imagefolder,
    mask_folders,
    voc,
    voc_segmentation,
    yolo,
)
from visionlora.data.records import DataFormat, Part, SourceData
from visionlora.data.splits import (
    evaluation_part,
    holdout_fraction,
    locate_parts,
    parse_fold,
    seeded_folds,
    seeded_split,
)
from visionlora.errors import VisionLoraError

SEGMENTATION_FORMATS = (  # mask formats, in the order they are tried
    voc_segmentation.FORMAT,
    mask_folders.FORMAT,
    hf_segmentation.FORMAT,
    coco_segmentation.FORMAT,
)
SEGMENTATION_FORMAT_NAMES = tuple(f.name for f in SEGMENTATION_FORMATS)  # a segmentation task's ``data_formats``

FORMATS: dict[str, DataFormat] = {f.name: f for f in (
    hf_datasets.FORMAT,
    imagefolder.FORMAT,
    coco.DETECTION,
    voc.FORMAT,
    yolo.FORMAT,
    deeplabcut.FORMAT,
    coco.KEYPOINTS,
    *SEGMENTATION_FORMATS,
)}


def read_part(formats: Sequence[str], path: Path) -> Part:
    """Read one part with the first of ``formats`` that finds its files there."""
    candidates = [FORMATS[name] for name in formats]
    for data_format in candidates:
        if data_format.finds(path):
            return data_format.read(path)
    if not path.exists():
        raise VisionLoraError(f"{path}: no such folder or file")
    expected = "; or ".join(f.expected for f in candidates)
    raise VisionLoraError(f"{path}: no annotations found (expected {expected})")


def read_source(
    formats: Sequence[str],
    data: str,
    val_data: str | None,
    seed: int,
    val_fraction: float | None,
    group: Callable[[Any], Hashable] | None = None,
    test_data: str | None = None,
    fold: str | None = None,
) -> tuple[SourceData, list[Part]]:
    """Training, validation and (held-out) test records of ``data`` under the split rule (see ``splits``);
    with ``fold`` ("I/K"), fold I of the pooled training and validation records validates.

    Also returns the validation and test parts as read, so that a task can check them
    against training's labels.
    """
    layout = locate_parts(data, val_data, test_data)
    train = read_part(formats, layout.train)
    val = read_part(formats, layout.val) if layout.val else None
    test = read_part(formats, layout.test) if layout.test else None
    if fold:
        train_records, val = fold_split(train, val, fold, seed, group)
    else:
        train_records, val = _validation(train, val, seed, val_fraction, group)
    held_out = [val] + ([test] if test else [])
    source = SourceData(
        train=train_records,
        val=val.records,
        test=test.records if test else None,
        labels=list(train.labels),
        skipped=train.skipped + [s for part in held_out for s in part.skipped],
        dropped=train.dropped + [d for part in held_out for d in part.dropped],
        description={"format": train.format, "train": train.where, "val": val.where,
                     "notes": [note for part in [train, *held_out] for note in part.extra.get("notes", [])],
                     "test": test.where if test else None,
                     "val_part": str(layout.val) if layout.val and not fold else None,
                     "test_part": str(layout.test) if layout.test else None},
        extra=dict(train.extra),
    )
    return source, held_out


def read_validation(
    formats: Sequence[str],
    description: dict[str, Any],
    data: str,
    seed: int,
    val_fraction: float | None,
    group: Callable[[Any], Hashable] | None = None,
    split: str = "val",
    fold: str | None = None,
    val_data: str | None = None,
) -> Part:
    """Only the validation (or test) part of a run's split, as its summary's data ``description``
    records it: a separate folder is read alone, without the training part."""
    if split == "test":
        if not description.get("test_part"):
            raise VisionLoraError(f"{data}: the run had no test part (a test/ folder or --test-data)")
        return read_part(formats, Path(description["test_part"]))
    if fold:
        layout = locate_parts(data, val_data)
        val = read_part(formats, layout.val) if layout.val else None
        return fold_split(read_part(formats, layout.train), val, fold, seed, group)[1]
    if description.get("val_part"):
        return read_part(formats, Path(description["val_part"]))
    train = read_part(formats, locate_parts(data).train)
    return _validation(train, None, seed, val_fraction, group)[1]


def read_evaluation_part(formats: Sequence[str], data: str) -> Part:
    """The records to evaluate on in ``data``: its validation part, else all of it."""
    part = read_part(formats, evaluation_part(data))
    return part.own_val or part


def fold_split(train: Part, val: Part | None, fold: str, seed: int,
               group: Callable[[Any], Hashable] | None) -> tuple[list[Any], Part]:
    """(training records, validation part) of fold ``fold`` ("I/K") of the training and validation
    records pooled (a format's own validation split included)."""
    index, folds = parse_fold(fold)
    pooled = train.records + list((val or train.own_val or Part([], [], "", "")).records)
    assigned = seeded_folds(pooled, folds, seed, group)
    kept = [record for record, number in zip(pooled, assigned) if number != index - 1]
    held_out = [record for record, number in zip(pooled, assigned) if number == index - 1]
    where = f"fold {index} of {folds} of the training and validation records, seed {seed}"
    return kept, Part(held_out, list(train.labels), train.format, where, extra=dict(train.extra))


def _validation(train: Part, val: Part | None, seed: int, val_fraction: float | None,
                group: Callable[[Any], Hashable] | None) -> tuple[list[Any], Part]:
    """(training records, validation part): the given part, the format's own, or a seeded share."""
    val = val or train.own_val
    if val is not None:
        return train.records, val
    fraction = holdout_fraction(val_fraction, train.holdout)
    kept, held_out = seeded_split(train.records, fraction, seed, group)
    where = f"{fraction:.0%} of the training records{' per class' if group else ''}, seed {seed}"
    return kept, Part(held_out, list(train.labels), train.format, where, extra=dict(train.extra))
