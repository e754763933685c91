"""The run's plots at 200 dpi: training curves from the history (loss.png, metrics.png), the
confusion matrix, and the helpers each task's own diagnostics plots draw with."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from visionlora.artifacts import atomic_write_bytes

PLOT_DPI = 200


def save_training_plots(history: list[dict[str, Any]], loss_path: Path, metrics_path: Path, main_metric: str,
                        unbounded: Sequence[str] = (), test_metrics: dict[str, Any] | None = None) -> None:
    """Train and validation loss per epoch, and every scalar validation metric per epoch.

    Metrics in [0, 1] share one axis fixed to [0, 1]; ``unbounded`` ones (pixel errors)
    get a panel of their own. Epochs are whole numbers and legends sit beside the curves.
    With ``test_metrics``, the held-out test result heads the figure and marks the main curve.
    """
    plt = pyplot()
    epochs = [row["epoch"] for row in history]
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        axis.plot(epochs, [row.get(key) for row in history], marker="o", label=label)
    style_axis(axis, "loss", "Loss")
    _save(figure, loss_path)

    scalars = [k[4:] for k, v in history[-1].items()
               if k.startswith("val_") and k != "val_loss" and isinstance(v, (int, float))]
    groups = [[k for k in scalars if k not in unbounded], [k for k in scalars if k in unbounded]]
    groups = [group for group in groups if group] or [[]]
    figure, axes = plt.subplots(len(groups), 1, figsize=(7, 3.6 * len(groups)), squeeze=False)
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


def style_axis(axis, ylabel: str, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set(xlabel="epoch", ylabel=ylabel, title=title)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)


def _save(figure, path: Path) -> None:
    atomic_write_bytes(path, figure_png(figure))


def figure_png(figure) -> bytes:
    """The figure as PNG bytes at PLOT_DPI, closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_plot(confusion, names: Sequence[str]) -> bytes:
    """Counts and row-normalised shares side by side; rows are true classes."""
    import numpy as np

    counts = np.asarray(confusion, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.45 * len(names) + 2)
    figure, axes = pyplot().subplots(1, 2, figsize=(2 * side + 1, side))
    for axis, values, title, fmt in ((axes[0], counts, "Confusion matrix (counts)", "{:.0f}"),
                                     (axes[1], shares, "Confusion matrix (share of each true class)", "{:.2f}")):
        image = axis.imshow(values, cmap="Blues", vmin=0, vmax=max(values.max(), 1e-9))
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
        if len(names) <= 30:
            for (row, column), value in np.ndenumerate(values):
                axis.text(column, row, fmt.format(value), ha="center", va="center", fontsize=7,
                          color="white" if value > values.max() / 2 else "black")
        axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        axis.set_yticks(range(len(names)), names, fontsize=7)
        axis.set(xlabel="predicted", ylabel="true", title=title)
    return figure_png(figure)


def bar_plot(names: Sequence[str], values: Sequence[float | None], ylabel: str, title: str,
             ylim: tuple[float, float] | None = None) -> bytes:
    """One bar per name with a value (names whose value is None are left out)."""
    shown = [(name, value) for name, value in zip(names, values) if value is not None]
    figure, axis = pyplot().subplots(figsize=(max(5, 0.5 * len(shown) + 2), 4))
    axis.bar([name for name, _ in shown], [value for _, value in shown], color="tab:blue")
    axis.set(ylabel=ylabel, title=title)
    if ylim is not None:
        axis.set_ylim(*ylim)
    axis.tick_params(axis="x", rotation=45)
    axis.grid(alpha=0.3, axis="y")
    return figure_png(figure)
