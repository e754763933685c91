"""Keypoint metrics: pixel error, PCK, and OKS AP through pycocotools' COCOeval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from visionlora.metrics.coco import defined, run_cocoeval

PCK_THRESHOLDS = (0.05, 0.1, 0.2)


@dataclass
class PoseTarget:
    """Ground truth of one instance: (K, 3) keypoints in pixels (x, y, labelled), box and scale."""

    keypoints: np.ndarray
    box: Sequence[float]  # x0, y0, x1, y1
    reference_size: float  # PCK thresholds are fractions of this
    area: float


def pose_metrics(
    targets: Sequence[PoseTarget], points: np.ndarray, scores: np.ndarray, names: Sequence[str], sigmas: Sequence[float]
) -> dict:
    """Mean pixel error (headline), per-keypoint error, PCK@0.05/0.1/0.2 and OKS AP/AP50/AP75/AR.

    ``points`` is (N, K, 2) in original pixels and ``scores`` (N, K); only labelled
    keypoints count towards the errors and PCK.
    """
    truth = np.stack([t.keypoints for t in targets])
    labelled = truth[..., 2] > 0
    distance = np.linalg.norm(points - truth[..., :2], axis=-1)
    metrics: dict[str, Any] = {"pixel_error": float(distance[labelled].mean()) if labelled.any() else None}
    metrics["per_keypoint_error"] = {
        name: (float(distance[:, k][labelled[:, k]].mean()) if labelled[:, k].any() else None)
        for k, name in enumerate(names)
    }
    sizes = np.array([t.reference_size for t in targets])[:, None]
    for threshold in PCK_THRESHOLDS:
        hits = (distance <= threshold * sizes) & labelled
        metrics[f"pck@{threshold}"] = float(hits.sum() / max(labelled.sum(), 1))
    metrics.update(oks_average_precision(targets, points, scores, names, sigmas))
    return metrics


def oks_average_precision(targets: Sequence[PoseTarget], points: np.ndarray, scores: np.ndarray, names: Sequence[str],
                          sigmas: Sequence[float]) -> dict:
    """COCO keypoint AP with one detection per ground-truth instance (top-down, given boxes)."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    for index, (target, found, found_scores) in enumerate(zip(targets, points, scores), start=1):
        x0, y0, x1, y1 = (float(v) for v in target.box)
        visible = target.keypoints[:, 2] > 0
        flat_truth = np.column_stack([target.keypoints[:, :2], np.where(visible, 2, 0)]).ravel()
        images.append({"id": index})
        annotations.append({
            "id": index, "image_id": index, "category_id": 1, "iscrowd": 0, "area": float(target.area),
            "bbox": [x0, y0, x1 - x0, y1 - y0], "keypoints": flat_truth.tolist(), "num_keypoints": int(visible.sum()),
        })
        flat_found = np.column_stack([found, found_scores]).ravel()
        detections.append({"image_id": index, "category_id": 1, "keypoints": flat_found.tolist(),
                           "score": float(np.mean(found_scores))})
    ground_truth = {"images": images, "annotations": annotations,
                    "categories": [{"id": 1, "name": "instance", "keypoints": list(names)}]}
    evaluation = run_cocoeval(ground_truth, detections, "keypoints", sigmas)
    stats = [float(v) for v in evaluation.stats]
    return {"oks_ap": defined(stats[0]), "oks_ap50": defined(stats[1]), "oks_ap75": defined(stats[2]),
            "oks_ar": defined(stats[5])}


PCK_CURVE = np.round(np.linspace(0.0, 0.5, 51), 3)


def keypoint_table(targets: Sequence[PoseTarget], points: np.ndarray,
                   names: Sequence[str]) -> tuple[list[dict], np.ndarray]:
    """Per-keypoint rows (labelled count, mean pixel error, PCK@0.05/0.1/0.2) and the overall PCK
    at each threshold of ``PCK_CURVE`` (fractions of each instance's reference size)."""
    truth = np.stack([t.keypoints for t in targets])
    labelled = truth[..., 2] > 0
    relative = np.linalg.norm(points - truth[..., :2], axis=-1)
    sizes = np.array([t.reference_size for t in targets])[:, None]
    rows = []
    for k, name in enumerate(names):
        mask = labelled[:, k]
        row = {"keypoint": name, "labelled": int(mask.sum()),
               "pixel_error": float(relative[mask, k].mean()) if mask.any() else None}
        for threshold in PCK_THRESHOLDS:
            row[f"pck@{threshold}"] = (float((relative[mask, k] <= threshold * sizes[mask, 0]).mean())
                                       if mask.any() else None)
        rows.append(row)
    curve = np.array([((relative <= t * sizes) & labelled).sum() / max(labelled.sum(), 1) for t in PCK_CURVE])
    return rows, curve
