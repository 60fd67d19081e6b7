"""Figures without pyplot: a matplotlib Figure on its own Agg canvas (no display, no global
backend, safe in threads and child processes), written atomically as PNG. Every plot of lmforge
(training curves, attention maps, weight histograms, the logit lens, confusion matrices) is made
with these two functions.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.fsutil import atomic_write


def new_figure(width: float, height: float, dpi: int = 100):
    """A matplotlib Figure on an Agg canvas (no pyplot, no display, no global backend)."""
    # matplotlib is imported when a figure is drawn: importing lmforge.inspect stays light
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, out_png: str | os.PathLike) -> Path:
    """Write ``fig`` atomically (temporary file, fsync, rename); parent folders are created."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda p: fig.savefig(p, format="png"))


def plot_confusion_matrix(cm: list[list[int]], names: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """A confusion-matrix heatmap with counts in the cells (PNG)."""
    k = len(names)
    size = max(3.5, 0.6 * k + 2)
    fig = new_figure(size, size, dpi=110)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    top = max(max(r) for r in cm) if cm else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i][j]), ha="center", va="center",
                    color="white" if cm[i][j] > top / 2 else "black")
    ax.set_xticks(range(k), names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    return save_png(fig, path)
