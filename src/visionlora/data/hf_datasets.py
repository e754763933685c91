"""Hugging Face datasets (a saved dataset folder, or a hub dataset id) -> labelled images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from visionlora.data.records import DataFormat, LabelledImage, Part
from visionlora.data.splits import VAL_DIRS
from visionlora.errors import VisionLoraError


@dataclass(frozen=True)
class DatasetRow:
    """A lazy reference to one image of a Hugging Face dataset split."""

    dataset: Any
    split: str
    index: int
    column: str

    def open(self) -> Image.Image:
        return self.dataset[self.index][self.column]

    def __str__(self) -> str:
        return f"{self.split}[{self.index}]"


def is_dataset_reference(path: Path) -> bool:
    """A saved dataset folder, or (when no such path exists) something shaped like a hub id."""
    if path.is_dir():
        return any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))
    text = str(path)
    parts = text.split("/")
    return not path.exists() and 1 <= len(parts) <= 2 and all(parts) and not text.startswith((".", "~"))


def _load(data: str) -> Any:
    import datasets

    path = Path(data)
    try:
        loaded = datasets.load_from_disk(str(path)) if path.exists() else datasets.load_dataset(data)
    except Exception as err:  # the datasets library raises many types; name the source instead
        where = "saved dataset folder" if path.exists() else "no such folder, and as a hub dataset id"
        raise VisionLoraError(f"{data}: cannot load ({where}): {str(err).splitlines()[0]}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _columns(split: Any, data: str) -> tuple[str, str]:
    import datasets

    features = split.features
    image_cols = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    label_cols = [name for name, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if not image_cols:
        raise VisionLoraError(f"{data}: no image column (columns: {', '.join(features)})")
    if not label_cols:
        raise VisionLoraError(f"{data}: no class-label column (columns: {', '.join(features)})")
    preferred = [c for c in ("label", "labels") if c in label_cols]
    return image_cols[0], (preferred or label_cols)[0]


def _records(split: Any, split_name: str, image_col: str, label_col: str) -> list[LabelledImage]:
    names = split.features[label_col].names
    return [LabelledImage(DatasetRow(split, split_name, i, image_col), names[y])
            for i, y in enumerate(split[label_col])]


def train_and_validation(data: str,
                         validation_names: tuple[str, ...] = ("validation",) + VAL_DIRS) -> tuple[Any, str | None]:
    """(the loaded dataset, the name of its validation split or None): the train split is required,
    validation is the first of ``validation_names`` present."""
    loaded = _load(data)
    if "train" not in loaded:
        raise VisionLoraError(f"{data}: no 'train' split (splits: {', '.join(loaded)})")
    return loaded, next((name for name in validation_names if name in loaded), None)


def read_hf_classification(path: Path) -> Part:
    """The train split, carrying the first of validation/val/valid/test as its own validation part."""
    data = str(path)
    loaded, val_name = train_and_validation(data)
    image_col, label_col = _columns(loaded["train"], data)
    train = _records(loaded["train"], "train", image_col, label_col)
    names = list(loaded["train"].features[label_col].names)
    used = sorted({r.label for r in train}, key=names.index)
    part = Part(train, used, "huggingface", f"{data} (train)")
    if val_name:
        val = _records(loaded[val_name], val_name, image_col, label_col)
        part.own_val = Part(val, sorted({r.label for r in val}, key=names.index), "huggingface", f"{data} ({val_name})")
    return part


FORMAT = DataFormat(
    name="huggingface",
    expected="a saved Hugging Face dataset folder or a hub dataset id",
    finds=is_dataset_reference,
    read=read_hf_classification,
)
