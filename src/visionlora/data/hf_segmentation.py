"""A Hugging Face dataset with masks (``huggingface-segmentation``): an image and an annotation column.

The dataset is a saved dataset folder or a hub dataset id; its rows are read lazily. The
class names come from an ``id2label.json`` in the dataset folder or from the dataset's description.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visionlora.data import hf_datasets
from visionlora.data.masks import SegmentationRecord, class_file, id2label_names, part_extra, read_id2label
from visionlora.data.records import DataFormat, Part
from visionlora.data.splits import VAL_DIRS
from visionlora.errors import VisionLoraError

# Image columns that hold the masks, by name (else the second Image column)
ANNOTATION_COLUMNS = tuple("annotation label mask segmentation semantic_map gtFine".split())


def read_hf_segmentation(path: Path) -> Part:
    """The train split, carrying the first of validation/val/valid/test as its own validation part."""
    data = str(path)
    loaded, val_name = hf_datasets.train_and_validation(data, ("validation",) + VAL_DIRS + ("test",))
    image_col, mask_col = _hf_columns(loaded["train"], data)
    names = _hf_class_names(path, loaded["train"], data)
    part = Part(_hf_records(loaded["train"], "train", image_col, mask_col, data), names,
                "huggingface-segmentation", f"{data} (train)", extra=part_extra())
    if val_name:
        val_image_col, val_mask_col = _hf_columns(loaded[val_name], f"{data} ({val_name})")
        part.own_val = Part(_hf_records(loaded[val_name], val_name, val_image_col, val_mask_col, data), list(names),
                            "huggingface-segmentation", f"{data} ({val_name})", extra=part_extra())
    return part


def _hf_columns(split: Any, data: str) -> tuple[str, str]:
    """(image column, annotation column): the annotation is the Image column named like one, else the second."""
    import datasets

    features = split.features
    image_cols = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    named = [c for c in image_cols if c in ANNOTATION_COLUMNS]
    if len(image_cols) < 2:
        raise VisionLoraError(f"{data}: needs an image column and an annotation (mask) image column "
                              f"(columns: {', '.join(features)})")
    mask_col = named[0] if named else image_cols[1]
    return next(c for c in image_cols if c != mask_col), mask_col


def _hf_class_names(path: Path, split: Any, data: str) -> list[str]:
    """id2label.json in the dataset folder (or beside a saved split's folder), else an id2label mapping
    in the dataset's description."""
    found = class_file(path, "id2label.json") if path.is_dir() else None
    if found:
        return read_id2label(found)
    try:
        described = json.loads(split.info.description or "")
    except (json.JSONDecodeError, TypeError):
        described = None
    if isinstance(described, dict) and described:
        return id2label_names(described, f"{data} (description)")
    raise VisionLoraError(f'{data}: no class names; add an id2label.json ({{"0": "background", "1": ...}}) '
                          "to the dataset folder")


def _hf_records(split: Any, split_name: str, image_col: str, mask_col: str, data: str) -> list[SegmentationRecord]:
    """A lazy record per row; a row without an image or an annotation is an error naming it."""
    columns = split.with_format("arrow")
    for column, what in ((image_col, "image"), (mask_col, "annotation")):
        nulls = columns[column].is_null().to_pylist()
        if any(nulls):
            row = nulls.index(True)
            raise VisionLoraError(f"{data} ({split_name}[{row}]): no {what} in column '{column}' "
                                  f"({sum(nulls)} rows of {len(nulls)} have none)")
    images, masks = split.select_columns([image_col]), split.select_columns([mask_col])  # a row decodes one picture
    return [SegmentationRecord(hf_datasets.DatasetRow(images, split_name, i, image_col),
                               hf_datasets.DatasetRow(masks, split_name, i, mask_col),
                               source=f"{data} ({split_name}[{i}])")
            for i in range(len(split))]



FORMAT = DataFormat(
    name="huggingface-segmentation",
    expected="a saved Hugging Face dataset folder or a hub dataset id, with an image and an annotation column",
    finds=hf_datasets.is_dataset_reference,
    read=read_hf_segmentation,
)
