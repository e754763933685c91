"""Semantic segmentation metrics from a pixel confusion matrix, summed over images.

The numbers follow the ``evaluate`` library's ``mean_iou``: per class, IoU = TP / (TP + FP + FN)
and accuracy = TP / (TP + FN); classes with no pixels in the target nor the predictions (no
union) have no IoU, classes with no target pixels have no accuracy, and the means leave them
out. Pixels whose target is the ignore value count for nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(predicted: Any, target: Any, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(C, C) int64 pixel counts of one image or a batch: row = true class, column = predicted class.

    ``predicted`` and ``target`` are integer arrays (numpy or torch) of the same shape; pixels
    whose target is ``ignore_index`` are left out. Matrices of several images add up.
    """
    predicted, target = _numpy(predicted), _numpy(target)
    if predicted.shape != target.shape:
        raise ValueError(f"predicted shape {predicted.shape} differs from target shape {target.shape}")
    keep = target != ignore_index
    predicted, target = predicted[keep].astype(np.int64), target[keep].astype(np.int64)
    for name, values in (("target", target), ("predicted", predicted)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} class ids must be 0 to {num_classes - 1} (or {ignore_index} in the target), "
                             f"got {values.min()} to {values.max()}")
    counts = np.bincount(target * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _per_class(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, target pixels, predicted pixels, union) per class, as float64."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    target, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    return true_positive, target, predicted, target + predicted - true_positive


def _scores(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, accuracy) per class: NaN where a class has no union (IoU) or no target pixels (accuracy)."""
    true_positive, target, _, union = _per_class(confusion)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.where(union > 0, true_positive / union, np.nan),
                np.where(target > 0, true_positive / target, np.nan))


def segmentation_metrics(confusion: np.ndarray, class_names: list[str]) -> dict:
    """``mean_iou`` (the main metric), ``pixel_accuracy``, ``mean_accuracy`` and ``per_class_iou``.

    ``per_class_iou`` maps every class name to its IoU, or None where the class is in neither
    the target nor the predictions. Means are over the classes that have one (0.0 when none do).
    """
    true_positive, target, _, _ = _per_class(confusion)
    iou, accuracy = _scores(confusion)
    total = target.sum()
    return {
        "mean_iou": _nanmean(iou),
        "pixel_accuracy": float(true_positive.sum() / total) if total else 0.0,
        "mean_accuracy": _nanmean(accuracy),
        "per_class_iou": {name: None if np.isnan(iou[i]) else float(iou[i]) for i, name in enumerate(class_names)},
    }


def _nanmean(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else 0.0


def per_class_rows(confusion: np.ndarray, class_names: list[str]) -> list[dict]:
    """One row per class for a CSV: IoU, accuracy (None where undefined), target and predicted pixels."""
    _, target, predicted, _ = _per_class(confusion)
    iou, accuracy = _scores(confusion)

    def rounded(value: float) -> float | None:
        return None if np.isnan(value) else round(float(value), 6)

    return [{"class": name, "iou": rounded(iou[i]), "accuracy": rounded(accuracy[i]),
             "pixels": int(target[i]), "predicted_pixels": int(predicted[i])} for i, name in enumerate(class_names)]
