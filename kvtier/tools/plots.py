"""Plots without a display: matplotlib on its Agg backend, imported on first use (the library never needs it), saving a
figure, and the bar chart of a table that the benchmark scripts write beside their JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def pyplot():
    """matplotlib.pyplot on the Agg backend (PNG files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: str | Path, labels: Sequence[str], values: Sequence[float | None], xlabel: str, title: str,
              log: bool = False) -> Path:
    """One horizontal bar per label (top to bottom in the given order; a None value gets no bar), written to `path`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.3 * len(labels)))
    measured = [(row, value) for row, value in enumerate(values) if value is not None]
    ax.barh([row for row, _ in measured], [value for _, value in measured], color="#4477aa")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path, dpi=110)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay `fig` out, write it to `path` as a PNG and free it."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
