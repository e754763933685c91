"""COCO box metrics through pycocotools' own COCOeval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from visionlora.metrics.coco import defined, run_cocoeval


@dataclass
class ImageBoxes:
    """Boxes of one image in pixels (x0, y0, x1, y1), label indices and, for predictions, scores."""

    boxes: Sequence[Sequence[float]]
    labels: Sequence[int]
    scores: Sequence[float] | None = None


def coco_ground_truth(targets: Sequence[ImageBoxes], label_names: Sequence[str],
                      sizes: Sequence[tuple[int, int]]) -> dict:
    """A COCO dataset dict (image ids 1..N, category ids 1..K) for the ground truth."""
    images = [{"id": i + 1, "height": int(h), "width": int(w)} for i, (h, w) in enumerate(sizes)]
    annotations: list[dict[str, Any]] = []
    for image_id, target in enumerate(targets, start=1):
        for box, label in zip(target.boxes, target.labels):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(label_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_detections(predictions: Sequence[ImageBoxes]) -> list[dict]:
    """COCO result entries for the predictions (same image and category ids as the ground truth)."""
    results = []
    for image_id, prediction in enumerate(predictions, start=1):
        if prediction.scores is None:
            raise ValueError(f"prediction {image_id} has no scores")
        for box, label, score in zip(prediction.boxes, prediction.labels, prediction.scores):
            x0, y0, x1, y1 = (float(v) for v in box)
            results.append({"image_id": image_id, "category_id": int(label) + 1,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return results


def detection_metrics(
    targets: Sequence[ImageBoxes],
    predictions: Sequence[ImageBoxes],
    label_names: Sequence[str],
    sizes: Sequence[tuple[int, int]],
) -> dict:
    """mAP@[.5:.95], mAP50, mAP75, AR@1/10/100 and per-class AP, as COCOeval computes them.

    Undefined values (COCO's -1, e.g. a class without ground truth) are reported as None.
    """
    keys = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "ar1", "ar10", "ar100")
    detections = coco_detections(predictions)
    if not detections:
        return {**{k: 0.0 for k in keys}, "per_class_ap": {name: 0.0 for name in label_names}}
    evaluation = run_cocoeval(coco_ground_truth(targets, label_names, sizes), detections, "bbox")
    stats = [float(v) for v in evaluation.stats]
    metrics: dict[str, Any] = {key: defined(stats[i]) for i, key in enumerate(keys)}
    precision = evaluation.eval["precision"]  # (iou, recall, class, area, max dets)
    per_class = {}
    for index, name in enumerate(label_names):
        values = precision[:, :, index, 0, -1]
        values = values[values > -1]
        per_class[name] = float(np.mean(values)) if values.size else None
    metrics["per_class_ap"] = per_class
    return metrics


@dataclass
class DetectionCurves:
    """Precision-recall curves from COCOeval's precision array (101 recall points, all areas,
    100 detections), per class and overall, at IoU 0.5 and averaged over IoU 0.5:0.95."""

    recall: np.ndarray  # (101,)
    precision50: dict[str, np.ndarray | None]  # class -> (101,), None without ground truth
    precision: dict[str, np.ndarray | None]
    rows: list[dict]  # per class: instances, AP, AP50, AP75


def detection_curves(targets: Sequence[ImageBoxes], predictions: Sequence[ImageBoxes], label_names: Sequence[str],
                     sizes: Sequence[tuple[int, int]]) -> DetectionCurves:
    recall = np.linspace(0.0, 1.0, 101)
    instances = {name: sum(list(t.labels).count(i) for t in targets) for i, name in enumerate(label_names)}
    detections = coco_detections(predictions)
    if not detections:
        zeros = {name: np.zeros(101) if instances[name] else None for name in label_names}
        rows = [{"class": n, "instances": instances[n], "ap": 0.0, "ap50": 0.0, "ap75": 0.0} for n in label_names]
        return DetectionCurves(recall, zeros, dict(zeros), rows)
    evaluation = run_cocoeval(coco_ground_truth(targets, label_names, sizes), detections, "bbox")
    table = evaluation.eval["precision"][:, :, :, 0, -1]  # (iou, recall, class)
    at50, averaged, rows = {}, {}, []
    for index, name in enumerate(label_names):
        curves = table[:, :, index]
        defined_here = instances[name] > 0 and (curves > -1).any()
        at50[name] = np.clip(curves[0], 0, None) if defined_here else None
        averaged[name] = np.clip(curves, 0, None).mean(axis=0) if defined_here else None
        ap = [float(np.mean(c[c > -1])) if defined_here and (c > -1).any() else None
              for c in (curves, curves[0], curves[5])]
        rows.append({"class": name, "instances": instances[name], "ap": ap[0], "ap50": ap[1], "ap75": ap[2]})
    return DetectionCurves(recall, at50, averaged, rows)
