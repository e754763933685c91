"""Read classification data: ImageFolder layouts and Hugging Face datasets -> labelled records."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionlora.data.images import is_image_file
from visionlora.data.splits import seeded_split
from visionlora.errors import VisionLoraError

TRAIN_DIRS = ("train", "training")
VAL_DIRS = ("val", "validation", "valid", "test")


@dataclass
class LabelledImage:
    """One image (a file path, or a row of a Hugging Face dataset) and its class name."""

    source: Any
    label: str


@dataclass
class ClassificationData:
    """Train and validation records, the class names, and what was skipped while reading."""

    train: list[LabelledImage]
    val: list[LabelledImage]
    class_names: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return self.class_names


def first_child(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def read_class_folders(root: Path) -> tuple[list[LabelledImage], list[dict[str, str]]]:
    """Read ``root/<class>/<image>``; an empty class folder or no class at all is an error."""
    if not root.is_dir():
        raise VisionLoraError(f"{root}: no such folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise VisionLoraError(f"{root}: no class folders found (expected {root}/<class>/<image>)")
    records, skipped = [], []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if is_image_file(p)]
        skipped += [{"file": str(p), "reason": "not an image file extension"} for p in files if not is_image_file(p)]
        if not images:
            raise VisionLoraError(f"{class_dir}: class folder '{class_dir.name}' holds no images")
        records += [LabelledImage(str(p), class_dir.name) for p in images]
    return records, skipped


def is_hf_dataset_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


def read_classification_data(data: str, val_data: str | None, seed: int, val_fraction: float) -> ClassificationData:
    """Read ``data`` (and ``val_data``) from whichever supported layout they use.

    Validation comes from ``val_data``, else the data's own val split, else a seeded,
    per-class split of the training images.
    """
    path = Path(data)
    if (path.is_dir() and is_hf_dataset_folder(path)) or (not path.exists() and _looks_like_hub_id(data)):
        from visionlora.data.hf_datasets import read_hf_classification

        result = read_hf_classification(data)
    elif path.is_dir():
        result = _read_image_folder(path)
    else:
        raise VisionLoraError(f"{data}: no such folder (expected an ImageFolder or a saved Hugging Face dataset)")
    if val_data:
        val_path = Path(val_data)
        inner = first_child(val_path, VAL_DIRS) if val_path.is_dir() else None
        result.val, extra = read_class_folders(inner or val_path)
        result.skipped += extra
        result.description["val"] = str(inner or val_path)
    elif not result.val:
        result.train, result.val = seeded_split(result.train, val_fraction, seed, group=lambda r: r.label)
        result.description["val"] = f"{val_fraction:.0%} of the training images per class, seed {seed}"
    check_classes(result, data)
    return result


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not text.startswith((".", "~"))


def _read_image_folder(root: Path) -> ClassificationData:
    """``root/train`` (+ ``root/val``) when present, else ``root/<class>`` as training images."""
    train_dir = first_child(root, TRAIN_DIRS) or root
    train, skipped = read_class_folders(train_dir)
    val_dir = first_child(root, VAL_DIRS) if train_dir != root else None
    val: list[LabelledImage] = []
    if val_dir is not None:
        val, extra = read_class_folders(val_dir)
        skipped += extra
    names = sorted({r.label for r in train})
    description = {"format": "imagefolder", "train": str(train_dir), "val": str(val_dir) if val_dir else None}
    return ClassificationData(train, val, names, skipped, description)


def check_classes(data: ClassificationData, where: str) -> None:
    """At least two classes, every validation class known from training, no empty split."""
    if len(data.class_names) < 2:
        found = ", ".join(repr(n) for n in data.class_names) or "none"
        raise VisionLoraError(f"{where}: found one class ({found}); classification needs at least two")
    unknown = sorted({r.label for r in data.val} - set(data.class_names))
    if unknown:
        raise VisionLoraError(f"{data.description.get('val', where)}: validation classes not in training: {', '.join(unknown)}")
    if not data.val:
        raise VisionLoraError(f"{where}: the validation split is empty; add images or use --val-data")
