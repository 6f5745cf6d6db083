"""Accuracy and bias against the number of pruned heads, for high-CCS, low-CCS and random orderings
(the paper's figure). Uses the evaluator's layer cache: only layers from the first pruned one are re-run."""

from __future__ import annotations

import random

from surgeon.errors import InvalidInput
from surgeon.load import LoadedModel
from surgeon.progress import progress_bar
from surgeon.rank import Ranking
from surgeon.surgery import HeadRef
from surgeon.validate import Evaluator, ValidationSuite


def orderings(ranking: Ranking, seed: int = 0) -> dict[str, list[HeadRef]]:
    high = [HeadRef(h.layer, h.head) for h in ranking.sorted_heads()]
    low = [HeadRef(h.layer, h.head) for h in sorted(ranking.heads, key=lambda h: (h.ccs, h.variance, h.layer, h.head))]
    shuffled = list(high)
    random.Random(seed).shuffle(shuffled)
    return {"high-CCS first": high, "low-CCS first": low, f"random (seed {seed})": shuffled}


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
) -> dict:
    """{"counts": [...], "curves": {ordering: [summary per count]}} (zero ablation, measured)."""
    ranking.check_model(loaded)
    counts = counts or default_counts(len(ranking.heads))
    if any(not 0 <= c <= len(ranking.heads) for c in counts):
        raise InvalidInput(f"sweep counts must be between 0 and {len(ranking.heads)}")
    suite.require_accuracy("a sweep")
    evaluator = Evaluator(loaded, suite, first_layer=min(ranking.layers) if cache_layers else 0)
    curves: dict[str, list[dict]] = {}
    orders = orderings(ranking, seed)
    with progress_bar("sweep", len(orders) * len(counts), quiet) as advance:
        for name, order in orders.items():
            curves[name] = []
            for count in counts:
                curves[name].append({"n": count, **evaluator.evaluate(order[:count])["summary"]})
                advance(1)
    return {"model": loaded.identity, "counts": counts, "curves": curves}
