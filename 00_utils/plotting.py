"""One consistent plotting style for every topic: heatmap, line, scatter, bar, multi-panel, save.

Uses matplotlib's non-interactive Agg backend unless a display is available, so demos run on
headless machines and in CI. Figures follow the project rule: a title that states the finding,
labelled axes with units, log scales where growth is the point.
"""

import os
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

plt.rcParams.update({
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "savefig.bbox": "tight",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "legend.framealpha": 0.8,
    "font.size": 9,
})


def panels(nrows: int = 1, ncols: int = 1, width: float = 5.0, height: float = 3.6, title: str | None = None,
           constrained: bool = False):
    """A figure of nrows x ncols panels, each about width x height inches; returns (fig, flat list of axes).

    constrained=True uses matplotlib's constrained layout, which keeps a suptitle, colour bars and axis
    labels from overlapping in dense grids (heatmaps with colour bars, many panels).
    """
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             layout="constrained" if constrained else None)
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    return fig, list(axes.flat)


def line(ax, x, series: dict, *, xlabel: str, ylabel: str, title: str = "", logx=False, logy=False,
         markers=True, styles: dict | None = None):
    """Draw one line per entry of `series` ({label: y values}); `styles` may give per-label kwargs."""
    for label, y in series.items():
        kwargs = {"marker": "o", "markersize": 3} if markers else {}
        kwargs.update((styles or {}).get(label, {}))
        ax.plot(x, y, label=label, **kwargs)
    _decorate(ax, xlabel, ylabel, title, logx, logy)
    if len(series) > 1 or any(series):
        ax.legend()
    return ax


def scatter(ax, x, y, *, xlabel: str, ylabel: str, title: str = "", labels=None, logx=False, logy=False, **kwargs):
    """Scatter plot; `labels` (a list of strings) annotates each point."""
    ax.scatter(x, y, **kwargs)
    if labels is not None:
        for xi, yi, text in zip(x, y, labels):
            ax.annotate(str(text), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
    _decorate(ax, xlabel, ylabel, title, logx, logy)
    return ax


def bar(ax, labels, values, *, ylabel: str, title: str = "", logy=False, annotate_fmt: str | None = "{:.3g}",
        color=None, rotate: int = 0):
    """Bar chart with each bar's value written above it (annotate_fmt=None to skip)."""
    positions = np.arange(len(labels))
    bars = ax.bar(positions, values, color=color)
    ax.set_xticks(positions, labels, rotation=rotate, ha="right" if rotate else "center")
    if annotate_fmt:
        for rect, value in zip(bars, values):
            ax.annotate(annotate_fmt.format(value), (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                        ha="center", va="bottom", fontsize=7, textcoords="offset points", xytext=(0, 2))
    _decorate(ax, "", ylabel, title, False, logy)
    ax.grid(axis="x", visible=False)
    return ax


def heatmap(ax, matrix, *, xlabel: str, ylabel: str, title: str = "", cmap="viridis", colorbar_label: str = "",
            xticklabels=None, yticklabels=None, vmin=None, vmax=None):
    """Image of a 2-D array with a labelled colour bar; tick labels optional (keep them few)."""
    matrix = np.asarray(matrix)
    image = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    colorbar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if colorbar_label:
        colorbar.set_label(colorbar_label)
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), xticklabels, rotation=90, fontsize=7)
    if yticklabels is not None:
        ax.set_yticks(range(len(yticklabels)), yticklabels, fontsize=7)
    _decorate(ax, xlabel, ylabel, title, False, False)
    ax.grid(False)
    return ax


def save_figure(fig, path: str | Path, show: bool = False) -> Path:
    """Save as PNG (creating the folder), show it when asked, close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    if show:
        plt.show()
    plt.close(fig)
    return path


def _decorate(ax, xlabel, ylabel, title, logx, logy):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
