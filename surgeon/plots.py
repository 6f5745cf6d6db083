"""Pictures: the CCS heatmap of a ranking and the accuracy-vs-pruned-heads plot of a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from surgeon.rank import Ranking


def ccs_heatmap(ranking: Ranking, path: Path) -> None:
    """Layers x heads, colour = CCS, the concept label written in each cell."""
    layers = ranking.layers
    grid = np.full((len(layers), ranking.n_heads), np.nan)
    labels = [["" for _ in range(ranking.n_heads)] for _ in layers]
    for h in ranking.heads:
        row = layers.index(h.layer)
        grid[row, h.head] = h.ccs
        labels[row][h.head] = h.label
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * ranking.n_heads + 2), max(2.5, 0.7 * len(layers) + 1.5)))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=ranking.m, aspect="auto")
    for r in range(len(layers)):
        for c in range(ranking.n_heads):
            if not np.isnan(grid[r, c]):
                colour = "black" if grid[r, c] > ranking.m * 0.6 else "white"
                ax.text(
                    c, r, f"{labels[r][c][:10]}\n{int(grid[r, c])}", ha="center", va="center", fontsize=7, color=colour
                )
    ax.set_xticks(range(ranking.n_heads), [f"H{i}" for i in range(ranking.n_heads)])
    ax.set_yticks(range(len(layers)), [f"L{i}" for i in layers])
    ax.set_title(f"CCS per head — {ranking.model['name']} ({ranking.judge} judge, m={ranking.m})")
    fig.colorbar(image, ax=ax, label="CCS")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_plot(result: dict, path: Path) -> None:
    """Mean zero-shot accuracy (and MaxSkew when measured) against the number of pruned heads."""
    curves = result["curves"]
    skew_key = next((k for k in next(iter(curves.values()))[0] if k.startswith("max_skew@")), None)
    fig, axes = plt.subplots(1, 2 if skew_key else 1, figsize=(11 if skew_key else 6, 4), squeeze=False)
    for name, points in curves.items():
        ns = [p["n"] for p in points]
        axes[0, 0].plot(ns, [100 * p["mean_acc1"] for p in points], marker="o", label=name)
        if skew_key:
            axes[0, 1].plot(ns, [p[skew_key] for p in points], marker="o", label=name)
    axes[0, 0].set(xlabel="heads pruned", ylabel="mean zero-shot top-1 (%)", title="accuracy")
    if skew_key:
        axes[0, 1].set(xlabel="heads pruned", ylabel=skew_key, title="bias")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"pruning sweep — {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
