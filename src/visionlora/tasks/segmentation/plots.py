"""Segmentation's diagnostics plot: the IoU of each class."""

from __future__ import annotations

from typing import Any, Sequence

from visionlora.reporting.plots import figure_png, pyplot


def class_iou_plot(rows: Sequence[dict[str, Any]]) -> bytes:
    """IoU per class as bars (classes in neither the truth nor the predictions are left out)."""
    shown = [(row["class"], row["iou"]) for row in rows if row["iou"] is not None]
    figure, axis = pyplot().subplots(figsize=(max(5, 0.5 * len(shown) + 2), 4))
    axis.bar([name for name, _ in shown], [iou for _, iou in shown], color="tab:blue")
    axis.set(ylim=(0, 1), ylabel="IoU", title="IoU per class (validation, best epoch)")
    axis.tick_params(axis="x", rotation=45)
    axis.grid(alpha=0.3, axis="y")
    return figure_png(figure)
