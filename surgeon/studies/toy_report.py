"""`surgeon toy report`: how the bundled toy model meets its targets, against the world's ground truth.

- zero-shot top-1 per factor on the held-out split (target >= 85% each);
- MaxSkew@10 on the counterfactual bias probe, averaged over the neutral queries (target >= 0.3), and its
  direction: the share of each shape query's top 10 that wears the outline the shape leans to in training
  (0.5 = no direction; a model that ignores the outline can still get a MaxSkew, never a direction);
- heads with CCS >= 4 (toy pool, lexicon judge) for the trained model and, as the control, the same model
  with its vision tower re-initialised (CONTROL_SEEDS) and its text tower kept: the text tower is the judge's
  instrument (TextSpan's texts are encoded with it), so only what the heads learned may differ;
- the chance baseline: the CCS of m texts drawn at random from the pool (mean and P(CCS >= 4)), what a head
  whose TextSpan picks carried no concept would score;
- ground truth: for every analysed head, the factor whose labels explain the largest share of the variance of
  the head's direct contributions (eta squared); agreement of the CCS label with it, for heads with CCS >= 4
  (target >= 80%) and CCS < 4 (a label is one concept: the judge breaks ties, surgeon.ranking.judges.lexicon);
  the outline counts as a factor here, so a head labelled `outlines` agrees when the outline explains it most;
- the paper's claim (docs/METHOD.md: high-CCS heads carry the spurious correlations that amplify bias), testable
  because some training captions name the outline (WorldConfig.outline_caption_rate): the heads labelled
  `outlines` (trained and random-vision-tower), whether the text tower tells a dark outline from a light one
  (zero-shot on the test split, OUTLINE_TEMPLATES), the heads its high rule (CCS = m) and low rule (CCS <= 1)
  select, and how MaxSkew@10 and the direction on the probe change when each set is zero-ablated, against
  RANDOM_SETS random head sets of the same size (seeded). Heads are chosen on the val split's images and the
  text pool, the change is measured on the probe: selection and measurement share no data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from surgeon.core.errors import PreconditionFailed
from surgeon.core.options import RankMethod
from surgeon.inputs.images import ImageSet, toy_images
from surgeon.inputs.pools import TextPool, load_pool
from surgeon.model.decompose import decompose
from surgeon.model.heads import HeadRef
from surgeon.model.hooks import vision_tower
from surgeon.model.load import LoadedModel, build_clip, weights_hash
from surgeon.ranking.judges.base import Judge
from surgeon.ranking.rank import Ranking, make_judge, rank_heads
from surgeon.validation.validate import (
    ClassificationSet,
    Evaluator,
    ValidationSuite,
    toy_probe,
    toy_suite,
    validate,
)
from surgeon.validation.zeroshot import uint8_to_tensor

TARGETS = {"min_factor_acc1": 0.85, "min_max_skew@10": 0.3, "min_specialised_heads": 6, "min_agreement": 0.8}
CONTROL_SEEDS = (0, 1, 2)
CHANCE_DRAWS = 20_000
RANDOM_SETS = 50  # random head sets per size behind the paper-claim section's p-values (--claim-draws)
#: the concept of the toy pool's outline lines, and the name the outline has as a ground-truth factor
OUTLINE_CONCEPT, OUTLINE_FACTOR = "outlines", "outline"
OUTLINE_TEMPLATES = ["an object with a {} outline", "a shape with a {} outline", "a {}-outlined object"]


def random_vision_like(loaded: LoadedModel, seed: int = 0) -> LoadedModel:
    """The model with a freshly initialised (seeded) vision tower and its own trained text tower."""
    torch.manual_seed(seed)
    model = build_clip(loaded.model_cfg).to(loaded.device).eval()
    text_tower = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith("visual.")}
    model.load_state_dict(text_tower, strict=False)  # every key it lacks is a vision one: those stay random
    return replace(
        loaded,
        model=model,
        name=f"{loaded.name} (random vision tower, seed {seed})",
        weights_hash=weights_hash(model),
    )


def chance_ccs(judge: Judge, lines: Sequence[str], m: int, draws: int = CHANCE_DRAWS, seed: int = 0) -> dict:
    """CCS of `draws` sets of m distinct texts drawn at random (seeded) from `lines`, judged like a head's."""
    rng = np.random.default_rng(seed)
    texts = [[lines[i] for i in rng.choice(len(lines), m, replace=False)] for _ in range(draws)]
    ccs = np.array([j.ccs for j in judge.judge(texts)])
    return {
        "draws": draws,
        "m": m,
        "mean_ccs": round(float(ccs.mean()), 4),
        "p_ccs>=4": round(float((ccs >= 4).mean()), 4),
    }


def factor_of_concept(concept: str, factors: tuple[str, ...]) -> str | None:
    return next((f for f in factors if concept.startswith(f)), None)


def ground_truth(loaded: LoadedModel, layers: list[int], n: int = 1000) -> dict[str, dict[str, float]]:
    """head name -> {factor: eta^2}: share of the head's contribution variance explained by each factor and by
    the outline (OUTLINE_FACTOR; independent of every factor on the test split)."""
    from surgeon.inputs.toy import world

    sample = world.get_world().sample(n, "test", seed=7)
    pixels = uint8_to_tensor(sample.images, loaded.preprocess_cfg["mean"], loaded.preprocess_cfg["std"])
    with torch.no_grad():
        heads = (
            torch.cat(
                [
                    decompose(vision_tower(loaded.model), pixels[i : i + 256].to(loaded.device), tuple(layers)).heads
                    for i in range(0, n, 256)
                ]
            )
            .double()
            .cpu()
        )
    centred = heads - heads.mean(0)
    total = centred.pow(2).sum((0, 3))  # (layers, heads)
    shares: dict[str, dict[str, float]] = {}
    for factor, labels in {**sample.labels, OUTLINE_FACTOR: sample.groups}.items():
        between = torch.zeros_like(total)
        for value in np.unique(labels):
            members = centred[torch.as_tensor(labels == value)]
            between += len(members) * members.mean(0).pow(2).sum(-1)
        explained = (between / total.clamp_min(1e-30)).numpy()
        for li, layer in enumerate(layers):
            for h in range(heads.shape[2]):
                shares.setdefault(f"L{layer}.H{h}", {})[factor] = round(float(explained[li, h]), 4)
    return shares


def _dominant(shares: dict[str, float]) -> str:
    """The factor that explains most of a head's variance."""
    return max(shares, key=shares.__getitem__)


def _rank(loaded: LoadedModel, images: ImageSet, pool: TextPool, quiet: bool) -> Ranking:
    ranking = rank_heads(loaded, images, pool, RankMethod(), quiet=quiet)
    if ranking is None:  # only the non-zero ranks of a torchrun job get None
        raise PreconditionFailed("the toy report runs in one process; start it without torchrun")
    return ranking


def agreement(ranking: Ranking, truth: dict[str, dict[str, float]], factors: tuple[str, ...]) -> dict:
    """Share of heads whose label is their ground-truth factor, for CCS >= 4 and CCS < 4."""
    out = {}
    for key, heads in (
        ("ccs>=4", [h for h in ranking.heads if h.ccs >= 4]),
        ("ccs<4", [h for h in ranking.heads if h.ccs < 4]),
    ):
        hits = [factor_of_concept(h.label, factors) == _dominant(truth[h.name]) for h in heads]
        out[key] = round(float(np.mean(hits)), 4) if hits else None
        out[f"n_{key}"] = len(heads)
    return out


def majority_share(result: dict, majority) -> float:
    """The bias's direction in a validation result: the share of each shape query's top 10 wearing the outline
    that shape leans to in training (`majority`: query -> group), averaged over the queries."""
    bias = next(r["metrics"] for r in result["results"] if r["task"] == "bias")
    shares = [s[majority(q)] for q, s in zip(bias["queries"], bias["group_share@10_per_query"], strict=True)]
    return float(np.mean(shares))


def _probe_bias(evaluator: Evaluator, heads: Sequence[HeadRef], majority) -> dict:
    """MaxSkew@10 on the probe with `heads` zero-ablated, and the direction (majority_share)."""
    result = evaluator.evaluate(list(heads), intervals=False)
    return {"max_skew@10": result["summary"]["max_skew@10"], "majority_share@10": majority_share(result, majority)}


def paper_claim(
    loaded: LoadedModel, trained: Ranking, controls: Sequence[Ranking], draws: int = RANDOM_SETS, seed: int = 0
) -> dict:
    """Do the paper's high-CCS heads carry the planted bias? Each rule's heads zero-ablated on the probe, the
    change of MaxSkew@10 and of the direction, against `draws` random head sets of the same size: the
    share of random sets whose removal lowers MaxSkew@10 at least as much (a one-sided permutation p-value)."""
    from surgeon.inputs.toy import world

    majority = world.get_world().cfg.majority_group
    # one probe (seed 0), keeping the stream entering every layer: a head set re-runs from its first layer
    evaluator = Evaluator(loaded, ValidationSuite([], toy_probe()), deep=True)
    base = _probe_bias(evaluator, (), majority)
    every = [HeadRef(h.layer, h.head) for h in trained.heads]
    rng = np.random.default_rng(seed)
    rules = {
        "high (ccs = m)": [h for h in trained.heads if h.ccs == trained.m],
        "low (ccs <= 1)": [h for h in trained.heads if h.ccs <= 1],
        "ccs >= 4": [h for h in trained.heads if h.ccs >= 4],
        OUTLINE_CONCEPT: [h for h in trained.heads if h.label == OUTLINE_CONCEPT],
    }
    random_of: dict[int, list[dict]] = {}
    sets = {}
    for rule, heads in rules.items():
        refs = [HeadRef(h.layer, h.head) for h in heads]
        entry: dict = {"heads": [h.name for h in heads], "n": len(heads)}
        if refs:
            removed = _probe_bias(evaluator, refs, majority)
            k = len(refs)
            if k not in random_of:  # drawn once per size, in the order the sizes first occur (seeded)
                picks = [[every[i] for i in rng.choice(len(every), k, replace=False)] for _ in range(draws)]
                random_of[k] = [_probe_bias(evaluator, d, majority) for d in picks]
            drops = np.array([r["max_skew@10"] - base["max_skew@10"] for r in random_of[k]])
            shifts = np.array([r["majority_share@10"] - base["majority_share@10"] for r in random_of[k]])
            change = removed["max_skew@10"] - base["max_skew@10"]
            entry |= {
                "removed": {key: round(v, 4) for key, v in removed.items()},
                "change_max_skew@10": round(change, 4),
                "change_majority_share@10": round(removed["majority_share@10"] - base["majority_share@10"], 4),
                "random_sets": {
                    "draws": draws,
                    "mean_change_max_skew@10": round(float(drops.mean()), 4),
                    "sd_change_max_skew@10": round(float(drops.std()), 4),
                    "mean_change_majority_share@10": round(float(shifts.mean()), 4),
                    "p_as_low": round(float((drops <= change).mean()), 4),
                },
            }
        sets[rule] = entry
    test = world.get_world().test_split()
    named = ClassificationSet(
        "toy/outline", list(world.get_world().cfg.groups), OUTLINE_TEMPLATES, test.images, test.groups
    )
    return {
        "m": trained.m,
        "outline_zero_shot_acc1": validate(loaded, ValidationSuite([named]))["summary"]["mean_acc1"],
        "probe": {key: round(v, 4) for key, v in base.items()},
        "outline_heads": {
            "trained": sets[OUTLINE_CONCEPT]["heads"],
            "random_init_per_seed": [sum(h.label == OUTLINE_CONCEPT for h in c.heads) for c in controls],
        },
        "sets": sets,
    }


def toy_report(loaded: LoadedModel, n_scored: int = 2000, quiet: bool = True, claim_draws: int = RANDOM_SETS) -> dict:
    """Every figure of the toy model's targets, measured now."""
    from surgeon.inputs.toy import world

    suite = toy_suite()
    validation = validate(loaded, suite)
    accuracy = {
        r["dataset"].removeprefix("toy/"): r["metrics"]["acc1"]
        for r in validation["results"]
        if r["task"] == "zeroshot_classification"
    }
    skew = validation["summary"]["max_skew@10"]
    direction = majority_share(validation, world.get_world().cfg.majority_group)
    pool = load_pool("toy", toy=True)
    images = toy_images(n_scored)
    trained = _rank(loaded, images, pool, quiet)
    controls = [_rank(random_vision_like(loaded, seed), images, pool, quiet) for seed in CONTROL_SEEDS]
    control_counts = [sum(h.ccs >= 4 for h in c.heads) for c in controls]
    factors = (*world.FACTORS, OUTLINE_FACTOR)
    truth = ground_truth(loaded, trained.layers)
    agree = agreement(trained, truth, factors)
    return {
        "model": loaded.identity,
        "zero_shot_acc1": accuracy,
        "max_skew@10": skew,
        "bias_majority_share@10": direction,
        "ndkl": validation["summary"]["ndkl"],
        "heads_ccs>=4": {
            "trained": sum(h.ccs >= 4 for h in trained.heads),
            "random_init": float(np.mean(control_counts)),  # the vision tower only; mean over CONTROL_SEEDS
            "random_init_per_seed": dict(zip(map(str, CONTROL_SEEDS), control_counts, strict=True)),
            "analysed": len(trained.heads),
        },
        "ccs_distribution": {
            "trained": trained.ccs_distribution(),
            "random_init": [c.ccs_distribution() for c in controls],
        },
        "chance": chance_ccs(make_judge(trained.judge, loaded, pool), pool.lines, trained.m),
        "ground_truth_agreement": agree,
        "heads": [
            {
                "head": h.name,
                "label": h.label,
                "ccs": h.ccs,
                "truth": _dominant(truth[h.name]),
                "eta2": truth[h.name],
            }
            for h in trained.sorted_heads()
        ],
        "paper_claim": paper_claim(loaded, trained, controls, claim_draws),
        "targets": TARGETS,
        "met": {
            "accuracy": all(a >= TARGETS["min_factor_acc1"] for a in accuracy.values()),
            "bias": skew >= TARGETS["min_max_skew@10"],
            "specialisation": sum(h.ccs >= 4 for h in trained.heads) >= TARGETS["min_specialised_heads"],
            "agreement": (agree["ccs>=4"] or 0) >= TARGETS["min_agreement"],
        },
    }
