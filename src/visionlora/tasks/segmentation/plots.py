"""Segmentation's diagnostics plot: the IoU of each class."""

from __future__ import annotations

from typing import Any, Sequence

from visionlora.core.plots import bar_plot


def class_iou_plot(rows: Sequence[dict[str, Any]]) -> bytes:
    """IoU per class as bars (classes in neither the truth nor the predictions are left out)."""
    return bar_plot([row["class"] for row in rows], [row["iou"] for row in rows], "IoU",
                    "IoU per class (validation, best epoch)", ylim=(0, 1))
