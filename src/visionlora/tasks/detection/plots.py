"""Detection's diagnostics plot: precision-recall curves."""

from __future__ import annotations

from visionlora.core.plots import figure_png, style_axis, subplots


def precision_recall_plot(recall, per_class: dict, overall, title: str) -> bytes:
    """One precision-recall curve per class with ground truth, and their mean ("all classes")."""
    figure, axis = subplots(figsize=(7, 4.5))
    for name, precision in per_class.items():
        if precision is not None:
            axis.plot(recall, precision, linewidth=1, label=f"{name} (AP {precision.mean():.3f})")
    if overall is not None:
        axis.plot(recall, overall, color="black", linewidth=2.5, label=f"all classes (AP {overall.mean():.3f})")
    axis.set(xlim=(0, 1), ylim=(0, 1.02))
    style_axis(axis, "precision", title)
    axis.set_xlabel("recall")
    return figure_png(figure)
