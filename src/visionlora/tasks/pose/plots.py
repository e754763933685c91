"""Pose's diagnostics plots: the error per keypoint and the PCK curve."""

from __future__ import annotations

from typing import Sequence

from visionlora.core.plots import bar_plot, figure_png, subplots


def keypoint_error_plot(names: Sequence[str], errors: Sequence[float | None]) -> bytes:
    """Mean pixel error of each keypoint as bars (keypoints never labelled are left out)."""
    return bar_plot(names, errors, "mean error (pixels)", "Error per keypoint (validation, best epoch)")


def pck_curve_plot(thresholds, values) -> bytes:
    """The share of labelled keypoints within each distance threshold (a fraction of the instance size)."""
    figure, axis = subplots(figsize=(6, 4))
    axis.plot(thresholds, values, marker=".")
    for mark in (0.05, 0.1, 0.2):
        axis.axvline(mark, color="grey", linestyle=":", linewidth=1)
    axis.set(xlim=(0, max(thresholds)), ylim=(0, 1.02), xlabel="threshold (fraction of instance size)",
             ylabel="PCK", title="PCK against threshold (validation, best epoch)")
    axis.grid(alpha=0.3)
    return figure_png(figure)
