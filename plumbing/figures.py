"""Figures and markdown tables for the reports (matplotlib, Agg backend: files only, no display).

Nothing in here is part of the method: evaluate.py computes the numbers, these draw them. Public so
the rounds pipeline and the study can draw their own.

- `pyplot`               matplotlib.pyplot, imported on first use with the Agg backend
- `plot_win_tie_lose`    stacked bars of win / tie / lose percentages (Tables 1-2)
- `plot_gap_histograms`  histograms of normalised reward gaps of several RMs (Fig. 5)
- `plot_curves`          one subplot per panel, one line per name (Fig. 1, Fig. 4, PPO curves)
- `markdown_table`       a markdown table, floats with 4 decimals
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch


def pyplot():
    """matplotlib.pyplot with the Agg backend (files only, no display), imported on first use."""
    import matplotlib

    # imported lazily: importing a module must not pick a backend for the caller
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_win_tie_lose(table: dict[str, dict[str, float]], path: str,
                      title: str = "win / tie / lose") -> None:
    """Horizontal stacked bars of win / tie / lose percentages, one row per comparison (e.g.
    "round 2 vs SFT"), `table[row]` as returned by `evaluate.win_tie_lose`."""
    plt = pyplot()
    rows = list(table)
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.4))
    left = np.zeros(len(rows))
    for key, colour in (("win", "#4c9a5f"), ("tie", "#b0b0b0"), ("lose", "#c8553d")):
        widths = np.array([table[r][f"{key}_pct"] or 0.0 for r in rows])  # None: no valid judgment
        ax.barh(rows, widths, left=left, color=colour, label=key)
        for y, (x0, w) in enumerate(zip(left, widths)):
            if w >= 6:
                ax.text(x0 + w / 2, y, f"{w:.0f}", ha="center", va="center", fontsize=9)
        left += widths
    ax.set_xlim(0, 100)
    ax.invert_yaxis()  # first row on top, as in a table
    ax.set_xlabel("% of valid judgments")
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gap_histograms(
        gaps_by_name: dict[str, Sequence[float] | torch.Tensor], path: str, bins: int = 20,
        title: str = "reward gaps |r(x,s_i) − r(x,s_j)|, min-max normalised per RM") -> None:
    """Fig. 5: histograms of normalised reward gaps (values in [0, 1]) of several RMs, bars side by
    side per bin, heights = fraction of that RM's gaps."""
    plt = pyplot()
    names = list(gaps_by_name)
    data = [np.asarray(gaps_by_name[n], dtype=float) for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.hist(data, bins=bins, range=(0.0, 1.0),
            weights=[np.full(len(d), 1 / max(len(d), 1)) for d in data], label=names)
    ax.set_xlabel("normalised reward gap")
    ax.set_ylabel("fraction of pairs")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(panels: dict[str, dict[str, tuple[Sequence, Sequence[float]]]], path: str,
                xlabel: str) -> None:
    """One subplot per panel title; in each, one line per name from (xs, ys). xs may be strings
    (checkpoint names, drawn as categories in the given order)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for name, (xs, ys) in lines.items():
            ax.plot(list(xs), list(ys), marker="o" if len(xs) <= 20 else None, markersize=3,
                    label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table: the header, then one line per row; a float cell has 4 decimals."""
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
