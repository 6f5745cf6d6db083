"""Accuracy and bias against the number of pruned heads, for high-CCS, low-CCS and random orderings
(the paper's figure). Uses the evaluator's layer cache: only layers from the first pruned one are re-run."""

from __future__ import annotations

import random
import statistics

from surgeon.core.errors import InvalidInput
from surgeon.core.progress import progress_bar
from surgeon.model.heads import HeadRef
from surgeon.model.load import LoadedModel
from surgeon.ranking.rank import Ranking
from surgeon.results.records import bias_floor
from surgeon.validation.validate import Evaluator, ValidationSuite


def orderings(ranking: Ranking, seed: int = 0) -> dict[str, list[HeadRef]]:
    high = [HeadRef(h.layer, h.head) for h in ranking.sorted_heads()]
    low = [HeadRef(h.layer, h.head) for h in sorted(ranking.heads, key=lambda h: (h.ccs, h.variance, h.layer, h.head))]
    return {"high-CCS first": high, "low-CCS first": low, f"random (seed {seed})": random_order(ranking, seed)}


def random_order(ranking: Ranking, seed: int) -> list[HeadRef]:
    shuffled = [HeadRef(h.layer, h.head) for h in ranking.sorted_heads()]
    random.Random(seed).shuffle(shuffled)
    return shuffled


def seed_mean(per_seed: list[list[dict]]) -> list[dict]:
    """Per count: each metric's mean over the seeds, and its [min, max] under "spread" (the plot's band)."""
    points = []
    for at_count in zip(*per_seed, strict=True):
        keys = [k for k, v in at_count[0].items() if k != "n" and isinstance(v, int | float)]
        values = {k: [p[k] for p in at_count] for k in keys}
        point = {"n": at_count[0]["n"], **{k: statistics.fmean(v) for k, v in values.items()}}
        point["spread"] = {k: [min(v), max(v)] for k, v in values.items()}
        points.append(point)
    return points


def default_counts(n_heads: int, points: int = 8) -> list[int]:
    step = max(1, n_heads // points)
    return sorted({0, *range(step, n_heads + 1, step)})


def run_sweep(
    loaded: LoadedModel,
    ranking: Ranking,
    suite: ValidationSuite,
    counts: list[int] | None = None,
    seed: int = 0,
    cache_layers: bool = True,
    quiet: bool = False,
    seeds: int = 1,
) -> dict:
    """{"counts": [...], "curves": {ordering: [summary per count]}} (zero ablation, measured). With `seeds` > 1
    the random ordering is drawn with seeds seed..seed+seeds-1: its curve is their mean, each point with the
    [min, max] spread, and "random_seeds" keeps every seed's curve."""
    ranking.check_model(loaded)
    counts = counts or default_counts(len(ranking.heads))
    if any(not 0 <= c <= len(ranking.heads) for c in counts):
        raise InvalidInput(f"sweep counts must be between 0 and {len(ranking.heads)}")
    if seeds < 1:
        raise InvalidInput(f"--seeds must be at least 1, got {seeds}")
    suite.require_accuracy("a sweep")
    evaluator = Evaluator(loaded, suite, first_layer=min(ranking.layers) if cache_layers else 0)
    orders = orderings(ranking, seed)
    orders.update({f"random (seed {s})": random_order(ranking, s) for s in range(seed + 1, seed + seeds)})
    curves: dict[str, list[dict]] = {}
    chance: dict = {}  # the bias figures of a ranking that ignores the images: the same at every point
    with progress_bar("sweep", len(orders) * len(counts), quiet) as advance:
        for name, order in orders.items():
            curves[name] = []
            for count in counts:
                report = evaluator.evaluate(order[:count], intervals=False)
                chance = chance or bias_floor(report)
                curves[name].append({"n": count, **report["summary"]})
                advance(1)
    result = {"model": loaded.identity, "counts": counts, "curves": curves}
    if chance:
        result["chance"] = chance
    if seeds > 1:
        per_seed = {s: curves.pop(f"random (seed {s})") for s in range(seed, seed + seeds)}
        curves[f"random (mean of {seeds} seeds)"] = seed_mean(list(per_seed.values()))
        result["random_seeds"] = {str(s): points for s, points in per_seed.items()}
    return result
