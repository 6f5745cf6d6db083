"""Plots: whole-number head counts, metric names on the axes, a discrete CCS scale, the random ordering's
spread over seeds as a band, and the formats --plot-format offers."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from surgeon.errors import InvalidInput
from surgeon.plots import ccs_heatmap, ccs_heatmap_figure, metric_name, sweep_figure, sweep_plot
from surgeon.sweep import run_sweep
from tests.test_prune_export import setup, synthetic_suite  # noqa: F401  (fixture)

MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}


def test_sweep_over_seeds_has_a_band_and_whole_number_axes(setup, tmp_path):  # noqa: F811
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
    plt.close(fig)
    for fmt in MAGIC:
        sweep_plot(result, tmp_path / f"sweep.{fmt}")
        assert (tmp_path / f"sweep.{fmt}").read_bytes().startswith(MAGIC[fmt])
    with pytest.raises(InvalidInput, match="at least 1"):
        run_sweep(loaded, ranking, synthetic_suite(), counts=[0], seeds=0)


def test_heatmap_has_one_colour_per_score(setup, tmp_path):  # noqa: F811
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
