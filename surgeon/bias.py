"""Bias metrics of a ranking by a neutral query (Geyik et al. 2019, as used for CLIP by Berg et al. 2022;
docs/METHOD.md §3), under one of two named protocols:

- `surgeon` (default): p*(a) uniform unless `desired="set"`; a value absent from the top k counts as
  p_k(a) = 1/k (debias-vision-lang's smoothing, so MinSkew stays finite); the headline is the mean over queries.
- `paper` (the CCS paper's code): p*(a) = the set's own proportions; values absent from the top k are skipped
  (MaxSkew and MinSkew range over the values present); the headline is MaxSkew@k SUMMED over queries
  (`max_skew@k_sum`), the figure of the paper's tables. Under smoothing a value rarer than 1/k in the set
  would count as over-represented even when absent (ln((1/k) / p*) > 0): skipping it is what the paper does.

Exact score ties are shared: the positions a block of equal scores occupies hold the block's mean group
composition (the expectation over a random tie-break), so the metrics never depend on the order of the set.
Without ties every formula equals debias-vision-lang's (`compute_skew_metrics`, `normalized_discounted_KL`);
with ties that code keeps every tied item (shares can sum above 1) and torch.topk picks arbitrarily."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from surgeon.errors import InvalidInput


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
) -> dict[str, Any]:
    """Per-query, mean and summed MaxSkew@k, MinSkew@k and NDKL from a (queries x images) similarity matrix:
    a JSON record whose keys name k, so its values are typed by the caller that reads them."""
    if similarity.ndim != 2 or similarity.shape[1] != len(groups):
        raise InvalidInput("similarity must be (queries, images) with one group label per image")
    if len(groups) == 0:
        raise InvalidInput("the bias set is empty")
    rules, desired = bias_protocol(protocol, desired)
    target = desired_distribution(groups, n_groups, desired)
    max_skew, min_skew, ndkls, shares = [], [], [], []
    groups_arr = np.asarray(groups)
    for row in similarity:
        ranked = ranked_composition(row, groups_arr, n_groups)
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
