"""Policies select the right heads, deterministically, and refuse bad options."""

from __future__ import annotations

import pytest

from surgeon.errors import InvalidInput, NotFound
from surgeon.heads import HeadRef
from surgeon.policies import POLICIES, PolicyOptions
from surgeon.rank import HeadRank, Ranking

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
    return POLICIES.get(name)(ranking, PolicyOptions(**options))


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


def test_debias_greedy_uses_measured_effects(ranking):
    """Bias falls by 0.2 for each of L3.H1 and L2.H2; L3.H1 also costs accuracy, L2.H0 raises bias."""
    calls = []

    def evaluate(heads):
        calls.append(list(heads))
        bias = 0.8 - 0.2 * (HeadRef(3, 1) in heads) - 0.2 * (HeadRef(2, 2) in heads) + 0.1 * (HeadRef(2, 0) in heads)
        acc = 0.9 - 0.01 * (HeadRef(3, 1) in heads) - 0.001 * (HeadRef(2, 2) in heads)
        return acc, bias

    sel = select("debias", ranking, k=3, evaluate=evaluate)
    assert names(sel) == ["L2.H2", "L3.H1"]  # the cheaper one first, then stop: nothing else lowers bias
    assert "0.800 -> 0.600" in sel.reasons["L2.H2"]
    assert sel.details["steps"][1]["bias"] == pytest.approx(0.4)
    # an accuracy budget of 0.5 points excludes L3.H1 (1 point)
    assert names(select("debias", ranking, k=3, evaluate=evaluate, max_acc_drop=0.5)) == ["L2.H2"]


def test_debias_prefers_the_larger_bias_drop_over_an_accuracy_gain(ranking):
    """L2.H2 raises accuracy but barely moves bias; L3.H1 removes most of it for half a point. Together they
    are worse than L3.H1 alone, so the selection is L3.H1 only."""

    def evaluate(heads):
        a, b = HeadRef(3, 1) in heads, HeadRef(2, 2) in heads
        bias = {(False, False): 0.8, (True, False): 0.5, (False, True): 0.75, (True, True): 0.55}[(a, b)]
        return 0.9 - 0.005 * a + 0.01 * b, bias

    sel = select("debias", ranking, k=3, evaluate=evaluate)
    assert names(sel) == ["L3.H1"] and sel.details["steps"][-1]["bias"] == pytest.approx(0.5)


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
    """The CLI cannot import the registry at start-up (it pulls torch), so its help lists the names: kept whole."""
    import typing

    from surgeon import cli

    help_text = typing.get_type_hints(cli.prune, include_extras=True)["policy"].__metadata__[0].help
    assert sorted(name.strip() for name in help_text.split(",")) == POLICIES.names()
