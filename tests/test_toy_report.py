"""The toy report's control (vision tower re-initialised, text tower kept), chance baseline, ground-truth
agreement and the paper's claim (head sets zero-ablated on the probe); on a tiny real open_clip model and the
real lexicon judge."""

from __future__ import annotations

import copy

import torch

from surgeon.model.heads import HeadRef
from surgeon.model.hooks import vision_blocks, vision_tower
from surgeon.model.load import load_model
from surgeon.model.surgery import zero_heads
from surgeon.ranking.judges.lexicon import LexiconJudge
from surgeon.ranking.rank import HeadRank, Ranking
from surgeon.studies.toy_report import agreement, chance_ccs, paper_claim, random_vision_like
from surgeon.validation.validate import ValidationSuite, toy_probe, validate
from tests.conftest import save_local_dir, tiny_config

FACTORS = ("color", "shape", "texture")
TAXONOMY = {"concepts": {"colors": {"terms": ["red", "blue"]}, "animals": {"terms": ["dog", "cat"]}}}


def test_control_re_initialises_the_vision_tower_only(tiny_default_dir):
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    original = loaded.model.state_dict()
    # (the fixture itself is a seed-0 random init, so the control seeds here are others)
    controls = [random_vision_like(loaded, seed).model.state_dict() for seed in (5, 6, 5)]
    for name, tensor in original.items():
        if name.startswith("visual."):
            if tensor.std() > 0:  # constant initialisations (layer norms) may coincide
                assert not torch.equal(controls[0][name], tensor), name
                assert not torch.equal(controls[0][name], controls[1][name]), name
        else:
            assert all(torch.equal(c[name], tensor) for c in controls), name
    assert all(torch.equal(controls[0][n], controls[2][n]) for n in original)  # seeded
    control = random_vision_like(loaded, 1)
    assert control.weights_hash != loaded.weights_hash and "random vision tower, seed 1" in control.name
    assert torch.equal(control.encode_text(["a red dog"]), loaded.encode_text(["a red dog"]))  # the judge's tool


def test_chance_baseline_by_hand():
    judge = LexiconJudge(TAXONOMY)
    # pairs from {red, blue, dog, cat}: 2 of the 6 share a concept (CCS 2), 4 tie colors with animals (CCS 1) -> 4/3
    mixed = chance_ccs(judge, ["red", "blue", "dog", "cat"], m=2, draws=6000)
    assert abs(mixed["mean_ccs"] - 4 / 3) < 0.03 and mixed["p_ccs>=4"] == 0
    pure = chance_ccs(judge, ["red", "blue", "red dog", "blue cat", "red cat", "blue dog"], m=5, draws=200)
    assert (pure["mean_ccs"], pure["p_ccs>=4"]) == (5.0, 1.0)  # every text is about colors
    assert chance_ccs(judge, ["red", "dog", "x", "y"], 2, draws=50, seed=3) == chance_ccs(
        judge, ["red", "dog", "x", "y"], 2, draws=50, seed=3
    )


def _head(layer: int, head: int, label: str, ccs: int) -> HeadRank:
    return HeadRank(layer, head, ["t"] * 5, [1.0] * 5, label, [True] * ccs + [False] * (5 - ccs), ccs, 1.0, 15)


def test_agreement_by_hand():
    heads = [
        _head(0, 0, "colors", 5),
        _head(0, 1, "shapes", 4),
        _head(0, 2, "textures", 2),  # the L0.H0 case: its tie now broken to textures, its truth
        _head(0, 3, "shapes", 1),
        _head(0, 4, "none", 0),
    ]
    ranking = Ranking({}, {}, [0], 5, 5, 80, {}, "lexicon", heads)
    truth = {
        "L0.H0": {"color": 0.9, "shape": 0.1, "texture": 0.0},
        "L0.H1": {"color": 0.6, "shape": 0.3, "texture": 0.1},
        "L0.H2": {"color": 0.03, "shape": 0.03, "texture": 0.94},
        "L0.H3": {"color": 0.1, "shape": 0.8, "texture": 0.1},
        "L0.H4": {"color": 0.1, "shape": 0.1, "texture": 0.8},
    }
    got = agreement(ranking, truth, FACTORS)
    assert got == {"ccs>=4": 0.5, "n_ccs>=4": 2, "ccs<4": round(2 / 3, 4), "n_ccs<4": 3}


def test_paper_claim_ablates_each_rules_heads_against_random_sets(tmp_path):
    loaded = load_model(
        f"local-dir:{save_local_dir(tmp_path / 'm', tiny_config(layers=2, image_size=48))}", device="cpu"
    )
    labels = {(0, 0): ("shapes", 5), (1, 1): ("outlines", 5), (0, 2): ("colors", 1), (1, 3): ("none", 0)}
    heads = [_head(layer, h, *labels.get((layer, h), ("sizes", 3))) for layer in (0, 1) for h in range(4)]
    trained = Ranking({}, {}, [0, 1], 4, 5, 80, {}, "lexicon", heads)
    controls = [
        Ranking({}, {}, [0, 1], 4, 5, 80, {}, "lexicon", [_head(0, 0, "outlines", 2)]),
        Ranking({}, {}, [0, 1], 4, 5, 80, {}, "lexicon", [_head(0, 0, "colors", 2)]),
    ]
    claim = paper_claim(loaded, trained, controls, draws=6)
    sets = claim["sets"]
    assert 0 <= claim["outline_zero_shot_acc1"] <= 1
    assert claim["m"] == 5 and claim["outline_heads"] == {"trained": ["L1.H1"], "random_init_per_seed": [1, 0]}
    assert sets["high (ccs = m)"]["heads"] == ["L0.H0", "L1.H1"] and sets["low (ccs <= 1)"]["heads"] == [
        "L0.H2",
        "L1.H3",
    ]
    assert sets["ccs >= 4"]["heads"] == sets["high (ccs = m)"]["heads"]
    # the removed figures are those of a copy whose heads are zeroed in its weights, validated on the same probe
    suite = ValidationSuite([], toy_probe())
    base = validate(loaded, suite)["summary"]["max_skew@10"]
    assert abs(claim["probe"]["max_skew@10"] - base) < 1e-4
    for rule in ("high (ccs = m)", "outlines"):
        ablated = copy.deepcopy(loaded)
        zero_heads(vision_blocks(vision_tower(ablated.model)), [HeadRef.parse(h) for h in sets[rule]["heads"]])
        skew = validate(ablated, suite)["summary"]["max_skew@10"]
        assert abs(sets[rule]["removed"]["max_skew@10"] - skew) < 1e-4, rule
        assert abs(sets[rule]["change_max_skew@10"] - (skew - base)) < 2e-4, rule
    # random sets are drawn once per size: two rules of two heads share theirs
    high, low = sets["high (ccs = m)"]["random_sets"], sets["low (ccs <= 1)"]["random_sets"]
    assert high == {**low, "p_as_low": high["p_as_low"]} and high["draws"] == 6
    assert all(0 <= s["random_sets"]["p_as_low"] <= 1 for s in sets.values())
