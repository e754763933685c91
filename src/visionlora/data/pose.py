"""Keypoint records shared by the COCO-keypoints and DeepLabCut readers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from visionlora.errors import VisionLoraError

# Standard COCO person keypoint sigmas (OKS); other skeletons use DEFAULT_SIGMA per keypoint.
COCO_PERSON_SIGMAS = {
    "nose": 0.026, "left_eye": 0.025, "right_eye": 0.025, "left_ear": 0.035, "right_ear": 0.035,
    "left_shoulder": 0.079, "right_shoulder": 0.079, "left_elbow": 0.072, "right_elbow": 0.072,
    "left_wrist": 0.062, "right_wrist": 0.062, "left_hip": 0.107, "right_hip": 0.107,
    "left_knee": 0.087, "right_knee": 0.087, "left_ankle": 0.089, "right_ankle": 0.089,
}
DEFAULT_SIGMA = 0.05


@dataclass
class PoseInstance:
    """One animal or person: keypoints (K, 3) as x, y, labelled (1) or not (0), and an optional box."""

    keypoints: np.ndarray
    box: list[float] | None = None  # x0, y0, x1, y1 in pixels, from the annotation
    area: float | None = None


@dataclass
class PoseRecord:
    image: str
    instances: list[PoseInstance] = field(default_factory=list)
    source: str = ""
    whole_image: bool = False  # single-animal frames: crop the whole image


@dataclass
class PoseData:
    """Train and validation records, keypoint names, skeleton and what reading skipped."""

    train: list[PoseRecord]
    val: list[PoseRecord]
    keypoint_names: list[str]
    skeleton: list[list[int]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)
    val_fraction: float | None = None  # a format's own split fraction (DeepLabCut's TrainingFraction)

    @property
    def labels(self) -> list[str]:
        return self.keypoint_names


def keypoint_array(values: list[Any], names: list[str], where: str, width=None, height=None) -> np.ndarray:
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


def mark_unlabelled(array: np.ndarray, width=None, height=None) -> np.ndarray:
    """Set v = 0 (and x = y = 0) where a point is NaN, marked unlabelled or outside the image."""
    array = array.astype(np.float64).copy()
    labelled = np.isfinite(array[:, 0]) & np.isfinite(array[:, 1]) & (array[:, 2] > 0)
    if width is not None and height is not None:
        labelled &= (array[:, 0] >= 0) & (array[:, 0] < width) & (array[:, 1] >= 0) & (array[:, 1] < height)
    array[:, 2] = labelled.astype(np.float64)
    array[~labelled, :2] = 0.0
    return array


def flip_pairs(names: list[str]) -> list[tuple[int, int]]:
    """Index pairs of keypoints named left*/right* (leftear/rightear, left_eye/right_eye, l_/r_...)."""
    pairs = []
    lowered = [n.lower() for n in names]
    for i, name in enumerate(lowered):
        for left, right in (("left", "right"), ("l_", "r_"), ("_l", "_r")):
            if left in name:
                partner = name.replace(left, right)
                if partner in lowered and (i, lowered.index(partner)) not in pairs:
                    pairs.append((i, lowered.index(partner)))
                break
    return pairs


def keypoint_sigmas(names: list[str]) -> list[float]:
    """Per-keypoint OKS sigmas: COCO's for person keypoints it names, DEFAULT_SIGMA otherwise."""
    return [COCO_PERSON_SIGMAS.get(re.sub(r"[\s-]", "_", n.lower()), DEFAULT_SIGMA) for n in names]


def labelled_extent(keypoints: np.ndarray) -> list[float] | None:
    """x0, y0, x1, y1 of the labelled points, or None when none is labelled."""
    points = keypoints[keypoints[:, 2] > 0, :2]
    if len(points) == 0:
        return None
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
    return [float(x0), float(y0), float(x1), float(y1)]


def instance_box(record: PoseRecord, instance: PoseInstance, width: int, height: int, margin: float = 0.1) -> list[float]:
    """The crop box: the annotation's, the whole image, or the keypoints' extent plus a margin."""
    if record.whole_image:
        return [0.0, 0.0, float(width), float(height)]
    if instance.box is not None:
        return list(instance.box)
    x0, y0, x1, y1 = labelled_extent(instance.keypoints)
    pad = margin * max(x1 - x0, y1 - y0, 1.0) + 2.0
    return [max(0.0, x0 - pad), max(0.0, y0 - pad), min(float(width), x1 + pad), min(float(height), y1 + pad)]


def reference_size(instance: PoseInstance) -> float:
    """The size PCK thresholds scale with: the annotated box's longer side, else the keypoints' extent."""
    box = instance.box or labelled_extent(instance.keypoints)
    if box is None:
        return 1.0
    return max(box[2] - box[0], box[3] - box[1], 1.0)


def finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def read_pose_data(data: str, val_data: str | None, seed: int, val_fraction: float | None) -> PoseData:
    """A DeepLabCut project (split by seed at its TrainingFraction), or COCO keypoints files
    laid out like detection data (``train/`` + ``val/``, a folder, or a .json path)."""
    from pathlib import Path

    from visionlora.data import coco
    from visionlora.data.deeplabcut import is_deeplabcut_project, read_deeplabcut
    from visionlora.data.detection import TRAIN_DIRS, VAL_DIRS
    from visionlora.data.splits import seeded_split

    root = Path(data)
    if is_deeplabcut_project(root):
        records, names, skeleton, fraction, skipped = read_deeplabcut(root)
        holdout = val_fraction or (round(1.0 - fraction, 6) if fraction and 0 < fraction < 1 else 0.2)
        train, val = seeded_split(records, holdout, seed)
        description = {"format": "deeplabcut", "train": str(root), "val": f"{holdout:.0%} of the frames, seed {seed}"}
        result = PoseData(train, val, names, skeleton, skipped, description)
    else:
        def coco_file(path: Path) -> Path:
            found = path if path.is_file() else coco.find_coco_json(path) if path.is_dir() else None
            if found is None:
                raise VisionLoraError(
                    f"{path}: no pose annotations found (expected a COCO keypoints .json file or a "
                    "DeepLabCut project with config.yaml and labeled-data/)"
                )
            return found

        train_dir = next((root / n for n in TRAIN_DIRS if (root / n).is_dir()), None) if root.is_dir() else None
        train, names, skeleton, skipped = coco.read_coco_keypoints(coco_file(train_dir or root))
        val_dir = Path(val_data) if val_data else (
            next((root / n for n in VAL_DIRS if (root / n).is_dir()), None) if train_dir else None
        )
        if val_dir is not None:
            val, val_names, _, val_skipped = coco.read_coco_keypoints(coco_file(val_dir))
            if val_names != names:
                raise VisionLoraError(f"{val_dir}: keypoints {val_names} differ from training's {names}")
            skipped += val_skipped
        else:
            train, val = seeded_split(train, val_fraction or 0.2, seed)
        description = {"format": "coco-keypoints", "train": str(train_dir or root),
                       "val": str(val_dir) if val_dir else f"{val_fraction or 0.2:.0%} of the images, seed {seed}"}
        result = PoseData(train, val, names, skeleton, skipped, description)
    if not result.train:
        raise VisionLoraError(f"{data}: no training images with labelled keypoints")
    if not result.val:
        raise VisionLoraError(f"{data}: the validation split is empty; add images or use --val-data")
    return result
