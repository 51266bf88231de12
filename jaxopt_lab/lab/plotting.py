"""The house plotting style and the one loss-curve plotter every experiment uses.

Figures are drawn headless (Agg), so experiments run the same on a laptop, a CI box or a GPU node.
A diverged run is never drawn as an ordinary line: its curve stops at the last finite value and an
``x`` marks where it diverged, with the step in the legend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["new_figure", "plot_loss_curves"]

plt.rcParams.update({
    "figure.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "legend.fontsize": "small",
})


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 6.0, height: float = 4.0,
               **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` with the panel size given per panel (inches)."""
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs)


def plot_loss_curves(ax: Any, curves: Any, labels: Sequence[str], *, steps: Any = None,
                     diverged_at: Sequence[int | None] | None = None, clip: float | None = None,
                     logy: bool = False, **line_kwargs: Any) -> None:
    """Draws one loss curve per row of ``curves`` (shape ``(runs, steps)``).

    Args:
      ax: the matplotlib axes.
      curves: losses; NaN entries (steps after a run stopped) are not drawn.
      labels: one legend label per run.
      steps: x values, default ``0..T-1``.
      diverged_at: per run, the step at which it diverged or ``None``. A diverged run is drawn up to its
        last finite value, marked with an ``x`` there and labelled "diverged at step k".
      clip: upper y limit (the course notes clip its optimizer plots at 30); values above are drawn at the edge.
      logy: log-scaled y axis.
    """
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 2 or curves.shape[0] != len(labels):
        raise ValueError(f"plot_loss_curves: curves must have shape (len(labels)={len(labels)}, steps), "
                         f"got {curves.shape}")
    x = np.arange(curves.shape[1]) if steps is None else np.asarray(steps)
    diverged_at = [None] * len(labels) if diverged_at is None else list(diverged_at)
    for row, label, div in zip(curves, labels, diverged_at, strict=True):
        finite = np.isfinite(row)
        y = np.where(finite, row, np.nan)
        if clip is not None:
            y = np.minimum(y, clip)
        if div is None:
            ax.plot(x, y, label=label, **line_kwargs)
            continue
        (line,) = ax.plot(x, y, linestyle="--", label=f"{label} (diverged at step {div})", **line_kwargs)
        last = np.flatnonzero(finite)
        if last.size:
            ax.plot(x[last[-1]], y[last[-1]], marker="x", markersize=9, color=line.get_color(),
                    linestyle="none")
    if logy:
        ax.set_yscale("log")
    if clip is not None:
        ax.set_ylim(top=clip)
    ax.legend()
