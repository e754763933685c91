"""Detection records shared by the COCO, VOC and YOLO readers, and the folder-layout logic."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionlora.data.splits import seeded_split
from visionlora.errors import VisionLoraError

TRAIN_DIRS = ("train", "training")
VAL_DIRS = ("val", "validation", "valid", "test")


@dataclass
class DetectionRecord:
    """One image and its boxes (x0, y0, x1, y1 in original pixels) with category names."""

    image: str
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    source: str = ""  # the annotation file (and record) it came from, for messages


@dataclass
class DetectionSplit:
    """What one reader found in one folder or file."""

    records: list[DetectionRecord]
    categories: list[str]
    dropped_boxes: list[dict[str, str]] = field(default_factory=list)
    format: str = ""


@dataclass
class DetectionData:
    """Train and validation records, category names, and what reading dropped."""

    train: list[DetectionRecord]
    val: list[DetectionRecord]
    labels: list[str]
    dropped_boxes: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)


def clean_box(box: list[float], width: float | None, height: float | None) -> list[float] | None:
    """Clip (x0, y0, x1, y1) to the image; None when nothing of positive area is left."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if width is not None and height is not None:
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if not all(map(_finite, (x0, y0, x1, y1))) or x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return [x0, y0, x1, y1]


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def read_detection_split(path: Path) -> DetectionSplit:
    """Detect the annotation format of a folder (or COCO file) and read it."""
    from visionlora.data import coco, voc, yolo

    if path.is_file() and path.suffix == ".json":
        return coco.read_coco_detection(path)
    if not path.is_dir():
        raise VisionLoraError(f"{path}: no such folder or COCO .json file")
    coco_files = coco.find_coco_json(path)
    if coco_files:
        return coco.read_coco_detection(coco_files)
    if voc.find_voc_xml(path):
        return voc.read_voc(path)
    if yolo.find_yolo_labels(path):
        return yolo.read_yolo(path)
    raise VisionLoraError(
        f"{path}: no annotations found (expected a COCO .json file, an annotations/ folder of "
        "Pascal VOC .xml files, or a labels/ folder of YOLO .txt files)"
    )


def read_detection_data(data: str, val_data: str | None, seed: int, val_fraction: float) -> DetectionData:
    """Read ``data`` laid out as ``train/`` + ``val/`` parts, or as one part split by seed."""
    root = Path(data)
    train_dir = next((root / n for n in TRAIN_DIRS if (root / n).is_dir()), None) if root.is_dir() else None
    train_split = read_detection_split(train_dir or root)
    val_dir = None
    if val_data:
        val_dir = Path(val_data)
    elif train_dir is not None:
        val_dir = next((root / n for n in VAL_DIRS if (root / n).is_dir()), None)
    val_split = read_detection_split(val_dir) if val_dir else None

    labels = list(dict.fromkeys(train_split.categories + (val_split.categories if val_split else [])))
    if not labels:
        raise VisionLoraError(f"{data}: the annotations define no categories")
    train, val = train_split.records, val_split.records if val_split else []
    if not val_split:
        train, val = seeded_split(train, val_fraction, seed)
    description = {
        "format": train_split.format,
        "train": str(train_dir or root),
        "val": str(val_dir) if val_dir else f"{val_fraction:.0%} of the images, seed {seed}",
    }
    dropped = train_split.dropped_boxes + (val_split.dropped_boxes if val_split else [])
    result = DetectionData(train, val, labels, dropped, [], description)
    _check(result, data)
    return result


def _check(data: DetectionData, where: str) -> None:
    if not data.train:
        raise VisionLoraError(f"{where}: no training images")
    if not data.val:
        raise VisionLoraError(f"{where}: the validation split is empty; add images or use --val-data")
    if not any(r.boxes for r in data.train):
        raise VisionLoraError(f"{data.description['train']}: no boxes in the training images")
    if not any(r.boxes for r in data.val):
        raise VisionLoraError(f"{data.description['val']}: no boxes in the validation images, so mAP is undefined")
