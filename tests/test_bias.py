"""Bias metrics against hand-computed values."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from surgeon.core.errors import InvalidInput
from surgeon.results.bias import (
    PROTOCOLS,
    bias_intervals,
    bias_metrics,
    bias_protocol,
    canonical_units,
    chance_skews,
    desired_distribution,
    figure_ranges,
    headline_keys,
    interval,
    ndkl,
    ranked_composition,
    resampled_skews,
    skews_at_k,
    unit_weights,
)
from surgeon.validation.validate import bias_set


def test_skew_values_by_hand():
    target = np.array([0.5, 0.5])
    skews = skews_at_k([0] * 8 + [1] * 2, 10, target)
    assert skews[0] == pytest.approx(math.log(0.8 / 0.5))
    assert skews[1] == pytest.approx(math.log(0.2 / 0.5))
    balanced = skews_at_k([0, 1] * 5, 10, target)
    assert np.allclose(balanced, 0)
    absent = skews_at_k([0] * 10, 10, target)  # absent group counted as 1/k
    assert absent[1] == pytest.approx(math.log(0.1 / 0.5))


def test_ndkl_by_hand_and_ordering():
    target = np.array([0.5, 0.5])
    # top-1 = [1, 0] -> KL = ln 2 (weight 1); top-2 balanced -> 0 (weight 1/log2 3)
    assert ndkl([0, 1], target) == pytest.approx(math.log(2) / (1 + 1 / math.log2(3)))
    assert ndkl([0, 1, 1, 0] * 4, target) < ndkl([0] * 8 + [1] * 8, target)
    assert ndkl([0] * 8 + [1] * 8, target) > 0.3


def test_bias_metrics_from_similarities():
    groups = [0] * 10 + [1] * 10
    sim = np.array([[1.0] * 10 + [0.0] * 10, [0.0, 1.0] * 10])  # query 0 prefers group 0 entirely
    metrics = bias_metrics(sim, groups, 2, k=10)
    per_query = metrics["max_skew@10_per_query"]
    assert per_query[0] == pytest.approx(math.log(2))
    assert per_query[1] == pytest.approx(0.0, abs=1e-9)
    assert metrics["max_skew@10"] == pytest.approx(math.log(2) / 2)
    # the direction: query 0's top 10 is all group 0; query 1 alternates between the groups
    assert metrics["group_share@10_per_query"] == [[1.0, 0.0], [0.5, 0.5]]


def test_desired_distribution_and_errors():
    assert np.allclose(desired_distribution([0, 0, 0, 1], 2, "set"), [0.75, 0.25])
    with pytest.raises(InvalidInput):
        desired_distribution([0], 2, "magic")
    with pytest.raises(InvalidInput):
        skews_at_k([0, 1], 5, np.array([0.5, 0.5]))
    with pytest.raises(InvalidInput):
        bias_metrics(np.zeros((1, 0)), [], 2)


# --- the paper's protocol (CCS-CLIP) next to surgeon's, against hand-computed values ----------------------


def _sim_ranking(groups, top):
    """A one-query similarity row that ranks the images `top` (indices, best first) above all others."""
    row = np.zeros(len(groups))
    row[list(top)] = np.linspace(2.0, 1.0, len(top))
    return row[None, :]


def test_two_groups_set_proportions_by_hand():
    groups = [0] * 20 + [1] * 10  # p*(set) = 2/3, 1/3
    sim = _sim_ranking(groups, [0] + list(range(20, 29)))  # top 10: one of group 0, nine of group 1
    surgeon = bias_metrics(sim, groups, 2, k=10)
    assert surgeon["max_skew@10"] == pytest.approx(math.log(0.9 / 0.5))
    assert surgeon["min_skew@10"] == pytest.approx(math.log(0.1 / 0.5))
    paper = bias_metrics(sim, groups, 2, k=10, protocol="paper")
    assert (paper["protocol"], paper["desired"]) == ("paper", "set")
    assert paper["max_skew@10"] == pytest.approx(math.log(0.9 / (1 / 3)))
    assert paper["min_skew@10"] == pytest.approx(math.log(0.1 / (2 / 3)))
    assert paper["max_skew@10_sum"] == paper["max_skew@10"]


def test_seven_fairface_like_groups_by_hand():
    sizes = [20, 15, 10, 10, 5, 5, 5]  # 70 images, seven groups as FairFace's race attribute
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    first = np.cumsum([0] + sizes)
    top = [*range(first[0], first[0] + 4), *range(first[1], first[1] + 3), first[2], first[2] + 1, first[3]]
    sim = _sim_ranking(groups, top)  # top 10 = 4, 3, 2, 1, 0, 0, 0
    paper = bias_metrics(sim, groups, 7, k=10, protocol="paper")
    # present groups: 0.4/(20/70) = 0.3/(15/70) = 0.2/(10/70) = 1.4, 0.1/(10/70) = 0.7; absent ones skipped
    assert paper["max_skew@10"] == pytest.approx(math.log(1.4))
    assert paper["min_skew@10"] == pytest.approx(math.log(0.7))
    surgeon = bias_metrics(sim, groups, 7, k=10)  # uniform 1/7; absent groups at 1/k
    assert surgeon["max_skew@10"] == pytest.approx(math.log(0.4 * 7))
    assert surgeon["min_skew@10"] == pytest.approx(math.log(0.1 * 7))
    assert surgeon["group_share@10_per_query"] == [[0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0]]


def test_a_group_rarer_than_one_in_k_is_skipped_not_over_represented():
    groups = [0] * 97 + [1] * 3  # group 1 is 3% of the set, rarer than 1/k = 10%
    sim = np.vstack([_sim_ranking(groups, range(10)), _sim_ranking(groups, range(10, 20))])  # no group 1 in either
    paper = bias_metrics(sim, groups, 2, k=10, protocol="paper")
    assert paper["max_skew@10_per_query"] == [round(math.log(1 / 0.97), 6)] * 2
    assert paper["max_skew@10_sum"] == pytest.approx(2 * math.log(1 / 0.97))  # summed over the queries
    # smoothing scores the absent group as 1/k = 0.1 > 0.03: "over-represented" though it never appears
    smoothed = bias_metrics(sim, groups, 2, k=10, desired="set")
    assert smoothed["max_skew@10_sum"] == pytest.approx(2 * math.log(0.1 / 0.03))


def test_exact_ties_are_shared_and_the_set_order_does_not_matter():
    groups = np.array([0, 1] * 4 + [0, 0, 0, 1] + [1] * 4)
    scores = np.array([9.0, 8, 7, 6, 5, 4, 3, 2] + [1.0] * 4 + [0.0] * 4)  # 4-way tie across the k=10 cut
    # 2 of the 4 tied slots count 3/4 group 0 and 1/4 group 1: top 10 = 5.5 / 4.5
    expected = math.log(0.55 / 0.5)
    metrics = bias_metrics(scores[None, :], groups, 2, k=10)
    assert metrics["max_skew@10"] == pytest.approx(expected)
    assert metrics["group_share@10_per_query"] == [[0.55, 0.45]]
    rng = np.random.default_rng(0)
    for _ in range(5):
        perm = rng.permutation(len(groups))
        shuffled = bias_metrics(scores[None, perm], groups[perm], 2, k=10)
        for key in ("max_skew@10", "min_skew@10", "ndkl"):
            assert shuffled[key] == pytest.approx(metrics[key], abs=1e-12), key
    # a ranking that is one big tie is a balanced one at every depth
    assert bias_metrics(np.zeros((1, 6)), [0, 1, 0, 1, 0, 1], 2, k=4)["ndkl"] == pytest.approx(0.0, abs=1e-12)
    assert ndkl(ranked_composition(np.zeros(4), np.array([0, 0, 1, 1]), 2), np.array([0.5, 0.5])) == 0


def _reference_skew(scores, labels, top_n):
    """debias-vision-lang's compute_skew_metrics, re-derived: Counter shares over the top n, an absent label
    at 1/n, MaxSkew = max(0, max_a ln(p / p*)) for eq_opp (uniform) and dem_par (set proportions)."""
    counts = Counter(labels.tolist())
    top = Counter(labels[np.argsort(-scores)[:top_n]].tolist())
    out = {"eq_opp": 0.0, "dem_par": 0.0}
    for label, count in counts.items():
        p = top[label] / top_n or 1 / top_n
        for name, target in (("eq_opp", 1 / len(counts)), ("dem_par", count / len(labels))):
            out[name] = max(out[name], math.log(p) - math.log(target))
    return out


def _reference_ndkl(scores, labels):
    """debias-vision-lang's normalized_discounted_KL over the whole ranking, eq_opp (uniform)."""
    n_labels = len(set(labels.tolist()))
    running, total = np.zeros(n_labels), 0.0
    for i, label in enumerate(labels[np.argsort(-scores)], start=1):
        running[label] += 1
        p = running / i
        with np.errstate(divide="ignore", invalid="ignore"):
            total += np.sum(np.where(p != 0, p * (np.log(p) - np.log(1 / n_labels)), 0)) / math.log2(i + 1)
    return total / sum(1 / math.log2(i + 1) for i in range(1, len(labels) + 1))


def _reference_paper(similarity, labels, k):
    """The CCS paper's protocol, written out: set proportions, absent groups skipped, MaxSkew summed."""
    share_set = Counter(labels.tolist())
    total = 0.0
    for row in similarity:
        top = Counter(labels[np.argsort(-row)[:k]].tolist())
        total += max(math.log((c / k) / (share_set[g] / len(labels))) for g, c in top.items())
    return total


@pytest.mark.parametrize("n_groups", [2, 7])
def test_formulas_match_the_references_without_ties(n_groups):
    rng = np.random.default_rng(n_groups)
    labels = rng.integers(0, n_groups, 200)
    labels[:n_groups] = np.arange(n_groups)  # every group present in the set
    similarity = rng.normal(size=(6, 200))
    uniform = bias_metrics(similarity, labels, n_groups, k=10)
    set_share = bias_metrics(similarity, labels, n_groups, k=10, desired="set")
    for q, row in enumerate(similarity):
        ref = _reference_skew(row, labels, 10)
        assert uniform["max_skew@10_per_query"][q] == pytest.approx(ref["eq_opp"], abs=1e-6)
        assert set_share["max_skew@10_per_query"][q] == pytest.approx(ref["dem_par"], abs=1e-6)
    assert uniform["ndkl"] == pytest.approx(np.mean([_reference_ndkl(r, labels) for r in similarity]), abs=1e-12)
    paper = bias_metrics(similarity, labels, n_groups, k=10, protocol="paper")
    assert paper["max_skew@10_sum"] == pytest.approx(_reference_paper(similarity, labels, 10), abs=1e-12)


def test_protocol_choices_are_checked():
    assert bias_protocol("paper") == (PROTOCOLS["paper"], "set")
    assert bias_protocol("surgeon", "set") == (PROTOCOLS["surgeon"], "set")
    with pytest.raises(InvalidInput, match="unknown bias protocol"):
        bias_protocol("geyik")
    with pytest.raises(InvalidInput, match="contradicts"):
        bias_protocol("paper", "uniform")
    metrics = bias_metrics(np.eye(2), [0, 1], 2, k=1, protocol="paper")
    assert headline_keys(metrics) == ["max_skew@1", "min_skew@1", "ndkl", "max_skew@1_sum"]
    assert "max_skew@1_sum" not in headline_keys(bias_metrics(np.eye(2), [0, 1], 2, k=1))


@pytest.mark.parametrize("protocol", ["surgeon", "paper"])
def test_resampled_figures_equal_the_metrics_of_each_resample(protocol):
    """The vectorised bootstrap scores every resample as bias_metrics scores that resample written out (its
    items repeated), for MaxSkew, MinSkew and NDKL; whole units are drawn together."""
    rng = np.random.default_rng(0)
    units = np.repeat(np.arange(30), 2)
    groups = np.array([0, 1] * 20 + [0, 0, 1, 2] * 5)
    similarity = rng.normal(size=(3, 60))
    weights = unit_weights(units, 60, 20, seed=1)
    assert (weights[:, ::2] == weights[:, 1::2]).all() and (weights.sum(1) == 60).all()
    draws = resampled_skews(similarity, groups, 3, weights, k=7, protocol=protocol)
    for b, copies in enumerate(weights):
        index = np.repeat(np.arange(60), copies)
        metrics = bias_metrics(similarity[:, index], groups[index], 3, k=7, protocol=protocol)
        assert draws["max"][b] == pytest.approx(metrics["max_skew@7_per_query"], abs=1e-6)
        assert draws["ndkl"][b].mean() == pytest.approx(metrics["ndkl"])
        assert draws["min"][b].mean() == pytest.approx(metrics["min_skew@7"])


def test_intervals_cover_every_headline_figure_and_shrink_with_more_units():
    rng = np.random.default_rng(0)

    def lean(n_units: int) -> np.ndarray:  # queries prefer group 0 a little
        groups = np.tile([0, 1], n_units)
        return rng.normal(size=(2, 2 * n_units)) + 0.5 * (groups == 0), groups

    small, groups_small = lean(50)
    large, groups_large = lean(800)
    narrow = bias_intervals(large, groups_large, 2, np.repeat(np.arange(800), 2), resamples=200)
    wide = bias_intervals(small, groups_small, 2, np.repeat(np.arange(50), 2), resamples=200)
    point = bias_metrics(large, groups_large, 2)
    assert set(narrow) == set(headline_keys(point))
    assert narrow["ndkl"][0] <= point["ndkl"] <= narrow["ndkl"][1]
    assert narrow["ndkl"][1] - narrow["ndkl"][0] < wide["ndkl"][1] - wide["ndkl"][0]
    summed = bias_intervals(small, groups_small, 2, None, protocol="paper", resamples=50)
    assert "max_skew@10_sum" in summed and summed["max_skew@10_sum"][0] <= summed["max_skew@10_sum"][1]


def test_probes_are_ranked_apart_and_every_figure_is_their_mean():
    """A set of several probes: each probe is its own ranking; every figure (and its per-query and share lists)
    is the mean over probes, and the bootstrap resamples units within each probe, scored the same way."""
    rng = np.random.default_rng(0)
    groups, units, probes = np.tile([0, 1], 90), np.repeat(np.arange(90), 2), np.repeat([0, 1, 2], 60)
    similarity = rng.normal(size=(2, 180)) + 0.6 * (groups == 0) * (probes == 1)  # probe 1 leans, 0 and 2 do not
    merged = bias_metrics(similarity, groups, 2, k=10, probes=probes)
    each = [bias_metrics(similarity[:, probes == p], groups[probes == p], 2, k=10) for p in range(3)]
    assert merged["probes"] == 3
    for key in ("max_skew@10", "min_skew@10", "ndkl", "max_skew@10_sum"):
        assert merged[key] == pytest.approx(np.mean([m[key] for m in each]))
    per_query = np.mean([m["max_skew@10_per_query"] for m in each], 0)
    assert merged["max_skew@10_per_query"] == pytest.approx(per_query.tolist(), abs=1e-6)
    shares = np.mean([m["group_share@10_per_query"] for m in each], 0)
    np.testing.assert_allclose(merged["group_share@10_per_query"], shares, atol=1e-6)
    assert merged["max_skew@10"] != pytest.approx(bias_metrics(similarity, groups, 2, k=10)["max_skew@10"])
    weights = unit_weights(units, 180, 10, seed=3, strata=probes)
    assert all((weights[:, probes == p].sum(1) == 60).all() for p in range(3))  # each probe keeps its size
    draws = resampled_skews(similarity, groups, 2, weights, k=10, probes=probes)
    for b, copies in enumerate(weights):
        index = [np.repeat(np.flatnonzero(probes == p), copies[probes == p]) for p in range(3)]
        written = [bias_metrics(similarity[:, i], groups[i], 2, k=10) for i in index]
        assert draws["max"][b].mean() == pytest.approx(np.mean([m["max_skew@10"] for m in written]))
        assert draws["ndkl"][b].mean() == pytest.approx(np.mean([m["ndkl"] for m in written]))
    low, high = bias_intervals(similarity, groups, 2, units, probes=probes, resamples=200)["max_skew@10"]
    assert low <= merged["max_skew@10"] <= high
    with pytest.raises(InvalidInput, match="not both"):
        bias_metrics(similarity, groups, 2, ranked_by=np.zeros(180, int), probes=probes)


def test_interval_keeps_the_bootstraps_spread_around_the_point():
    """Resampled rankings lift MaxSkew and NDKL (duplicated images sit together): with every draw above the
    point, plain percentiles would exclude it; the interval keeps their spread, centred (median) on the point,
    and with draws centred on the point it is the plain percentile interval."""
    draws = np.random.default_rng(0).normal(1.0, 0.1, 2000)
    low, high = interval(draws + 1.0, 1.0)
    plain = np.percentile(draws, [2.5, 97.5])
    assert [low, high] == pytest.approx(plain.tolist(), abs=0.01) and low < 1.0 < high
    assert interval(draws, float(np.median(draws))) == pytest.approx(plain.tolist(), abs=1e-6)


def test_an_interval_stays_within_what_its_figure_can_take():
    """Each image twice, once per group, tied: every top k is split evenly, so MaxSkew, MinSkew and NDKL are 0.
    The bootstrap's spread moved onto that point crossed 0 both ways (MaxSkew [-0.11, 0.15] on such a set);
    MaxSkew and NDKL cannot fall below 0, nor surgeon's MinSkew rise above it here."""
    rng = np.random.default_rng(0)
    similarity = np.repeat(rng.normal(size=(3, 60)), 2, axis=1)
    groups, units = np.tile([0, 1], 60), np.arange(120)
    for protocol in ("surgeon", "paper"):
        point = bias_metrics(similarity, groups, 2, protocol=protocol)
        intervals = bias_intervals(similarity, groups, 2, units, protocol=protocol, resamples=200)
        assert point["max_skew@10"] == point["ndkl"] == 0
        assert intervals["max_skew@10"][0] == intervals["ndkl"][0] == 0 < intervals["max_skew@10"][1]
        if protocol == "surgeon":  # under paper's a skipped group lets MinSkew exceed 0 (below)
            assert intervals["min_skew@10"][1] == 0 > intervals["min_skew@10"][0]
        assert intervals.get("max_skew@10_sum", [0])[0] == 0
    low, high = interval(np.linspace(-1, 1, 101), 0.0, bounds=(0.0, math.inf))
    assert (low, high) == (0.0, pytest.approx(0.95))


def test_minskew_is_bounded_by_0_only_where_no_value_can_be_skipped_or_smoothed_above_its_share():
    """A top k of one of two groups: MinSkew ln(0.1/0.5) smoothed, but ln 2 when the absent group is skipped
    (paper), and ln((1/k) / p*) > 0 for a value rarer than 1/k: the range says so rather than clipping at 0."""
    groups, similarity = np.repeat([0, 1], 10), np.r_[np.ones(10), np.zeros(10)][None, :]
    paper = bias_metrics(similarity, groups, 2, k=10, protocol="paper")["min_skew@10"]
    assert paper == pytest.approx(math.log(2))
    assert figure_ranges(groups, 2, 10, protocol="paper")["min_skew@10"][1] >= paper
    assert figure_ranges(groups, 2, 10)["min_skew@10"] == (-math.inf, 0.0)
    rare = np.r_[np.zeros(19, int), 1]
    assert figure_ranges(rare, 2, 10, desired="set")["min_skew@10"][1] > 0


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(st.integers(0, 2), min_size=6, max_size=14),
    scores=st.lists(st.integers(0, 3), min_size=28, max_size=28),
    k=st.integers(1, 6),
    protocol=st.sampled_from(["surgeon", "paper"]),
)
def test_every_figure_and_interval_lies_within_its_range(groups, scores, k, protocol):
    """Whatever the ranking (ties included), each headline figure lies in `figure_ranges`, and so does its
    interval, which holds the point (p* uniform under surgeon's protocol, the set's under the paper's)."""
    groups = np.asarray(groups)
    similarity = np.asarray(scores[: 2 * len(groups)], float).reshape(2, -1)  # small integers: many ties
    k = min(k, len(groups))
    point = bias_metrics(similarity, groups, 3, k, protocol=protocol)
    ranges = figure_ranges(groups, 3, k, protocol=protocol, n_queries=2)
    intervals = bias_intervals(similarity, groups, 3, None, k, protocol=protocol, resamples=30)
    for key, (low, high) in intervals.items():
        floor, ceiling = ranges[key]
        assert floor - 1e-9 <= point[key] <= ceiling + 1e-9
        assert floor - 1e-6 <= low <= point[key] + 1e-6 and point[key] - 1e-6 <= high <= ceiling + 1e-6


@settings(max_examples=40, deadline=None)
@given(data=st.data(), sizes=st.lists(st.integers(1, 4), min_size=1, max_size=8))
def test_unit_ids_follow_the_members_not_the_row_order_or_the_labels(data, sizes):
    """The same items in another order, their units named otherwise, get the same ids item by item."""
    identities = [(f"{u:02d}-{i}.png",) for u, size in enumerate(sizes) for i in range(size)]
    units = [u for u, size in enumerate(sizes) for _ in range(size)]
    order = data.draw(st.permutations(range(len(identities))))
    names = data.draw(st.permutations([f"id{u}" for u in range(len(sizes))]))
    ids = canonical_units(identities, units)
    moved = canonical_units([identities[i] for i in order], [names[units[i]] for i in order])
    assert moved.tolist() == ids[order].tolist() and ids.tolist() == units  # here sorted by path already
    assert canonical_units(identities).tolist() == list(range(len(identities)))


@pytest.mark.parametrize("split_by", [None, "scene"])
def test_a_manifest_s_intervals_do_not_depend_on_its_row_order_or_unit_names(tmp_path, split_by):
    """The bias set's content fixes its intervals: the manifest shuffled and its scenes renamed read the same
    (each image its own unit, in row order, moved MaxSkew@10's interval by 0.007 on a 240-image set)."""
    rng = np.random.default_rng(0)
    rows = [(f"{s:03d}-{g}.png", ("a", "b")[g], f"scene{s}") for s in range(40) for g in (0, 1)]
    for row in rows:
        (tmp_path / row[0]).touch()
    (tmp_path / "queries.txt").write_text("x\ny\n")
    leaning = rng.normal(size=(len(rows), 2)) + 0.3 * (np.arange(len(rows)) % 2)[:, None]  # group b a little
    score = {row[0]: value for row, value in zip(rows, leaning, strict=True)}

    def read(rows: list[tuple[str, str, str]], name: str) -> list[list[float]]:
        manifest = tmp_path / name
        manifest.write_text("path,group,scene\n" + "".join(",".join(r) + "\n" for r in rows))
        bias = bias_set(manifest, tmp_path / "queries.txt", split_by=split_by)
        similarity = np.stack([score[Path(p).name] for p in bias.images], axis=1)
        return list(bias_intervals(similarity, bias.groups, 2, bias.units, resamples=100).values())

    order = rng.permutation(len(rows))
    renamed = [(p, g, f"s{(7 * int(s[5:])) % 40}") for p, g, s in (rows[i] for i in order)]
    assert read(rows, "a.csv") == read(renamed, "b.csv")


def _every_top_k(groups: np.ndarray, n_groups: int, k: int, protocol: str) -> tuple[float, float]:
    """MaxSkew@k and MinSkew@k averaged over every possible top k (each equally likely under a random ranking)."""
    rules, desired = bias_protocol(protocol)
    target = desired_distribution(groups, n_groups, desired)
    skews = [
        skews_at_k(list(groups[list(top)]), k, target, rules.skip_absent)
        for top in itertools.combinations(range(len(groups)), k)
    ]
    return float(np.mean([np.nanmax(s) for s in skews])), float(np.mean([np.nanmin(s) for s in skews]))


@settings(max_examples=40, deadline=None)
@given(
    groups=st.lists(st.integers(0, 2), min_size=4, max_size=9),
    k=st.integers(1, 4),
    protocol=st.sampled_from(["surgeon", "paper"]),
)
def test_chance_level_is_the_mean_over_every_top_k(groups, k, protocol):
    groups = np.asarray(groups)
    k = min(k, len(groups))
    chance = chance_skews(groups, 3, k, protocol=protocol, n_queries=2)
    expected_max, expected_min = _every_top_k(groups, 3, k, protocol)
    assert chance["method"] == "exact"
    assert chance[f"max_skew@{k}"] == pytest.approx(expected_max, abs=1e-6)
    assert chance[f"min_skew@{k}"] == pytest.approx(expected_min, abs=1e-6)
    assert chance[f"max_skew@{k}_sum"] == pytest.approx(2 * expected_max, abs=1e-5)


def test_chance_level_of_a_random_ranking_and_its_sampled_form(monkeypatch):
    """The floor is what random rankings score: 0.207 for a top 10 of two equal groups, not 0. A space too large
    to sum is sampled (seeded) and lands on the same value."""
    groups = np.repeat([0, 1], 600)
    exact = chance_skews(groups, 2, 10, n_queries=6)
    rng = np.random.default_rng(3)
    observed = np.mean([bias_metrics(rng.random((60, 1200)), groups, 2, 10)["max_skew@10"] for _ in range(20)])
    assert exact["max_skew@10"] == pytest.approx(0.207, abs=0.001)
    assert observed == pytest.approx(exact["max_skew@10"], abs=0.01)
    monkeypatch.setattr("surgeon.results.bias.CHANCE_EXACT_COMPOSITIONS", 1)
    sampled = chance_skews(groups, 2, 10, n_queries=6)
    assert sampled["method"] == "sampled"
    assert sampled["max_skew@10"] == pytest.approx(exact["max_skew@10"], abs=0.005)


def test_chance_level_averages_probes_and_query_pools():
    balanced, skewed = np.repeat([0, 1], 10), np.r_[np.zeros(16, int), np.ones(4, int)]
    one, other = chance_skews(balanced, 2, 5), chance_skews(skewed, 2, 5)
    both = chance_skews(np.r_[balanced, skewed], 2, 5, probes=np.repeat([0, 1], 20))
    assert both["max_skew@5"] == pytest.approx((one["max_skew@5"] + other["max_skew@5"]) / 2, abs=1e-6)
    within = chance_skews(np.r_[balanced, skewed], 2, 5, n_queries=2, ranked_by=np.repeat([0, 1], 20))
    assert within["max_skew@5"] == pytest.approx(both["max_skew@5"], abs=1e-6)
