"""The run's training curves from the history (loss.png, metrics.png), drawn with the
primitives of :mod:`visionlora.core.plots`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from visionlora.artifacts import atomic_write_bytes
from visionlora.core.plots import figure_png, style_axis, subplots

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_training_plots(history: list[dict[str, Any]], loss_path: Path, metrics_path: Path, main_metric: str,
                        unbounded: Sequence[str] = (), test_metrics: dict[str, Any] | None = None) -> None:
    """Train and validation loss per epoch, and every scalar validation metric per epoch.

    Metrics in [0, 1] share one axis fixed to [0, 1]; ``unbounded`` ones (pixel errors)
    get a panel of their own. Epochs are whole numbers and legends sit beside the curves.
    With ``test_metrics``, the held-out test result heads the figure and marks the main curve.
    """
    epochs = [row["epoch"] for row in history]
    figure, axis = subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        axis.plot(epochs, [row.get(key) for row in history], marker="o", label=label)
    style_axis(axis, "loss", "Loss")
    _save(figure, loss_path)

    scalars = [k[4:] for k, v in history[-1].items()
               if k.startswith("val_") and k != "val_loss" and isinstance(v, (int, float))]
    groups = [[k for k in scalars if k not in unbounded], [k for k in scalars if k in unbounded]]
    groups = [group for group in groups if group] or [[]]
    figure, axes = subplots(len(groups), 1, figsize=(7, 3.6 * len(groups)), squeeze=False)
    for axis, group in zip(axes[:, 0], groups):
        for key in group:
            style = "-" if key == main_metric else "--"
            axis.plot(epochs, [row.get(f"val_{key}") for row in history], style, marker="o", label=key)
            if test_metrics is not None and key == main_metric:
                axis.axhline(test_metrics[key], color="black", linestyle=":", label=f"test {key}")
        bounded = not any(key in unbounded for key in group)
        if bounded:
            axis.set_ylim(0.0, 1.0)
        title = f"Validation metrics (main: {main_metric})" if bounded else "Validation errors"
        style_axis(axis, "value" if bounded else "pixels", title)
    if test_metrics is not None:
        figure.suptitle(f"held-out test {main_metric}: {test_metrics[main_metric]:.4f}", fontweight="bold")
    _save(figure, metrics_path)


def _save(figure: Figure, path: Path) -> None:
    atomic_write_bytes(path, figure_png(figure))
