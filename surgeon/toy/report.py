"""`surgeon toy report`: how the bundled toy model meets its targets, against the world's ground truth.

- zero-shot top-1 per factor on the held-out split (target >= 85% each);
- MaxSkew@10 on the counterfactual bias probe, averaged over the neutral queries (target >= 0.3), and its
  direction: the share of each shape query's top 10 that wears the outline the shape leans to in training
  (0.5 = no direction; a model that ignores the outline can still get a MaxSkew, never a direction);
- heads with CCS >= 4 (toy pool, lexicon judge) for the trained model and a random-init one of the same config;
- ground truth: for every analysed head, the factor whose labels explain the largest share of the variance of
  the head's direct contributions (eta squared); agreement of the CCS label with it (target >= 80% for
  heads with CCS >= 4)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from surgeon.decompose import decompose
from surgeon.images import toy_images
from surgeon.load import LoadedModel, build_clip, weights_hash
from surgeon.pools import load_pool
from surgeon.rank import Ranking, rank_heads
from surgeon.validate import toy_suite, validate
from surgeon.zeroshot import uint8_to_tensor

TARGETS = {"min_factor_acc1": 0.85, "min_max_skew@10": 0.3, "min_specialised_heads": 6, "min_agreement": 0.8}


def random_init_like(loaded: LoadedModel, seed: int = 0) -> LoadedModel:
    """The same architecture with fresh random weights: the control for head specialisation."""
    torch.manual_seed(seed)
    model = build_clip(loaded.model_cfg).to(loaded.device).eval()
    return replace(
        loaded, model=model, name=f"{loaded.name} (random init, seed {seed})", weights_hash=weights_hash(model)
    )


def factor_of_concept(concept: str, factors: tuple[str, ...]) -> str | None:
    return next((f for f in factors if concept.startswith(f)), None)


def ground_truth(loaded: LoadedModel, layers: list[int], n: int = 1000) -> dict[str, dict[str, float]]:
    """head name -> {factor: eta^2}: share of the head's contribution variance explained by each factor."""
    from surgeon.toy import world

    sample = world.get_world().sample(n, "test", seed=7)
    pixels = uint8_to_tensor(sample.images, loaded.preprocess_cfg["mean"], loaded.preprocess_cfg["std"])
    with torch.no_grad():
        heads = (
            torch.cat(
                [
                    decompose(loaded.model.visual, pixels[i : i + 256].to(loaded.device), tuple(layers)).heads
                    for i in range(0, n, 256)
                ]
            )
            .double()
            .cpu()
        )
    centred = heads - heads.mean(0)
    total = centred.pow(2).sum((0, 3))  # (layers, heads)
    shares: dict[str, dict[str, float]] = {}
    for factor, labels in sample.labels.items():
        between = torch.zeros_like(total)
        for value in np.unique(labels):
            members = centred[torch.as_tensor(labels == value)]
            between += len(members) * members.mean(0).pow(2).sum(-1)
        explained = (between / total.clamp_min(1e-30)).numpy()
        for li, layer in enumerate(layers):
            for h in range(heads.shape[2]):
                shares.setdefault(f"L{layer}.H{h}", {})[factor] = round(float(explained[li, h]), 4)
    return shares


def agreement(ranking: Ranking, truth: dict[str, dict[str, float]], factors: tuple[str, ...]) -> dict:
    def rate(heads) -> float | None:
        hits = [factor_of_concept(h.label, factors) == max(truth[h.name], key=truth[h.name].get) for h in heads]
        return round(float(np.mean(hits)), 4) if hits else None

    high = [h for h in ranking.heads if h.ccs >= 4]
    rest = [h for h in ranking.heads if h.ccs < 4]
    return {"ccs>=4": rate(high), "ccs<4": rate(rest), "n_ccs>=4": len(high), "n_ccs<4": len(rest)}


def toy_report(loaded: LoadedModel, n_images: int = 2000, quiet: bool = True) -> dict:
    """Every figure of the toy model's targets, measured now."""
    from surgeon.toy import world

    suite = toy_suite()
    validation = validate(loaded, suite)
    accuracy = {
        r["dataset"].removeprefix("toy/"): r["metrics"]["acc1"]
        for r in validation["results"]
        if r["task"] == "zeroshot_classification"
    }
    skew = validation["summary"]["max_skew@10"]
    bias = next(r["metrics"] for r in validation["results"] if r["task"] == "bias")
    majority = world.get_world().cfg.majority_group
    direction = float(
        np.mean([s[majority(q)] for q, s in zip(bias["queries"], bias["group_share@10_per_query"], strict=True)])
    )
    pool = load_pool("toy", toy=True)
    images = toy_images(n_images)
    trained = rank_heads(loaded, images, pool, quiet=quiet)
    control = rank_heads(random_init_like(loaded), images, pool, quiet=quiet)
    factors = tuple(world.FACTORS)
    truth = ground_truth(loaded, trained.layers)
    return {
        "model": loaded.identity,
        "zero_shot_acc1": accuracy,
        "max_skew@10": skew,
        "bias_majority_share@10": direction,
        "ndkl": validation["summary"]["ndkl"],
        "heads_ccs>=4": {
            "trained": sum(h.ccs >= 4 for h in trained.heads),
            "random_init": sum(h.ccs >= 4 for h in control.heads),
            "analysed": len(trained.heads),
        },
        "ccs_distribution": {"trained": trained.ccs_distribution(), "random_init": control.ccs_distribution()},
        "ground_truth_agreement": agreement(trained, truth, factors),
        "heads": [
            {
                "head": h.name,
                "label": h.label,
                "ccs": h.ccs,
                "truth": max(truth[h.name], key=truth[h.name].get),
                "eta2": truth[h.name],
            }
            for h in trained.sorted_heads()
        ],
        "targets": TARGETS,
        "met": {
            "accuracy": all(a >= TARGETS["min_factor_acc1"] for a in accuracy.values()),
            "bias": skew >= TARGETS["min_max_skew@10"],
            "specialisation": sum(h.ccs >= 4 for h in trained.heads) >= TARGETS["min_specialised_heads"],
            "agreement": (agreement(trained, truth, factors)["ccs>=4"] or 0) >= TARGETS["min_agreement"],
        },
    }
