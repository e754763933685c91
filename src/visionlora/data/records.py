"""Plain annotation records that every reader returns, and the checks shared by readers.

Readers depend on this module, never the other way round. Boxes are (x0, y0, x1, y1)
in original pixels; keypoints are (K, 3) arrays of x, y and labelled (1) or not (0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from visionlora.errors import VisionLoraError


@dataclass
class LabelledImage:
    """One image (a file path, or a row of a Hugging Face dataset) and its class name."""

    source: Any
    label: str


@dataclass
class DetectionRecord:
    """One image and its boxes with category names."""

    image: str
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    source: str = ""  # the annotation file (and record) it came from, for messages


@dataclass
class PoseInstance:
    """One animal or person: its keypoints and an optional annotated box and area."""

    keypoints: np.ndarray
    box: list[float] | None = None
    area: float | None = None


@dataclass
class PoseRecord:
    """One image and the instances labelled in it."""

    image: str
    instances: list[PoseInstance] = field(default_factory=list)
    source: str = ""
    whole_image: bool = False  # single-animal frames: crop the whole image


@dataclass
class Part:
    """What one reader found in one folder or file: records and the names they use.

    ``own_val`` is a validation part the format carries itself (a dataset's validation
    split); ``holdout`` is the validation share the format asks for (DeepLabCut's
    TrainingFraction); ``extra`` holds format facts such as a skeleton.
    """

    records: list[Any]
    labels: list[str]
    format: str
    where: str
    skipped: list[dict[str, str]] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    holdout: float | None = None
    own_val: Part | None = None


@dataclass
class SourceData:
    """A dataset's train and validation records, its label names and what reading left out."""

    train: list[Any]
    val: list[Any]
    labels: list[str]
    test: list[Any] | None = None  # held out: evaluated once, with the best weights
    skipped: list[dict[str, str]] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataFormat:
    """A data format a reader understands: how it looks, how to spot it, how to read it.

    A new format is a new reader module declaring one of these, listed in ``formats.FORMATS``;
    a task names the formats it reads (``Task.data_formats``).
    """

    name: str
    expected: str  # how the format looks, for "no data found" messages
    finds: Callable[[Path], bool]
    read: Callable[[Path], Part]


def image_source(record: Any) -> Any:
    """What to open for a record's image: a detection or pose record's file, a labelled image's source."""
    return record.image if hasattr(record, "image") else record.source


def clean_box(box: list[float], width: float | None, height: float | None) -> list[float] | None:
    """Clip (x0, y0, x1, y1) to the image; None when nothing of positive area is left."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if width is not None and height is not None:
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if not np.isfinite([x0, y0, x1, y1]).all() or x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return [x0, y0, x1, y1]


def keypoint_array(values: list[Any], names: list[str], where: str, width: float | None = None,
                   height: float | None = None) -> np.ndarray:
    """(K, 3) from flat x, y, v values; NaN, v == 0 and points outside the image become unlabelled."""
    if len(values) != 3 * len(names):
        raise VisionLoraError(
            f"{where}: {len(values)} keypoint values, expected 3 x {len(names)} = {3 * len(names)} "
            f"for the keypoints {', '.join(names)}"
        )
    try:
        array = np.asarray(values, dtype=np.float64).reshape(len(names), 3)
    except (TypeError, ValueError):
        raise VisionLoraError(f"{where}: keypoint values must be numbers") from None
    return mark_unlabelled(array, width, height)


def mark_unlabelled(array: np.ndarray, width: float | None = None, height: float | None = None) -> np.ndarray:
    """Set v = 0 (and x = y = 0) where a point is NaN, marked unlabelled or outside the image."""
    array = array.astype(np.float64).copy()
    labelled = np.isfinite(array[:, 0]) & np.isfinite(array[:, 1]) & (array[:, 2] > 0)
    if width is not None and height is not None:
        labelled &= (array[:, 0] >= 0) & (array[:, 0] < width) & (array[:, 1] >= 0) & (array[:, 1] < height)
    array[:, 2] = labelled.astype(np.float64)
    array[~labelled, :2] = 0.0
    return array
