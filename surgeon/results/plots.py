"""Pictures: the CCS heatmap of a ranking and the accuracy-vs-pruned-heads plot of a sweep.

Figures are made with matplotlib's object API (`Figure`), never pyplot: pyplot's global figure registry is
not thread-safe, and the gRPC service draws in several jobs at once."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import matplotlib
import numpy as np
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from surgeon.results.records import ValidationSummary


class ScoredHead(Protocol):
    """One cell of the heatmap (rank.HeadRank has these)."""

    @property
    def layer(self) -> int: ...
    @property
    def head(self) -> int: ...
    @property
    def label(self) -> str: ...
    @property
    def ccs(self) -> int: ...


class CcsGrid(Protocol):
    """What the heatmap reads of a ranking (rank.Ranking has these): structural, so that rank, which draws
    the heatmap when it writes its files, is the only one of the two that imports the other."""

    @property
    def model(self) -> dict: ...
    @property
    def layers(self) -> list[int]: ...
    @property
    def n_heads(self) -> int: ...
    @property
    def m(self) -> int: ...
    @property
    def judge(self) -> str: ...
    @property
    def heads(self) -> Sequence[ScoredHead]: ...


PLOT_FORMATS = ("png", "pdf", "svg")  # matplotlib picks the format from the file's suffix


def metric_name(key: str) -> str:
    """What an axis says for a summary key: the metric's name, not the raw key."""
    if key == "mean_acc1":
        return "mean zero-shot top-1 (%)"
    if key.startswith("max_skew@"):
        return f"MaxSkew@{key.split('@', 1)[1]}"
    if key.startswith("min_skew@"):
        return f"MinSkew@{key.split('@', 1)[1]}"
    if "_retrieval_recall@" in key:  # surgeon.results.retrieval's keys: image_ (text -> image), video_, text_ retrieval
        direction = {"image": "text -> image", "video": "text -> video", "text": "image -> text"}[key.split("_")[0]]
        return f"{direction} R@{key.split('@', 1)[1]} (%)"
    return {"ndkl": "NDKL", "mean_recall1": "mean R@1 (%)"}.get(key, key)


def _save(fig, path: Path) -> None:
    if fig.get_layout_engine() is None:  # figures with a legend outside their axes lay themselves out
        fig.tight_layout()
    fig.savefig(path, dpi=120)


#: characters per line of a head's label inside its heatmap cell: labels wrap, never cut
CELL_CHARS = 11


def ccs_heatmap(ranking: CcsGrid, path: Path) -> None:
    _save(ccs_heatmap_figure(ranking), path)


def ccs_heatmap_figure(ranking: CcsGrid):
    """Layers x heads, colour = CCS on a discrete scale (one colour per score 0..m), label in each cell."""
    layers = ranking.layers
    grid = np.full((len(layers), ranking.n_heads), np.nan)
    labels = [["" for _ in range(ranking.n_heads)] for _ in layers]
    for h in ranking.heads:
        row = layers.index(h.layer)
        grid[row, h.head] = h.ccs
        labels[row][h.head] = "\n".join(textwrap.wrap(h.label, CELL_CHARS, break_on_hyphens=False)) or h.label
    lines = 1 + max((cell.count("\n") + 1 for row in labels for cell in row), default=1)  # label lines + CCS
    fig = Figure(figsize=(max(6, 0.9 * ranking.n_heads + 2), max(2.5, 0.25 * lines * len(layers) + 1.5)))
    ax = fig.subplots()
    scores = ranking.m + 1
    norm = BoundaryNorm(np.arange(-0.5, scores), scores)
    image = ax.imshow(grid, cmap=matplotlib.colormaps["viridis"].resampled(scores), norm=norm, aspect="auto")
    for r in range(len(layers)):
        for c in range(ranking.n_heads):
            if not np.isnan(grid[r, c]):
                colour = "black" if grid[r, c] > ranking.m * 0.6 else "white"
                ax.text(c, r, f"{labels[r][c]}\n{int(grid[r, c])}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(ranking.n_heads), [f"H{i}" for i in range(ranking.n_heads)])
    ax.set_yticks(range(len(layers)), [f"L{i}" for i in layers])
    ax.set(xlabel="head", ylabel="layer")
    ax.set_title(f"CCS per head — {ranking.model['name']} ({ranking.judge} judge, m={ranking.m})")
    fig.colorbar(image, ax=ax, label=f"CCS (of {ranking.m} texts, consistent with the label)", ticks=range(scores))
    return fig


def sweep_plot(result: dict, path: Path) -> None:
    _save(sweep_figure(result), path)


def sweep_figure(result: dict):
    """Mean zero-shot accuracy (and MaxSkew when measured, with what a random ranking scores) against the
    number of pruned heads; an ordering averaged over seeds is drawn with its min-max band."""
    curves = result["curves"]
    skew_key = ValidationSummary.from_dict(next(iter(curves.values()))[0]).skew_key
    metrics = [("mean_acc1", 100.0, "accuracy")] + ([(skew_key, 1.0, "bias")] if skew_key else [])
    fig = Figure(figsize=(5.5 * len(metrics), 4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, (key, scale, title) in zip(axes[0], metrics, strict=True):
        for name, points in curves.items():
            ns = [p["n"] for p in points]
            (line,) = ax.plot(ns, [scale * p[key] for p in points], marker="o", label=name)
            if "spread" in points[0]:
                low, high = zip(*(p["spread"][key] for p in points), strict=True)
                ax.fill_between(ns, scale * np.array(low), scale * np.array(high), color=line.get_color(), alpha=0.2)
        floor = result.get("chance", {}).get(key)
        if floor is not None:  # a model blind to the groups scores about this, not 0 (results.bias.chance_skews)
            ax.axhline(floor, color="gray", linestyle="--", label="a ranking that ignores the images")
        ax.set(xlabel="heads pruned", ylabel=metric_name(key), title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"pruning sweep — {result['model']}")
    return fig


def study_plot(table: dict, path: Path) -> None:
    _save(study_figure(table), path)


def study_figure(table: dict):
    """A study's table as bars: per kind (accuracy, bias), one group per data set, one bar per row (model,
    policy, mode); a seeded row's bar carries its sample std as an error bar."""
    kinds = [k for k in ("accuracy", "retrieval", "bias") if any(c["kind"] == k for c in table["columns"])]
    # one legend for all panels, below them: inside an axes it covered the bars
    fig = Figure(figsize=(max(6, 1.2 * len(table["rows"])) * len(kinds), 4.5 + 0.2 * len(table["rows"])))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        columns = [c for c in table["columns"] if c["kind"] == kind]
        scale = 1.0 if kind == "bias" else 100.0
        width = 0.8 / len(table["rows"])
        for i, row in enumerate(table["rows"]):
            cells = [row["cells"][c["name"]] for c in columns]
            ax.bar(
                np.arange(len(columns)) + (i - (len(table["rows"]) - 1) / 2) * width,
                [scale * c["value"] for c in cells],
                width,
                yerr=[scale * (c["std"] or 0.0) for c in cells],
                capsize=2,
                label=f"{row['model']} (unpruned)"
                if row["policy"] == "none"
                else " / ".join((row["model"], row["policy"], row["mode"])),
            )
        ax.set_xticks(range(len(columns)), [c["name"] for c in columns])
        ylabel = metric_name("mean_acc1" if kind == "accuracy" else columns[0]["metric"])
        ax.set(ylabel=ylabel, title=kind)
        ax.grid(alpha=0.3, axis="y")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", fontsize=7, ncols=min(3, len(names)))
    fig.suptitle(f"study — {table['name']}")
    return fig
