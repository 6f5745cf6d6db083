"""Plots: whole-number head counts, metric names on the axes, a discrete CCS scale, the random ordering's
spread over seeds as a band, and the formats --plot-format offers."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from surgeon.core.errors import InvalidInput
from surgeon.results.plots import ccs_heatmap, ccs_heatmap_figure, metric_name, study_figure, sweep_figure, sweep_plot
from surgeon.validation.sweep import run_sweep
from tests.conftest import synthetic_suite

MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}


def test_sweep_over_seeds_has_a_band_and_whole_number_axes(setup, tmp_path):
    loaded, ranking = setup
    result = run_sweep(loaded, ranking, synthetic_suite(), counts=[0, 1, 3], seeds=3, quiet=True)
    assert set(result["curves"]) == {"high-CCS first", "low-CCS first", "random (mean of 3 seeds)"}
    assert set(result["random_seeds"]) == {"0", "1", "2"}
    for i, point in enumerate(result["curves"]["random (mean of 3 seeds)"]):
        per_seed = [curve[i]["mean_acc1"] for curve in result["random_seeds"].values()]
        low, high = point["spread"]["mean_acc1"]
        assert (low, high) == (min(per_seed), max(per_seed)) and low <= point["mean_acc1"] <= high
    assert (
        result["random_seeds"]["0"]
        == run_sweep(loaded, ranking, synthetic_suite(), [0, 1, 3])["curves"]["random (seed 0)"]
    )  # seed 0 of the mean is the single-seed sweep's curve
    fig = sweep_figure(result)
    accuracy, bias = fig.axes
    assert accuracy.get_ylabel() == "mean zero-shot top-1 (%)" and bias.get_ylabel() == "MaxSkew@10"
    ticks = [t for t in accuracy.get_xticks() if accuracy.get_xlim()[0] <= t <= accuracy.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert len(accuracy.collections) == 1 and len(bias.collections) == 1  # one band: the random ordering's
    floor = [line for line in bias.get_lines() if line.get_label() == "a ranking that ignores the images"]
    assert len(floor) == 1 and floor[0].get_ydata()[0] == pytest.approx(result["chance"]["max_skew@10"])
    assert not [line for line in accuracy.get_lines() if line.get_label().startswith("a ranking")]
    plt.close(fig)
    for fmt in MAGIC:
        sweep_plot(result, tmp_path / f"sweep.{fmt}")
        assert (tmp_path / f"sweep.{fmt}").read_bytes().startswith(MAGIC[fmt])
    with pytest.raises(InvalidInput, match="at least 1"):
        run_sweep(loaded, ranking, synthetic_suite(), counts=[0], seeds=0)


def test_heatmap_has_one_colour_per_score(setup, tmp_path):
    _, ranking = setup
    fig = ccs_heatmap_figure(ranking)
    heat, bar = fig.axes
    assert (heat.get_xlabel(), heat.get_ylabel()) == ("head", "layer")
    image = heat.images[0]
    assert image.cmap.N == ranking.m + 1  # discrete: CCS 0..m, one colour each
    assert list(bar.get_yticks()) == list(range(ranking.m + 1))
    plt.close(fig)
    ccs_heatmap(ranking, tmp_path / "ccs.svg")
    assert (tmp_path / "ccs.svg").read_bytes().startswith(MAGIC["svg"])


def test_metric_names():
    assert metric_name("max_skew@10") == "MaxSkew@10" and metric_name("min_skew@5") == "MinSkew@5"
    assert metric_name("ndkl") == "NDKL" and metric_name("mean_acc1") == "mean zero-shot top-1 (%)"


def _drawn(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_heatmap_labels_are_whole_and_stay_in_their_cells():
    from types import SimpleNamespace

    labels = ["photography style", "geographic location", "colors", "counting and numbers", "animals", "x"]
    heads = [
        SimpleNamespace(layer=layer, head=h, label=labels[(layer + h) % len(labels)], ccs=(layer * 3 + h) % 6)
        for layer in (8, 9, 10, 11)
        for h in range(6)
    ]
    ranking = SimpleNamespace(model={"name": "ViT-B-32"}, layers=[8, 9, 10, 11], n_heads=6, m=5, judge="lexicon",
                              heads=heads)  # fmt: skip
    fig = ccs_heatmap_figure(ranking)
    fig.tight_layout()
    renderer = _drawn(fig)
    heat = fig.axes[0]
    cell = heat.get_window_extent(renderer)
    width, height = cell.width / ranking.n_heads, cell.height / len(ranking.layers)
    texts = [t for t in heat.texts if t.get_text()]
    assert len(texts) == len(heads)
    for text, head in zip(texts, heads, strict=True):
        shown = text.get_text().rsplit("\n", 1)[0]
        assert shown.replace("\n", " ") == head.label  # the whole label, wrapped, never cut
        box = text.get_window_extent(renderer)
        assert box.width <= width and box.height <= height, (text.get_text(), box.width, width, box.height, height)
    plt.close(fig)


def test_study_legend_covers_no_bar():
    rows = [
        {"model": "ViT-B-32", "policy": "none", "mode": "zero"},
        *[{"model": "ViT-B-32", "policy": p, "mode": "zero"} for p in ("high", "low", "random", "debias", "top-k")],
    ]
    columns = [
        {"name": "imagenette/val", "kind": "accuracy", "metric": "mean_acc1"},
        {"name": "bias.csv", "kind": "bias", "metric": "max_skew@10"},
    ]
    for i, row in enumerate(rows):  # bars that fill their panels: a legend inside an axes must cover some
        row["cells"] = {
            "imagenette/val": {"value": 0.9 - 0.01 * i, "std": None},
            "bias.csv": {"value": 1.0, "std": None},
        }
    fig = study_figure({"name": "crowded", "rows": rows, "columns": columns})
    renderer = _drawn(fig)
    legends = [*fig.legends, *(a.get_legend() for a in fig.axes if a.get_legend() is not None)]
    bars = [p.get_window_extent(renderer) for ax in fig.axes for p in ax.patches]
    assert legends and len(bars) == 2 * len(rows)
    for legend in (shown.get_window_extent(renderer) for shown in legends):
        assert not any(legend.overlaps(bar) for bar in bars)
        assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)
    plt.close(fig)
