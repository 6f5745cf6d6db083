"""Bias metrics of a ranking by a neutral query (Geyik et al. 2019, as used for CLIP by Berg et al. 2022;
docs/METHOD.md §3), under one of two named protocols:

- `surgeon` (default): p*(a) uniform unless `desired="set"`; a value absent from the top k counts as
  p_k(a) = 1/k (debias-vision-lang's smoothing, so MinSkew stays finite); the headline is the mean over queries.
- `paper` (the CCS paper's code): p*(a) = the set's own proportions; values absent from the top k are skipped
  (MaxSkew and MinSkew range over the values present); the headline is MaxSkew@k SUMMED over queries
  (`max_skew@k_sum`), the figure of the paper's tables. Under smoothing a value rarer than 1/k in the set
  would count as over-represented even when absent (ln((1/k) / p*) > 0): skipping it is what the paper does.

Ranking within (`ranked_by`, SocialCounterfactuals as the paper uses it): each query ranks only its own images
(an occupation's query, that occupation's counterfactual images), and p* under `desired="set"` is the
proportions of those images.

Exact score ties are shared: the positions a block of equal scores occupies hold the block's mean group
composition (the expectation over a random tie-break), so the metrics never depend on the order of the set.
Without ties every formula equals debias-vision-lang's (`compute_skew_metrics`, `normalized_discounted_KL`);
with ties that code keeps every tied item (shares can sum above 1) and torch.topk picks arbitrarily."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from surgeon.core.errors import InvalidInput


@dataclass(frozen=True)
class BiasProtocol:
    name: str
    desired: str  # p* unless the caller names one (the paper's is fixed)
    skip_absent: bool  # values absent from the top k: skipped, or scored as p_k(a) = 1/k
    headline: str  # how per-query MaxSkew is aggregated in the summary: "mean" or "sum"


PROTOCOLS = {
    "surgeon": BiasProtocol("surgeon", "uniform", skip_absent=False, headline="mean"),
    "paper": BiasProtocol("paper", "set", skip_absent=True, headline="sum"),
}


def bias_protocol(name: str, desired: str | None = None) -> tuple[BiasProtocol, str]:
    """The named protocol and the desired distribution it uses (`desired` overrides only the default one)."""
    if name not in PROTOCOLS:
        raise InvalidInput(f"unknown bias protocol {name!r}", hint=f"use one of: {', '.join(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    if desired is not None and name == "paper" and desired != protocol.desired:
        raise InvalidInput(f"the paper protocol uses the set's own proportions; --desired {desired} contradicts it")
    return protocol, desired or protocol.desired


def desired_distribution(groups: Sequence[int] | np.ndarray, n_groups: int, desired: str = "uniform") -> np.ndarray:
    """p*(a): uniform over the attribute's values, or the set's own proportions ("set")."""
    if desired == "uniform":
        return np.full(n_groups, 1.0 / n_groups)
    if desired == "set":
        counts = np.bincount(np.asarray(groups), minlength=n_groups).astype(float)
        return counts / counts.sum()
    raise InvalidInput(f"unknown desired distribution {desired!r}", hint="use 'uniform' or 'set'")


#: named foldings of a manifest's group labels, applied when it is read (the paper folds FairFace's 7 races into
#: 6: ../shared/METHOD.md §6 row 7); a label not named keeps its own value, lower-cased
GROUP_FOLDINGS: dict[str, dict[str, str]] = {
    "fairface-race6": {
        "east asian": "asian",
        "southeast asian": "asian",
        "latino_hispanic": "latino",
        "latino hispanic": "latino",
        "white": "white",
        "black": "black",
        "indian": "indian",
        "middle eastern": "middle eastern",
    },
}


def fold_groups(labels: Sequence[str], folding: str) -> list[str]:
    """The labels under a named folding; a label the folding does not know is refused (a typo, or the wrong
    column), naming it."""
    if folding not in GROUP_FOLDINGS:
        raise InvalidInput(f"unknown group folding {folding!r}", hint=f"use one of: {', '.join(GROUP_FOLDINGS)}")
    mapping = GROUP_FOLDINGS[folding]
    unknown = sorted({label for label in labels if label.strip().lower() not in mapping})
    if unknown:
        raise InvalidInput(
            f"group folding {folding} does not know the label(s) {', '.join(repr(u[:40]) for u in unknown[:5])}",
            hint=f"it folds: {', '.join(sorted(mapping))}",
        )
    return [mapping[label.strip().lower()] for label in labels]


def query_pools(n_queries: int, n_ranked: int, ranked_by: np.ndarray | None) -> list[np.ndarray]:
    """The images each query ranks: all of them, or those `ranked_by` (one query index per image) gives it."""
    if ranked_by is None:
        return [np.arange(n_ranked)] * n_queries
    return [np.flatnonzero(ranked_by == q) for q in range(n_queries)]


def _composition(ranked: Sequence[int] | np.ndarray, n_groups: int) -> np.ndarray:
    """Positions x groups: one-hot rows for a list of group labels; a 2-D array is already a composition."""
    ranked = np.asarray(ranked)
    return ranked.astype(float) if ranked.ndim == 2 else np.eye(n_groups)[ranked]


def ranked_composition(scores: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """The group composition of each rank position, best score first; a block of exactly equal scores gives
    each of its positions the block's mean composition."""
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    onehot = np.eye(n_groups)[groups[order]]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    lengths = np.diff(np.r_[starts, len(ordered)])
    return np.repeat(np.add.reduceat(onehot, starts, axis=0) / lengths[:, None], lengths, axis=0)


def skews_at_k(ranked, k: int, target: np.ndarray, skip_absent: bool = False) -> np.ndarray:
    """Skew_a@k = ln(p_k(a) / p*(a)) for every value a; absent values count as 1/k, or are NaN (skipped).
    `ranked`: group labels in rank order, or a positions x groups composition (`ranked_composition`)."""
    if not 0 < k <= len(ranked):
        raise InvalidInput(f"k={k} must be between 1 and the number of ranked items ({len(ranked)})")
    share = _composition(ranked, len(target))[:k].sum(0) / k
    share = np.where(share > 0, share, np.nan if skip_absent else 1.0 / k)
    return np.log(share / target)


def ndkl(ranked, target: np.ndarray) -> float:
    """Normalised discounted KL divergence of the top-i distributions from p*, over the whole ranking."""
    rows = _composition(ranked, len(target))
    n = len(rows)
    prefix = np.cumsum(rows, axis=0) / np.arange(1, n + 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(prefix > 0, prefix * np.log(prefix / target), 0.0).sum(1)
    discounts = 1.0 / np.log2(np.arange(2, n + 2))
    return float((kl * discounts).sum() / discounts.sum())


def bias_metrics(
    similarity: np.ndarray,
    groups: Sequence[int] | np.ndarray,
    n_groups: int,
    k: int = 10,
    desired: str | None = None,
    protocol: str = "surgeon",
    ranked_by: np.ndarray | None = None,
    probes: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-query, mean and summed MaxSkew@k, MinSkew@k and NDKL from a (queries x images) similarity matrix:
    a JSON record whose keys name k, so its values are typed by the caller that reads them. `ranked_by` (one
    query index per image): each query ranks only its own images (`query_pools`). `probes` (one probe index
    per image): each probe is ranked apart and every figure is the mean over probes, so the statistic stays
    that of one probe's size while its noise falls with their number."""
    if similarity.ndim != 2 or similarity.shape[1] != len(groups):
        raise InvalidInput("similarity must be (queries, images) with one group label per image")
    if len(groups) == 0:
        raise InvalidInput("the bias set is empty")
    if probes is not None:
        if ranked_by is not None:
            raise InvalidInput("a bias set is ranked within probes or within queries, not both")
        groups_arr = np.asarray(groups)
        parts = [
            bias_metrics(similarity[:, part], groups_arr[part], n_groups, k, desired, protocol)
            for part in probe_parts(probes)
        ]
        return {**_mean_records(parts), "probes": len(parts)}
    rules, desired = bias_protocol(protocol, desired)
    max_skew, min_skew, ndkls, shares = [], [], [], []
    groups_arr = np.asarray(groups)
    for row, pool in zip(similarity, query_pools(len(similarity), len(groups_arr), ranked_by), strict=True):
        target = desired_distribution(groups_arr[pool], n_groups, desired)
        ranked = ranked_composition(row[pool], groups_arr[pool], n_groups)
        skews = skews_at_k(ranked, k, target, rules.skip_absent)
        max_skew.append(float(np.nanmax(skews)))
        min_skew.append(float(np.nanmin(skews)))
        ndkls.append(ndkl(ranked, target))
        shares.append([round(float(s), 6) for s in ranked[:k].sum(0) / k])
    return {
        "protocol": rules.name,
        "desired": desired,
        f"max_skew@{k}": float(np.mean(max_skew)),
        f"min_skew@{k}": float(np.mean(min_skew)),
        "ndkl": float(np.mean(ndkls)),
        f"max_skew@{k}_per_query": [round(v, 6) for v in max_skew],
        f"max_skew@{k}_sum": float(np.sum(max_skew)),
        # which group fills each query's top k (MaxSkew alone does not say in which direction it leans)
        f"group_share@{k}_per_query": shares,
    }


#: most top-k group compositions `chance_skews` sums exactly; a larger space is sampled (seeded) instead
CHANCE_EXACT_COMPOSITIONS = 100_000
CHANCE_DRAWS = 20_000


def chance_skews(
    groups: Sequence[int] | np.ndarray,
    n_groups: int,
    k: int = 10,
    desired: str | None = None,
    protocol: str = "surgeon",
    n_queries: int = 1,
    ranked_by: np.ndarray | None = None,
    probes: np.ndarray | None = None,
) -> dict[str, Any]:
    """What a ranking that ignores the images scores on this set, in expectation: each query's top k a
    uniformly random draw from its pool. A model blind to the groups scores MaxSkew@k about this, not 0 (a top
    10 of two equal groups is rarely split 5/5), so a change reads against it; a ranking by content can score
    below it (counterfactual sets, where every scene is in every group). Exact over the multivariate
    hypergeometric top-k compositions when they are few, else the mean of seeded draws; aggregated like
    `bias_metrics`."""
    rules, desired = bias_protocol(protocol, desired)
    exact = math.comb(k + n_groups - 1, n_groups - 1) <= CHANCE_EXACT_COMPOSITIONS

    def expected(pool_groups: np.ndarray, target: np.ndarray) -> tuple[float, float]:
        counts = tuple(np.bincount(pool_groups, minlength=n_groups).tolist())
        return _expected_skews(counts, k, tuple(target.tolist()), rules.skip_absent, exact)

    figures = _over_pools(expected, groups, n_groups, k, desired, n_queries, ranked_by, probes)
    record = {key: round(float(value), 6) for key, value in figures.items()}
    return {**record, "method": "exact" if exact else "sampled"}


def _over_pools(
    per_pool: Callable[[np.ndarray, np.ndarray], Any],
    groups: Sequence[int] | np.ndarray,
    n_groups: int,
    k: int,
    desired: str,
    n_queries: int,
    ranked_by: np.ndarray | None,
    probes: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """What `per_pool(pool's groups, its p*)` gives for each query's pool (MaxSkew@k, MinSkew@k, optionally NDKL),
    aggregated like `bias_metrics`' figures: the mean over a probe's queries (MaxSkew also their sum), then the
    mean over probes."""
    groups_arr = np.asarray(groups)
    per_part = []
    for part in probe_parts(probes) if probes is not None else [np.arange(len(groups_arr))]:
        pools = query_pools(n_queries, len(part), None if ranked_by is None else np.asarray(ranked_by)[part])
        table = np.asarray(
            [
                per_pool(groups_arr[part][pool], desired_distribution(groups_arr[part][pool], n_groups, desired))
                for pool in pools
            ]
        )
        figures = {f"max_skew@{k}": table[:, 0].mean(0), f"min_skew@{k}": table[:, 1].mean(0)}
        if table.shape[1] > 2:
            figures["ndkl"] = table[:, 2].mean(0)
        per_part.append({**figures, f"max_skew@{k}_sum": table[:, 0].sum(0)})
    return {key: np.mean([p[key] for p in per_part], axis=0) for key in per_part[0]}


def below_chance(chance: float, figures: dict[Any, float | None]) -> dict[Any, float]:
    """The `figures` (name -> value, in the order a report shows them) that do not score above `chance`. Chance is
    their floor only when there are none: a ranking by content can be more balanced than a random one
    (counterfactual sets), and a pruning can take a figure below it, so no report calls it a floor on the word
    of one figure alone."""
    return {name: value for name, value in figures.items() if value is not None and value <= chance}


@functools.lru_cache(maxsize=1024)  # every query of a set, and every probe of a kind, share their pool's counts
def _expected_skews(
    counts: tuple[int, ...], k: int, target: tuple[float, ...], skip_absent: bool, exact: bool
) -> tuple[float, float]:
    """(E[MaxSkew@k], E[MinSkew@k]) of a random top k from a pool with these group counts: summed over every
    composition of the top k (`exact`), else averaged over seeded draws."""
    n_groups, total = len(counts), sum(counts)
    if not 0 < k <= total:
        raise InvalidInput(f"k={k} must be between 1 and the number of ranked items ({total})")
    if exact:
        tops = np.asarray(list(_compositions(k, counts)), dtype=int)
        # ln C(n_g, c) for every group and c = 0..k (0 where c > n_g: such tops are never enumerated)
        ln_comb = np.asarray([[_ln_comb(n, c) if c <= n else 0.0 for c in range(k + 1)] for n in counts])
        weights = np.exp(ln_comb[np.arange(n_groups), tops].sum(1) - _ln_comb(total, k))
    else:
        rng = np.random.default_rng(0)
        tops = rng.multivariate_hypergeometric(list(counts), k, size=CHANCE_DRAWS)
        weights = np.full(len(tops), 1.0 / len(tops))
    share = tops / k
    share = np.where(share > 0, share, np.nan if skip_absent else 1.0 / k)
    skews = np.log(share / np.asarray(target))
    with np.errstate(invalid="ignore"):
        return float(weights @ np.nanmax(skews, 1)), float(weights @ np.nanmin(skews, 1))


def _ln_comb(n: int, c: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(c + 1) - math.lgamma(n - c + 1)


def _compositions(k: int, caps: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Every way to split k items among groups holding at most `caps` each."""
    if len(caps) == 1:
        if k <= caps[0]:
            yield (k,)
        return
    for first in range(min(k, caps[0]) + 1):
        for rest in _compositions(k - first, caps[1:]):
            yield (first, *rest)


def probe_parts(probes: np.ndarray) -> list[np.ndarray]:
    """The image indices of each probe, in probe order."""
    probes = np.asarray(probes)
    return [np.flatnonzero(probes == p) for p in np.unique(probes)]


def _mean_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The element-wise mean of `bias_metrics` records of equal shape (numbers and nested lists of numbers)."""

    def mean(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, str):
            return first
        if isinstance(first, list):
            return [mean([v[i] for v in values]) for i in range(len(first))]
        return float(np.mean(values))

    rounded = {key for key, value in records[0].items() if isinstance(value, list)}  # per-query lists: 6 digits
    out = {key: mean([r[key] for r in records]) for key in records[0]}
    return {key: _rounded(value) if key in rounded else value for key, value in out.items()}


def _rounded(value: Any) -> Any:
    return [_rounded(v) for v in value] if isinstance(value, list) else round(float(value), 6)


def headline_keys(metrics: dict) -> list[str]:
    """The figures a report shows: mean MaxSkew@k, MinSkew@k, NDKL, and MaxSkew@k summed over queries where
    the protocol headlines the sum (reports written before protocols existed have none: surgeon's)."""
    summed = PROTOCOLS[metrics.get("protocol", "surgeon")].headline == "sum"
    return [
        key
        for key in metrics
        if key.startswith(("max_skew@", "min_skew@", "ndkl"))
        and not key.endswith("_per_query")
        and (summed or not key.endswith("_sum"))
    ]


#: bootstrap resamples behind every interval a report shows (percentile intervals; 500 keep the 2.5% and
#: 97.5% quantiles within about a tenth of the interval's width of where many more would put them)
BOOTSTRAP_RESAMPLES = 500
INTERVAL_LEVEL = 0.95


def canonical_units(identities: Sequence[Any], units: Sequence[Any] | None = None) -> np.ndarray:
    """Unit ids (0, 1, ...) numbered in the order of each unit's least member identity (a manifest row: its
    path as given, then its other cells); `units` None: each item its own unit. `unit_weights` draws units
    in id order, so with these the draws follow what the set holds, not the order of its rows or the names
    of its units (row ids read in list order moved a shuffled manifest's intervals by 0.007)."""
    units = range(len(identities)) if units is None else units
    least: dict[Any, Any] = {}
    for identity, unit in zip(identities, units, strict=True):
        least[unit] = min(least.get(unit, identity), identity)
    rank = {unit: i for i, unit in enumerate(sorted(least, key=least.__getitem__))}
    return np.asarray([rank[unit] for unit in units], dtype=int)


def unit_weights(
    units: np.ndarray | None, n_items: int, resamples: int, seed: int = 0, strata: np.ndarray | None = None
) -> np.ndarray:
    """(resamples x items) multiplicities of bootstrap resamples that draw whole units (a scene's renderings,
    an identity's photos) with replacement, so intervals reflect the variance of what was sampled; units None:
    each item is its own unit. With `strata` (ranking within: each item's query) units are drawn within each
    stratum, as many as it has, so every query keeps images to rank (a unit spanning strata is one unit per
    stratum)."""
    units = np.arange(n_items) if units is None else np.asarray(units)
    rng = np.random.default_rng(seed)
    if strata is None:
        _, inverse = np.unique(units, return_inverse=True)
        n_units = int(inverse.max()) + 1
        drawn = np.stack([np.bincount(rng.integers(0, n_units, n_units), minlength=n_units) for _ in range(resamples)])
        return drawn[:, inverse]
    _, first, inverse = np.unique(
        np.stack([np.unique(units, return_inverse=True)[1].reshape(-1), strata], axis=1),
        axis=0,
        return_index=True,
        return_inverse=True,
    )
    inverse = inverse.reshape(-1)
    layers = [np.flatnonzero(strata[first] == s) for s in np.unique(strata)]
    drawn = np.stack(
        [
            sum(np.bincount(layer[rng.integers(0, len(layer), len(layer))], minlength=len(first)) for layer in layers)
            for _ in range(resamples)
        ]
    )
    return drawn[:, inverse]


def interval(
    values: Sequence[float] | np.ndarray,
    point: float,
    level: float = INTERVAL_LEVEL,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> list[float]:
    """The percentile interval of bootstrap values, moved so that their median sits on `point`, [low, high],
    within the `bounds` the statistic can take (`figure_ranges`): a resampled ranking holds each duplicated
    image next to its copies, which lifts MaxSkew and NDKL in resamples (on the toy's four probes NDKL lay
    above the point in over 97.5% of 500, so plain percentiles left the point outside its own interval); the
    draws measure how far a figure varies, the point where. Moved, the spread can cross a bound (MaxSkew 0
    on a perfectly balanced set read [-0.11, 0.15]), so it is clipped there."""
    values = np.asarray(values, dtype=float)
    tail = (1 - level) / 2 * 100
    low, middle, high = np.percentile(values, [tail, 50, 100 - tail])
    shift = point - middle
    floor, ceiling = bounds
    return [round(float(np.clip(end + shift, floor, ceiling)), 6) for end in (low, high)]


def figure_ranges(
    groups: Sequence[int] | np.ndarray,
    n_groups: int,
    k: int = 10,
    desired: str | None = None,
    protocol: str = "surgeon",
    n_queries: int = 1,
    ranked_by: np.ndarray | None = None,
    probes: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """The range each headline figure of `bias_metrics` can take on this set, whatever the ranking, aggregated
    like the figure. A share counted is at most 1 (smoothed: 1/k), so no skew exceeds -ln(min p*), nor does
    NDKL's KL; a tied block's share can be any fraction, so skews have no floor. MaxSkew >= 0: the shares of
    the values present sum to 1, at least their p*, so one holds at least its p*. MinSkew <= 0 only where no
    value can be skipped or smoothed above its p* (surgeon's protocol with every p* >= 1/k): else every skew
    counted can be positive (a top k of one of two groups has paper MinSkew ln 2)."""
    rules, desired = bias_protocol(protocol, desired)

    def ranges(_: np.ndarray, target: np.ndarray) -> list[tuple[float, float]]:  # (MaxSkew, MinSkew, NDKL)
        least = target[target > 0].min()  # a value the pool lacks is never ranked (bias_set refuses such pools)
        top = -math.log(least)
        below = not rules.skip_absent and k * least >= 1
        return [(0.0, top), (-math.inf, 0.0 if below else top), (0.0, top)]

    figures = _over_pools(ranges, groups, n_groups, k, desired, n_queries, ranked_by, probes)
    return {key: (float(low), float(high)) for key, (low, high) in figures.items()}


def resampled_skews(
    similarity: np.ndarray,
    groups: Sequence[int] | np.ndarray,
    n_groups: int,
    weights: np.ndarray,
    k: int = 10,
    desired: str | None = None,
    protocol: str = "surgeon",
    with_ndkl: bool = True,
    ranked_by: np.ndarray | None = None,
    probes: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-resample (resamples x queries) MaxSkew@k, MinSkew@k and NDKL of `bias_metrics` on the resampled
    sets `weights` describes (multiplicities, `unit_weights`; `probes`: the mean over probes ranked apart).
    Copies of an item sit next to each other and other ties keep the set's order: the expectation over
    tie-breaks (`ranked_composition`) is left to the point estimate."""
    if probes is not None:
        groups_arr = np.asarray(groups)
        parts = [
            resampled_skews(
                similarity[:, part], groups_arr[part], n_groups, weights[:, part], k, desired, protocol, with_ndkl
            )
            for part in probe_parts(probes)
        ]
        return {key: np.mean([p[key] for p in parts], axis=0) for key in parts[0]}
    rules, desired = bias_protocol(protocol, desired)
    onehot = np.eye(n_groups)[np.asarray(groups)]
    shape = (len(weights), len(similarity))
    out = {"max": np.empty(shape), "min": np.empty(shape), "ndkl": np.full(shape, np.nan)}
    pools = query_pools(len(similarity), len(onehot), ranked_by)
    for q, (row, pool) in enumerate(zip(similarity, pools, strict=True)):
        if desired == "set":
            counts = weights[:, pool] @ onehot[pool]
            target = counts / counts.sum(1, keepdims=True)
        else:
            target = np.broadcast_to(desired_distribution(groups, n_groups, desired), (len(weights), n_groups))
        order = pool[np.argsort(-row[pool], kind="stable")]
        copies, members = weights[:, order], onehot[order]
        ahead = np.cumsum(copies, axis=1) - copies
        share = np.clip(k - ahead, 0, copies) @ members / k
        share = np.where(share > 0, share, np.nan if rules.skip_absent else 1.0 / k)
        skews = np.log(share / target)
        out["max"][:, q], out["min"][:, q] = np.nanmax(skews, 1), np.nanmin(skews, 1)
        if with_ndkl:
            out["ndkl"][:, q] = _resampled_ndkl(copies, members, target)
    return out


def _resampled_ndkl(copies: np.ndarray, members: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`ndkl` of each resampled ranking, expanded: every resample's copies laid out in rank order (copies of
    an item side by side) as one-hot rows, padded to the longest resample; one cumulative sum gives every
    prefix's group mix (twice as fast as a loop over copy counts, which gathered every item once per count)."""
    n_resamples, n_items = copies.shape
    totals = copies.sum(1)
    length = int(totals.max())
    item = np.repeat(np.tile(np.arange(n_items), n_resamples), copies.ravel())
    resample = np.repeat(np.arange(n_resamples), totals)
    position = np.arange(len(item)) - np.repeat(np.cumsum(totals) - totals, totals)
    mix = np.zeros((n_resamples, length, members.shape[1]))
    mix[resample, position] = members[item]
    prefix = np.cumsum(mix, axis=1) / np.arange(1, length + 1)[None, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(prefix > 0, prefix * np.log(prefix / target[:, None, :]), 0.0).sum(2)
    discount = 1.0 / np.log2(np.arange(2, length + 2))
    inside = np.arange(length)[None, :] < totals[:, None]
    return (kl * discount * inside).sum(1) / np.cumsum(discount)[totals - 1]


def bias_intervals(
    similarity: np.ndarray,
    groups: Sequence[int] | np.ndarray,
    n_groups: int,
    units: np.ndarray | None,
    k: int = 10,
    desired: str | None = None,
    protocol: str = "surgeon",
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    ranked_by: np.ndarray | None = None,
    probes: np.ndarray | None = None,
) -> dict[str, list[float]]:
    """95% bootstrap intervals of the headline figures of `bias_metrics` (`headline_keys`), resampling units
    (scenes, identities) with replacement (within each query's pool, or each probe)."""
    weights = unit_weights(units, len(groups), resamples, seed, strata=ranked_by if probes is None else probes)
    draws = resampled_skews(
        similarity, groups, n_groups, weights, k, desired, protocol, ranked_by=ranked_by, probes=probes
    )
    point = bias_metrics(similarity, groups, n_groups, k, desired, protocol, ranked_by, probes)
    ranges = figure_ranges(groups, n_groups, k, desired, protocol, len(similarity), ranked_by, probes)
    figures = {
        f"max_skew@{k}": draws["max"].mean(1),
        f"min_skew@{k}": draws["min"].mean(1),
        "ndkl": draws["ndkl"].mean(1),
        f"max_skew@{k}_sum": draws["max"].sum(1),
    }
    if PROTOCOLS[protocol].headline != "sum":
        del figures[f"max_skew@{k}_sum"]
    return {key: interval(values, point[key], bounds=ranges[key]) for key, values in figures.items()}
