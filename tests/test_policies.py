"""Policies select the right heads, deterministically, and refuse bad options."""

from __future__ import annotations

import numpy as np
import pytest

from surgeon.core.errors import InvalidInput, NotFound
from surgeon.model.heads import HeadRef
from surgeon.ranking.rank import HeadRank, Ranking
from surgeon.selection.policies import POLICIES, BiasMeasure, DebiasData, PolicyOptions, debias_bound

CCS = {  # (layer, head): (ccs, label, variance)
    (2, 0): (5, "colors", 0.9),
    (2, 1): (5, "shapes", 0.5),
    (2, 2): (1, "colors", 0.2),
    (2, 3): (0, "none", 0.1),
    (3, 0): (5, "positions", 0.7),
    (3, 1): (3, "colors", 0.4),
    (3, 2): (1, "sizes", 0.3),
    (3, 3): (4, "shapes", 0.6),
}


@pytest.fixture
def ranking() -> Ranking:
    heads = [
        HeadRank(layer, head, ["t"] * 5, [1.0] * 5, label, [True] * ccs + [False] * (5 - ccs), ccs, var, 5)
        for (layer, head), (ccs, label, var) in CCS.items()
    ]
    return Ranking(
        model={"name": "toy", "pretrained": None, "weights_sha256": "x"},
        images={},
        layers=[2, 3],
        n_heads=4,
        m=5,
        span_rank=80,
        pool={},
        judge="lexicon",
        heads=heads,
    )


def names(selection) -> list[str]:
    return [h.name for h in selection.heads]


def select(name: str, ranking: Ranking, **options):
    return POLICIES.get(name).select(ranking, PolicyOptions(**options))


def test_top_and_bottom_k_with_deterministic_ties(ranking):
    assert names(select("top-k", ranking, k=3)) == ["L2.H0", "L3.H0", "L2.H1"]  # CCS 5 ties by variance
    assert names(select("bottom-k", ranking, k=3)) == ["L2.H3", "L2.H2", "L3.H2"]
    assert "top 3" in select("top-k", ranking, k=3).reasons["L2.H0"]


def test_high_low_threshold_concept(ranking):
    assert sorted(names(select("high", ranking))) == ["L2.H0", "L2.H1", "L3.H0"]
    assert sorted(names(select("low", ranking))) == ["L2.H2", "L2.H3", "L3.H2"]
    assert sorted(names(select("threshold", ranking, min_ccs=4))) == ["L2.H0", "L2.H1", "L3.H0", "L3.H3"]
    assert sorted(names(select("concept", ranking, concept="shapes"))) == ["L2.H1", "L3.H3"]


def test_random_excludes_high_heads_and_depends_on_seed(ranking):
    high = set(names(select("high", ranking)))
    draws = {tuple(names(select("random", ranking, k=3, seed=s))) for s in range(8)}
    assert all(not high & set(d) for d in draws)
    assert len(draws) > 1
    assert names(select("random", ranking, k=3, seed=1)) == names(select("random", ranking, k=3, seed=1))
    with pytest.raises(InvalidInput, match="not high-CCS"):
        select("random", ranking, k=6)


def test_explicit_heads_and_paper_presets(ranking):
    sel = select("heads", ranking, heads="L3.H1,L2.H0")
    assert names(sel) == ["L2.H0", "L3.H1"] and "CCS 5" in sel.reasons["L2.H0"]
    paper = select("paper-high", ranking, model_name="ViT-B-32", pretrained="openai")
    assert HeadRef(11, 5) in paper.heads and len(paper.heads) == 8
    with pytest.raises(NotFound, match="no paper preset"):
        select("paper-low", ranking, model_name="toy")


@pytest.mark.parametrize(
    ("policy", "options", "message"),
    [
        ("top-k", {"k": 0}, "out of range"),
        ("top-k", {"k": 9}, "out of range"),
        ("bottom-k", {}, "needs --k"),
        ("heads", {"heads": "L99.H3,foo"}, "malformed head"),
        ("concept", {"concept": "weather"}, "no head is labelled 'weather'"),
        ("threshold", {"min_ccs": 7}, "between 0 and 5"),
        ("debias", {}, "needs a validation set"),
    ],
)
def test_bad_options(ranking, policy, options, message):
    with pytest.raises(InvalidInput, match=message):
        select(policy, ranking, **options)
    with pytest.raises(InvalidInput, match="unknown policy"):
        POLICIES.get("prune-everything")


def planted(effects: dict[HeadRef, float], seed: int, n_scenes: int = 300):
    """A bias split with a planted bias: each scene rendered once per group, every query leaning to group 0 by
    a strength that removing a head lowers by its `effects` share; every head, planted or not, also perturbs
    the similarities with its own noise (what a search that fits noise would pick up)."""
    rng = np.random.default_rng(seed)
    groups, units = np.tile([0, 1], n_scenes), np.repeat(np.arange(n_scenes), 2)
    scene = np.repeat(rng.normal(0, 1, (3, n_scenes)), 2, axis=1)
    base = scene + rng.normal(0, 0.3, scene.shape)
    noise = {HeadRef(layer, head): rng.normal(0, 0.15, scene.shape) for layer in (2, 3) for head in range(4)}
    calls: list[list[HeadRef]] = []

    def similarity(heads: list[HeadRef]) -> np.ndarray:
        calls.append(list(heads))
        strength = 1.0 - sum(effects.get(h, 0.0) for h in heads)
        return base + 0.8 * strength * (groups == 0) + sum((noise[h] for h in heads), np.zeros(scene.shape))

    # MaxSkew@50: at k = 10, 300 scenes cannot tell a 35% effect from a search-only 15% one (the toy's lesson)
    return BiasMeasure(f"planted {seed}", similarity, groups, 2, units, k=50), calls


def debias_data(
    effects: dict[HeadRef, float],
    cost: dict[HeadRef, float] | None = None,
    seed: int = 0,
    search_only: dict[HeadRef, float] | None = None,
):
    """Search and stop splits with the same planted effects; `search_only` effects exist on the search split
    alone (a head that happens to fit its sample)."""
    search, search_calls = planted({**effects, **(search_only or {})}, seed)
    stop, stop_calls = planted(effects, seed + 100)
    steps: list[int] = []

    def accuracy(heads: list[HeadRef]) -> float:
        return 0.9 - sum((cost or {}).get(h, 0.0) for h in heads)

    data = DebiasData(search, stop, accuracy, advance=steps.append)
    return data, search_calls, stop_calls, steps


def test_debias_keeps_the_planted_heads_and_stops_on_the_stop_split(ranking):
    """L3.H1 and L2.H2 carry the bias (60% and 35% of it); L2.H0 lowers it (15%) on the search split only (it fits
    that sample); the other heads add noise. The search takes L3.H1, then L2.H2, then tries L2.H0 and stops:
    it does not improve the stop split by more than its standard error."""
    data, search_calls, stop_calls, steps = debias_data(
        {HeadRef(3, 1): 0.6, HeadRef(2, 2): 0.35}, search_only={HeadRef(2, 0): 0.15}
    )
    sel = select("debias", ranking, k=4, measure=data)
    assert names(sel) == ["L2.H2", "L3.H1"]
    assert [s.get("head") for s in sel.details["steps"]] == ["L3.H1", "L2.H2", "L2.H0"]
    assert sel.details["stopped"].startswith("asked for up to 4 head(s), pruned 2: the next head, L2.H0, lowered")
    assert "not more than its standard error" in sel.details["stopped"]
    assert "on the stop split" in sel.reasons["L3.H1"] and set(sel.details["candidates"]) >= {"L3.H1", "L2.H2"}
    # every measurement is counted, within the bound announced before the search
    assert len(steps) <= debias_bound(len(ranking.heads), 4, 8) and len(steps) == sum(steps)
    assert len(search_calls) + len(stop_calls) <= len(steps)


def test_debias_accuracy_budget_and_nothing_to_find(ranking):
    """L3.H1 removes most of the bias but costs 2 points: out of a 1-point budget (the default), so the search
    keeps L2.H2 alone; with a 3-point budget it takes L3.H1. Noise alone selects nothing, and says why."""
    cost = {HeadRef(3, 1): 0.02}
    data, *_ = debias_data({HeadRef(3, 1): 0.6, HeadRef(2, 2): 0.35}, cost)
    sel = select("debias", ranking, k=2, measure=data)
    assert names(sel) == ["L2.H2"] and sel.details["steps"][0]["over_accuracy_budget"] == ["L3.H1"]
    data, *_ = debias_data({HeadRef(3, 1): 0.6, HeadRef(2, 2): 0.35}, cost)
    assert "L3.H1" in names(select("debias", ranking, k=2, measure=data, max_acc_drop=3.0))
    data, *_ = debias_data({})
    with pytest.raises(InvalidInput, match="(no head lowers|pruned no head)"):
        select("debias", ranking, k=2, measure=data)


@pytest.mark.parametrize(
    ("model", "tag", "layers", "heads_per_layer"),
    [("ViT-B-32", "openai", range(0, 12), 12), ("ViT-L-14", "openai", range(20, 24), 16)],
)
def test_paper_random_excludes_the_papers_high_heads_and_draws_from_its_layers(
    ranking, model, tag, layers, heads_per_layer
):
    high = set(select("paper-high", ranking, model_name=model, pretrained=tag).heads)
    draws = [select("paper-random", ranking, model_name=model, pretrained=tag, seed=s).heads for s in range(20)]
    assert all(len(d) == len(high) and not high & set(d) for d in draws)
    drawn = {h for d in draws for h in d}
    assert {h.layer for h in drawn} == set(layers) and max(h.head for h in drawn) < heads_per_layer
    assert draws[3] == select("paper-random", ranking, model_name=model, pretrained=tag, seed=3).heads
    with pytest.raises(NotFound, match="no paper preset"):
        select("paper-random", ranking, model_name="toy")


def test_the_prune_help_names_every_registered_policy():
    """The CLI's help lists the registry (light to import: no torch, no numpy at start-up)."""
    import typing

    from surgeon import cli

    help_text = typing.get_type_hints(cli.prune, include_extras=True)["policy"].__metadata__[0].help
    assert sorted(name.strip() for name in help_text.split(",")) == POLICIES.names()


def test_random_without_k_draws_as_many_as_the_high_ccs_set(ranking):
    """The paper's control, asked of the policy itself (a study and `prune` alike; the study restated it)."""
    high = set(names(select("high", ranking)))
    drawn = names(select("random", ranking, seed=2))
    assert len(drawn) == len(high) and not high & set(drawn)
    assert POLICIES.get("random").default_k == "high-CCS count" and POLICIES.get("top-k").default_k is None


def test_callers_ask_a_policys_traits_not_its_name():
    """The traits a caller branches on, one per policy; none of prune, api and study compares names."""
    from pathlib import Path

    import surgeon

    traits = {
        name: (p.reads_ranking, p.seeded, p.preset, p.measures)
        for name, p in ((n, POLICIES.get(n)) for n in POLICIES.names())
    }
    assert traits["heads"] == (False, False, False, False) and traits["debias"] == (True, False, False, True)
    assert traits["paper-random"] == (False, True, True, False) and traits["equal-low"] == (True, True, False, False)
    assert all(POLICIES.get(n).description for n in POLICIES.names())
    package = Path(surgeon.__file__).parent
    for module in ("pruning/prune.py", "api.py", "studies/study.py"):
        text = (package / module).read_text(encoding="utf-8")
        for name in POLICIES.names():
            assert f'== "{name}"' not in text and f'"{name}" in' not in text, (module, name)
        assert 'startswith("paper-")' not in text, module


def test_selection_leaves_the_options_as_they_were(ranking):
    """prune hands a measuring policy its splits through a copy: the caller's options keep no evaluator."""
    from surgeon.pruning.prune import select_heads

    options = PolicyOptions(k=2)
    data, search_calls, _, _ = debias_data({})
    with pytest.raises(InvalidInput, match="pruned no head|no head lowers"):  # nothing planted: measured, refused
        select_heads(ranking, POLICIES.get("debias"), options, data)
    assert search_calls and options.measure is None
    with pytest.raises(InvalidInput, match="the top-k policy needs a ranking"):
        select_heads(None, POLICIES.get("top-k"), options)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--heads", "L0.H5"], "--heads"),  # was: ignored, and the default debias pruned L0.H7
        (["--policy", "high", "--k", "2"], "--k"),
        (["--policy", "top-k", "--k", "2", "--concept", "colors"], "--concept"),
        (["--policy", "heads", "--heads", "L0.H1", "--min-ccs", "3"], "--min-ccs"),
    ],
)
def test_a_selection_option_the_policy_does_not_read_is_refused(args, flag):
    from tests.conftest import run_cli

    result = run_cli("prune", *args, "--out", "/nonexistent/never-written")
    assert result.returncode == 2 and f"{flag} is not read by the" in result.stderr, result.stderr
