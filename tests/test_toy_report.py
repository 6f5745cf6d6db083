"""The toy report's control (vision tower re-initialised, text tower kept), chance baseline and ground-truth
agreement; on a tiny real open_clip model and the real lexicon judge."""

from __future__ import annotations

import torch

from surgeon.model.load import load_model
from surgeon.ranking.judges.lexicon import LexiconJudge
from surgeon.ranking.rank import HeadRank, Ranking
from surgeon.studies.toy_report import agreement, chance_ccs, random_vision_like

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
