"""The debias policy's measurements around `prune`: what it searches and stops on (two splits of the
validation suite, through evaluators that keep the layer prefix), and how its result compares with chance on
the third split, the one it never touched: random head sets of the same size, measured on the same data."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import numpy as np

from surgeon.model.heads import HeadRef
from surgeon.model.load import LoadedModel
from surgeon.results.bias import BOOTSTRAP_RESAMPLES, below_chance, chance_skews, figure_ranges, interval
from surgeon.selection.policies import BiasMeasure, DebiasData
from surgeon.validation.validate import Evaluator, SearchSplits

#: random head sets the policy's result is compared with (all the others when there are fewer: 31 single heads)
NULL_SETS = 50


def bias_measure(evaluator: Evaluator) -> BiasMeasure:
    """The bias set of an evaluator's suite as the policy measures it."""
    bias = evaluator.suite.bias
    assert bias is not None  # split_for_search refuses suites without one
    return BiasMeasure(
        evaluator.suite.description,
        lambda heads: evaluator.bias_similarity(heads),
        bias.groups,
        len(bias.group_names),
        bias.units,
        bias.k,
        bias.desired,
        bias.protocol,
        bias.probes,
    )


def search_data(
    loaded: LoadedModel, splits: SearchSplits, first_layer: int, search_images: int, advance: Callable[[int], None]
) -> DebiasData:
    """Evaluators on the search split (at most `search_images` images per task) and the stop split, each
    keeping the residual stream before `first_layer` so a head set re-runs only the later blocks."""
    search = Evaluator(loaded, splits.search.subset(search_images), first_layer, deep=True)
    stop = Evaluator(loaded, splits.stop, first_layer, deep=True)
    return DebiasData(bias_measure(search), bias_measure(stop), search.mean_accuracy, search.pin, advance)


def null_sets(
    pool: list[HeadRef], heads: list[HeadRef], n_sets: int, seed: int
) -> tuple[list[tuple[HeadRef, ...]], bool]:
    """(head sets of the size of `heads` from `pool`, other than `heads` itself; whether they are all of them):
    every such set when there are at most `n_sets`, else `n_sets` distinct ones drawn with `seed`."""
    own, size = tuple(sorted(heads)), len(heads)
    if math.comb(len(pool), size) - 1 <= n_sets:
        return [s for s in itertools.combinations(sorted(pool), size) if s != own], True
    rng, drawn = random.Random(seed), set[tuple[HeadRef, ...]]()
    while len(drawn) < n_sets:
        candidate = tuple(sorted(rng.sample(pool, size)))
        if candidate != own:
            drawn.add(candidate)
    return sorted(drawn), False


def against_chance(
    evaluator: Evaluator,
    heads: list[HeadRef],
    pool: list[HeadRef],
    n_sets: int = NULL_SETS,
    seed: int = 0,
    advance: Callable[[int], None] = lambda n: None,
) -> dict:
    """MaxSkew@k of the report split with `heads` removed, next to the other head sets of the same size from
    `pool` (all, or `n_sets` random ones) removed on the same images (zero ablation, like the search): their
    mean, sd and range, the share of them the policy beats (percentile) and the permutation p-value
    (1 + sets at least as good) / (1 + sets), exact when every set was measured; with bootstrap intervals
    (units) of the base, the policy's figure and its relative change (paired)."""
    measure = bias_measure(evaluator)
    key = f"max_skew@{measure.k}"
    sets, exhaustive = null_sets(pool, heads, n_sets, seed)
    weights = measure.resamples(BOOTSTRAP_RESAMPLES, 0)  # validation's resamples: the same intervals
    base_score, policy_score = measure.score([], weights), measure.score(heads, weights)
    base, policy = base_score.value, policy_score.value
    base_draws, policy_draws = base_score.draws, policy_score.draws
    random_values = []
    for head_set in sets:
        random_values.append(measure.value(list(head_set)))
        advance(1)
    values = np.asarray(random_values)
    bias = evaluator.suite.bias
    assert bias is not None  # bias_measure checked it
    rules = (measure.n_groups, measure.k, measure.desired, measure.protocol, len(bias.queries), None, bias.probes)
    chance = chance_skews(bias.groups, *rules)[key]
    bounds = figure_ranges(bias.groups, *rules)[key]  # the figure's intervals stay within its range
    return {
        "metric": key,
        "measured_on": evaluator.suite.description,
        "size": len(heads),
        "sets": len(sets),
        "exhaustive": exhaustive,
        "base": round(base, 6),
        "base_ci95": interval(base_draws, base, bounds=bounds),
        "policy": round(policy, 6),
        "policy_ci95": interval(policy_draws, policy, bounds=bounds),
        "change": round(policy / base - 1, 6) if base > 0 else None,  # relative to no bias: undefined
        "change_ci95": interval(policy_draws[base_draws > 0] / base_draws[base_draws > 0] - 1, policy / base - 1)
        if base > 0
        else None,
        "chance": chance,  # what a ranking ignoring the images scores in expectation (results.bias.chance_skews)
        # the share of the excess over chance the pruning took away: nothing to share where there is no excess
        "excess_removed": round((base - policy) / (base - chance), 6) if base > chance else None,
        "random": {
            "mean": round(float(values.mean()), 6),
            "sd": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 6),
            "min": round(float(values.min()), 6),
            "max": round(float(values.max()), 6),
            "mean_change": round(float(values.mean()) / base - 1, 6) if base > 0 else None,
        },
        "percentile": round(float(np.mean(values > policy) + 0.5 * np.mean(values == policy)) * 100, 2),
        "p_value": round(float((1 + np.sum(values <= policy)) / (1 + len(values))), 4),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "level": 0.95},
    }


def chance_lines(null: dict) -> list[str]:
    """The comparison with chance as markdown, for report.md and the model card."""
    rand = null["random"]
    drawn = f"all {null['sets']} other" if null["exhaustive"] else f"{null['sets']} random other"
    return [
        f"Measured on {null['measured_on']}, which selection never touched; zero ablation, 95% bootstrap intervals.",
        "",
        f"| {null['metric']} | value | 95% interval |",
        "|---|---|---|",
        f"| before | {null['base']:.4f} | {_pair(null['base_ci95'])} |",
        f"| debias ({null['size']} head(s)) | {null['policy']:.4f} | {_pair(null['policy_ci95'])} |",
        f"| change | {_change(null['change'])} | {_pair(null['change_ci95'], percent=True)} |",
        f"| {drawn} sets of {null['size']} head(s) | mean {rand['mean']:.4f} ({_change(rand['mean_change'])}), "
        f"sd {rand['sd']:.4f} | range {rand['min']:.4f} to {rand['max']:.4f} |",
        "",
        f"The policy's set beats {null['percentile']:.1f}% of them (permutation p = {null['p_value']:.3f}).",
        *_floor_lines(null),
    ]


def _below(null: dict) -> dict[str, float]:
    """The unpruned and the pruned figure where they do not score above chance (results.bias.below_chance)."""
    return below_chance(null["chance"], {"the unpruned": null["base"], "the pruned": null["policy"]})


def _floor_lines(null: dict) -> list[str]:
    """Chance, called the figure's floor only where the unpruned and the pruned model both score above it."""
    if null.get("chance") is None:  # results written before chance was recorded
        return []
    removed = null.get("excess_removed")
    share = "" if removed is None else f"; the policy removed {removed:.0%} of the excess over it"
    below = _below(null)
    who = next(iter(below), None)
    reading = (
        "its floor, not 0"
        if who is None
        else f"not less than {who} {below[who]:.4f}" + (": no excess over it" if who == "the unpruned" else "")
    )
    return [
        "",
        f"A ranking that ignores the images scores {null['metric']} {null['chance']:.4f} on this set in expectation "
        f"({reading}){share}.",
    ]


def chance_line(null: dict) -> str:
    """The same in one line, for the terminal."""
    rand = null["random"]
    return (
        f"held-out {null['metric']} {null['base']:.3f} -> {null['policy']:.3f} ({_change(null['change'])}, 95% CI "
        f"{_pair(null['change_ci95'], percent=True)}); {'all' if null['exhaustive'] else 'random'} {null['sets']} "
        f"other {null['size']}-head sets: mean "
        f"{_change(rand['mean_change'])}, sd {rand['sd']:.3f}; the policy beats {null['percentile']:.1f}% "
        f"(p = {null['p_value']:.3f})"
        + (f"; {_chance_name(null)} {null['chance']:.3f}" if null.get("chance") is not None else "")
    )


def _chance_name(null: dict) -> str:
    """A floor only under figures above it (a ranking by content can be more balanced than chance)."""
    who = next(iter(_below(null)), None)
    return "floor (random ranking)" if who is None else f"random ranking (not below {who})"


def _change(value: float | None) -> str:
    return "n/a (no bias before)" if value is None else f"{value:+.1%}"


def _pair(bounds: list[float] | None, percent: bool = False) -> str:
    if bounds is None:
        return "n/a"
    return f"[{bounds[0]:+.1%}, {bounds[1]:+.1%}]" if percent else f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"
