"""Plot primitives every task's diagnostics draw with: a styled axis, a PNG of a figure,
a confusion matrix and a bar plot, at 200 dpi."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from numpy.typing import ArrayLike

PLOT_DPI = 200


def style_axis(axis: Axes, ylabel: str, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set(xlabel="epoch", ylabel=ylabel, title=title)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)


def figure_png(figure: Figure, tight: bool = True) -> bytes:
    """The figure as PNG bytes at PLOT_DPI (cropped to what it draws unless ``tight`` is False)."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI, bbox_inches="tight" if tight else None)
    return buffer.getvalue()


def subplots(*grid: int, figsize: tuple[float, float], **options: Any) -> tuple[Figure, Any]:
    """A new figure and its axes, as pyplot's ``subplots`` makes them, drawn by Agg without pyplot (whose
    import and figure registry a run does not need, and which wants no display)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*grid, **options)


def confusion_matrix_plot(confusion: ArrayLike, names: Sequence[str]) -> bytes:
    """Counts and row-normalised shares side by side; rows are true classes."""
    import numpy as np

    counts = np.asarray(confusion, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.45 * len(names) + 2)
    figure, axes = subplots(1, 2, figsize=(2 * side + 1, side))
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
    figure, axis = subplots(figsize=(max(5, 0.5 * len(shown) + 2), 4))
    axis.bar([name for name, _ in shown], [value for _, value in shown], color="tab:blue")
    axis.set(ylabel=ylabel, title=title)
    if ylim is not None:
        axis.set_ylim(*ylim)
    axis.tick_params(axis="x", rotation=45)
    axis.grid(alpha=0.3, axis="y")
    return figure_png(figure)
