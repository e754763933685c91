"""Facts about keypoints: left/right pairs, OKS sigmas, crop boxes and the size PCK scales with."""

from __future__ import annotations

import re

import numpy as np

from visionlora.data.records import PoseInstance, PoseRecord

# Standard COCO person keypoint sigmas (OKS); other skeletons use DEFAULT_SIGMA per keypoint.
COCO_PERSON_SIGMAS = {
    "nose": 0.026, "left_eye": 0.025, "right_eye": 0.025, "left_ear": 0.035, "right_ear": 0.035,
    "left_shoulder": 0.079, "right_shoulder": 0.079, "left_elbow": 0.072, "right_elbow": 0.072,
    "left_wrist": 0.062, "right_wrist": 0.062, "left_hip": 0.107, "right_hip": 0.107,
    "left_knee": 0.087, "right_knee": 0.087, "left_ankle": 0.089, "right_ankle": 0.089,
}
DEFAULT_SIGMA = 0.05


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


def instance_box(record: PoseRecord, instance: PoseInstance, width: int, height: int,
                 margin: float = 0.1) -> list[float]:
    """The crop box: the annotation's, the whole image, or the keypoints' extent plus a margin."""
    if record.whole_image:
        return [0.0, 0.0, float(width), float(height)]
    if instance.box is not None:
        return list(instance.box)
    extent = labelled_extent(instance.keypoints)
    if extent is None:  # no keypoint labelled: the whole image
        return [0.0, 0.0, float(width), float(height)]
    x0, y0, x1, y1 = extent
    pad = margin * max(x1 - x0, y1 - y0, 1.0) + 2.0
    return [max(0.0, x0 - pad), max(0.0, y0 - pad), min(float(width), x1 + pad), min(float(height), y1 + pad)]


def reference_size(instance: PoseInstance) -> float:
    """The size PCK thresholds scale with: the annotated box's longer side, else the keypoints' extent."""
    box = instance.box or labelled_extent(instance.keypoints)
    if box is None:
        return 1.0
    return max(box[2] - box[0], box[3] - box[1], 1.0)
