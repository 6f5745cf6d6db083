"""Bias metrics of a ranking by a neutral query (Geyik et al. 2019, as used for CLIP by Berg et al. 2022;
METHOD.md §3). Absent attribute values in the top-k use p_k(a) = 1/k (smoothing), as METHOD.md allows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from surgeon.errors import InvalidInput


def desired_distribution(groups: Sequence[int], n_groups: int, desired: str = "uniform") -> np.ndarray:
    """p*(a): uniform over the attribute's values, or the set's own proportions ("set")."""
    if desired == "uniform":
        return np.full(n_groups, 1.0 / n_groups)
    if desired == "set":
        counts = np.bincount(np.asarray(groups), minlength=n_groups).astype(float)
        return counts / counts.sum()
    raise InvalidInput(f"unknown desired distribution {desired!r}", hint="use 'uniform' or 'set'")


def skews_at_k(ranked_groups: Sequence[int], k: int, target: np.ndarray) -> np.ndarray:
    """Skew_a@k = ln(p_k(a) / p*(a)) for every value a (absent values count as 1/k)."""
    if not 0 < k <= len(ranked_groups):
        raise InvalidInput(f"k={k} must be between 1 and the number of ranked items ({len(ranked_groups)})")
    counts = np.bincount(np.asarray(ranked_groups[:k]), minlength=len(target)).astype(float)
    share = np.where(counts > 0, counts / k, 1.0 / k)
    return np.log(share / target)


def ndkl(ranked_groups: Sequence[int], target: np.ndarray) -> float:
    """Normalised discounted KL divergence of the top-i distributions from p*, over the whole ranking."""
    groups = np.asarray(ranked_groups)
    n = len(groups)
    onehot = np.eye(len(target))[groups]
    prefix = np.cumsum(onehot, axis=0) / np.arange(1, n + 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(prefix > 0, prefix * np.log(prefix / target), 0.0).sum(1)
    discounts = 1.0 / np.log2(np.arange(2, n + 2))
    return float((kl * discounts).sum() / discounts.sum())


def bias_metrics(
    similarity: np.ndarray, groups: Sequence[int], n_groups: int, k: int = 10, desired: str = "uniform"
) -> dict[str, float | list[float]]:
    """Per-query and mean MaxSkew@k, MinSkew@k and NDKL from a (queries x images) similarity matrix."""
    if similarity.ndim != 2 or similarity.shape[1] != len(groups):
        raise InvalidInput("similarity must be (queries, images) with one group label per image")
    if len(groups) == 0:
        raise InvalidInput("the bias set is empty")
    target = desired_distribution(groups, n_groups, desired)
    max_skew, min_skew, ndkls, shares = [], [], [], []
    groups_arr = np.asarray(groups)
    for row in similarity:
        order = np.argsort(-row, kind="stable")
        ranked = groups_arr[order]
        skews = skews_at_k(ranked, k, target)
        max_skew.append(float(skews.max()))
        min_skew.append(float(skews.min()))
        ndkls.append(ndkl(ranked, target))
        shares.append([round(float(c) / k, 6) for c in np.bincount(ranked[:k], minlength=n_groups)])
    return {
        f"max_skew@{k}": float(np.mean(max_skew)),
        f"min_skew@{k}": float(np.mean(min_skew)),
        "ndkl": float(np.mean(ndkls)),
        f"max_skew@{k}_per_query": [round(v, 6) for v in max_skew],
        f"max_skew@{k}_sum": float(np.sum(max_skew)),
        # which group fills each query's top k (MaxSkew alone does not say in which direction it leans)
        f"group_share@{k}_per_query": shares,
    }
