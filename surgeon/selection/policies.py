"""Stage 5: pruning policies. Each takes a ranking and options and returns the heads to prune, each with
the reason it was chosen (docs/METHOD.md §2; `debias` is surgeon's bias-aware greedy selection)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.core.errors import InvalidInput, NotFound
from surgeon.core.limits import echo
from surgeon.core.registry import Registry
from surgeon.model.heads import HeadRef, parse_heads

if TYPE_CHECKING:  # the registry stays light to import: the CLI's help lists it at start-up
    import numpy as np

    from surgeon.ranking.rank import HeadRank, Ranking

# High-CCS and low-CCS heads found in the paper (docs/METHOD.md §5), keyed by (open_clip name, pretrained tag).
PAPER_HEADS: dict[tuple[str, str], dict[str, str]] = {
    ("ViT-B-32", "openai"): {
        "high": "L11.H5 L10.H8 L9.H3 L8.H11 L9.H2 L11.H1 L11.H9 L11.H7",
        "low": "L8.H5 L11.H0 L11.H8 L9.H9",
    },
    ("ViT-B-32", "datacomp_m_s128m_b4k"): {
        "high": "L9.H3 L8.H3 L11.H10 L9.H10 L10.H7 L10.H11 L8.H1 L8.H10 L11.H9 L11.H4 L11.H3",
        "low": "L11.H0 L9.H5 L11.H11 L8.H2 L11.H1 L8.H4 L9.H4 L8.H9",
    },
    ("ViT-B-16", "openai"): {
        "high": "L11.H0 L10.H5 L8.H8 L10.H7 L11.H6 L8.H5 L11.H4 L11.H3 L11.H7 L11.H11",
        "low": "L10.H6 L11.H2 L9.H3 L8.H0",
    },
    ("ViT-B-16", "laion2b_s34b_b88k"): {
        "high": "L11.H0 L9.H0 L9.H3 L10.H5 L11.H6 L11.H10 L9.H1 L11.H2 L10.H10 L8.H7 L8.H6 L11.H8 L11.H7",
        "low": "L10.H8 L9.H2 L8.H10 L8.H4 L8.H5 L10.H6",
    },
    ("ViT-L-14", "openai"): {
        "high": "L21.H13 L22.H1 L22.H9 L21.H1 L21.H15 L21.H0 L20.H2 L20.H12 L22.H5 L23.H4 L22.H15 L21.H8 "
        "L23.H10 L23.H11 L22.H2 L22.H13",
        "low": "L23.H5 L21.H3 L22.H14 L20.H15 L20.H6 L22.H6 L22.H4 L22.H0 L21.H2 L20.H4 L20.H1",
    },
    ("ViT-L-14", "laion2b_s32b_b82k"): {
        "high": "L22.H1 L21.H1 L22.H5 L21.H9 L22.H3 L22.H6 L22.H12 L22.H0 L23.H6 L23.H8 L21.H11 L23.H4 L22.H13 "
        "L21.H0 L22.H10 L21.H5 L22.H8 L23.H5 L23.H9 L20.H14 L20.H4",
        "low": "L23.H1 L21.H6 L20.H13",
    },
}


@dataclass
class Selection:
    heads: list[HeadRef]
    reasons: dict[str, str]  # head name -> why it was chosen
    details: dict = field(default_factory=dict)


@dataclass
class PolicyOptions:
    k: int | None = None
    seed: int = 0
    heads: str | None = None
    concept: str | None = None
    min_ccs: int | None = None
    max_acc_drop: float | None = None
    model_name: str = ""
    pretrained: str | None = None
    # debias: the search and stop splits it measures on, supplied by the caller (prune)
    measure: DebiasData | None = None
    candidates: int = 8  # debias: heads kept for the greedy search after measuring each alone

    def __post_init__(self):
        if self.k is not None and self.k <= 0:  # checked before any ranking work; the upper bound needs one
            raise InvalidInput(f"k={self.k} out of range: k must be at least 1")


#: a policy's selection: (ranking, options) -> heads; the ranking is None only for one that does not read it
Choose = Callable[[Any, PolicyOptions], Selection]


@dataclass(frozen=True)
class Policy:
    """A pruning policy and what its callers need to know about it, asked instead of its name."""

    name: str
    choose: Choose
    options: tuple[str, ...] = ()  # the request fields it reads (ListPolicies tells a client to set them)
    reads_ranking: bool = True  # False: `prune` skips ranking for it (minutes on a real model)
    seeded: bool = False  # draws with `seed`, so `--seeds N` can average N draws
    preset: bool = False  # names the paper's heads for the model (any layer: no cached prefix; --preset)
    measures: bool = False  # selects by measuring bias and accuracy on a search split of the validation data
    default_k: str | None = None  # what k is when not given, in words (part of a study cell's key)
    listed: bool = False  # the user lists the heads (a model card names them rather than a rule)

    @property
    def description(self) -> str:
        """The first line of its docstring: what it selects."""
        doc = (self.choose.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def check_ranking(self, ranking: Ranking | None) -> None:
        if ranking is None and self.reads_ranking:
            raise InvalidInput(f"the {self.name} policy needs a ranking", hint="rank first, or pass --ranking")

    def select(self, ranking: Ranking | None, options: PolicyOptions) -> Selection:
        """The heads to prune (a measuring policy measures on `options.measure`)."""
        self.check_ranking(ranking)
        return self.choose(ranking, options)


POLICIES: Registry[Policy] = Registry("policy")


def policy(name: str, options: tuple[str, ...] = (), **traits) -> Callable[[Choose], Choose]:
    """Register `choose` as the policy `name` with its traits (Policy's fields)."""

    def register(choose: Choose) -> Choose:
        POLICIES.register(name, options)(Policy(name, choose, options, **traits))
        return choose

    return register


def policy_names(trait: Callable[[Policy], bool]) -> list[str]:
    """The registered policies that have a trait, e.g. `policy_names(lambda p: p.seeded)` (for messages)."""
    return [name for name in POLICIES.names() if trait(POLICIES.get(name))]


def _ref(h: HeadRank) -> HeadRef:
    return HeadRef(h.layer, h.head)


def _describe(h: HeadRank) -> str:
    return f"CCS {h.ccs} ({h.label})"


def check_k(k: int, n_heads: int) -> None:
    """k heads of a ranking of n_heads: checked before any work when the ranking is a file, again at selection."""
    if not 0 < k <= n_heads:
        raise InvalidInput(f"k={k} out of range: choose 1..{n_heads} (heads in the ranking)")


def _k(options: PolicyOptions, ranking: Ranking) -> int:
    if options.k is None:
        raise InvalidInput("this policy needs --k")
    check_k(options.k, len(ranking.heads))
    return options.k


def _select(heads: list[HeadRank], why: Callable[[HeadRank], str], empty: str) -> Selection:
    if not heads:
        raise InvalidInput(empty)
    return Selection([_ref(h) for h in heads], {h.name: why(h) for h in heads})


@policy("top-k", options=("k",))
def top_k(ranking: Ranking, options: PolicyOptions) -> Selection:
    """The k heads with the highest CCS."""
    order = ranking.sorted_heads()
    k = _k(options, ranking)
    return _select(order[:k], lambda h: f"{_describe(h)}, top {k} by CCS", "no heads")


@policy("bottom-k", options=("k",))
def bottom_k(ranking: Ranking, options: PolicyOptions) -> Selection:
    """The k heads with the lowest CCS."""
    order = sorted(ranking.heads, key=lambda h: (h.ccs, h.variance, h.layer, h.head))
    k = _k(options, ranking)
    return _select(order[:k], lambda h: f"{_describe(h)}, bottom {k} by CCS", "no heads")


@policy("high")
def high(ranking: Ranking, options: PolicyOptions) -> Selection:
    """Every head with the maximum CCS (= m)."""
    heads = [h for h in ranking.sorted_heads() if h.ccs == ranking.m]
    return _select(heads, lambda h: f"{_describe(h)}: high-CCS (= {ranking.m})", "no head has the maximum CCS")


@policy("low")
def low(ranking: Ranking, options: PolicyOptions) -> Selection:
    """Every head with CCS <= 1."""
    heads = [h for h in ranking.sorted_heads() if h.ccs <= 1]
    return _select(heads, lambda h: f"{_describe(h)}: low-CCS (<= 1)", "no head has CCS <= 1")


@policy("random", options=("k", "seed", "seeds"), seeded=True, default_k="high-CCS count")
def random_heads(ranking: Ranking, options: PolicyOptions) -> Selection:
    """k random heads that are not high-CCS (the paper's control), drawn with `seed`.

    Without k, as many as the high-CCS set (the paper's control)."""
    pool = [h for h in ranking.sorted_heads() if h.ccs < ranking.m]
    k = _k(options, ranking) if options.k is not None else len(high(ranking, options).heads)
    if k > len(pool):
        raise InvalidInput(f"k={k} but only {len(pool)} heads are not high-CCS")
    chosen = random.Random(options.seed).sample(pool, k)
    return _select(
        sorted(chosen, key=lambda h: (h.layer, h.head)),
        lambda h: f"random draw (seed {options.seed}), {_describe(h)}",
        "no heads",
    )


def _equal_budget(which: str, high: list[HeadRef], low: list[HeadRef], seed: int, source: str) -> Selection:
    """The paper's experiment 3: n = min(#high, #low) heads from the `which` list, drawn with `seed` when that
    list is the longer one (the shorter is taken whole), so that high and low cut the same number of heads."""
    if not high or not low:
        raise InvalidInput(f"an equal budget needs both lists: {len(high)} high-CCS and {len(low)} low-CCS heads")
    n = min(len(high), len(low))
    pool = high if which == "high" else low
    chosen = sorted(random.Random(seed).sample(pool, n)) if len(pool) > n else sorted(pool)
    how = f"drawn with seed {seed} from" if len(pool) > n else "all of"
    why = f"equal budget of {n} (min of {len(high)} high, {len(low)} low): {how} the {source} {which}-CCS list"
    return Selection(chosen, {r.name: why for r in chosen}, {"budget": n, "high": len(high), "low": len(low)})


def _ranking_lists(ranking: Ranking) -> tuple[list[HeadRef], list[HeadRef]]:
    heads = ranking.sorted_heads()
    return [_ref(h) for h in heads if h.ccs == ranking.m], [_ref(h) for h in heads if h.ccs <= 1]


@policy("equal-high", options=("seed", "seeds"), seeded=True)
def equal_high(ranking: Ranking, options: PolicyOptions) -> Selection:
    """min(#high, #low) high-CCS heads (the paper's equal budgets; drawn with `seed` if there are more)."""
    return _equal_budget("high", *_ranking_lists(ranking), options.seed, "ranking's")


@policy("equal-low", options=("seed", "seeds"), seeded=True)
def equal_low(ranking: Ranking, options: PolicyOptions) -> Selection:
    """min(#high, #low) low-CCS heads (the paper's equal budgets; drawn with `seed` if there are more)."""
    return _equal_budget("low", *_ranking_lists(ranking), options.seed, "ranking's")


@policy("heads", options=("heads",), reads_ranking=False, listed=True)
def explicit(ranking: Ranking | None, options: PolicyOptions) -> Selection:
    """The heads listed in `heads`."""
    if not options.heads:
        raise InvalidInput("the heads policy needs --heads", hint="e.g. --heads L11.H5,L10.H8")
    refs = parse_heads(options.heads)
    by_name = {h.name: h for h in ranking.heads} if ranking is not None else {}
    reasons = {
        r.name: "listed by the user" + (f", {_describe(by_name[r.name])}" if r.name in by_name else "") for r in refs
    }
    return Selection(refs, reasons)


@policy("concept", options=("concept",))
def concept(ranking: Ranking, options: PolicyOptions) -> Selection:
    """Every head labelled with `concept`."""
    if not options.concept:
        raise InvalidInput("the concept policy needs --concept NAME")
    labels = sorted({h.label for h in ranking.heads})
    if options.concept not in labels:
        raise InvalidInput(
            f"no head is labelled {options.concept!r}", hint=f"labels in this ranking: {', '.join(labels)}"
        )
    heads = [h for h in ranking.sorted_heads() if h.label == options.concept]
    return _select(heads, lambda h: f"labelled {h.label} (CCS {h.ccs})", "no heads")


@policy("threshold", options=("min_ccs",))
def threshold(ranking: Ranking, options: PolicyOptions) -> Selection:
    """Every head with CCS >= min_ccs."""
    if options.min_ccs is None:
        raise InvalidInput("the threshold policy needs --min-ccs")
    if not 0 <= options.min_ccs <= ranking.m:
        raise InvalidInput(f"--min-ccs must be between 0 and {ranking.m}")
    heads = [h for h in ranking.sorted_heads() if h.ccs >= options.min_ccs]
    return _select(heads, lambda h: f"{_describe(h)} >= {options.min_ccs}", f"no head has CCS >= {options.min_ccs}")


def check_paper_preset(which: str, model: str | None, pretrained: str | None) -> str:
    """The preset's head list, or an error saying why there is none; cheap, so called before any loading.
    A checkpoint file does not say which training run it came from: the user names the heads instead."""
    key = (model or "toy", pretrained or "")
    if key in PAPER_HEADS:
        return PAPER_HEADS[key][which]
    known = ", ".join(f"{m}/{t}" for m, t in PAPER_HEADS)
    same_arch = [(t, heads[which]) for (m, t), heads in PAPER_HEADS.items() if m == key[0]]
    if same_arch and pretrained and (os.sep in pretrained or Path(pretrained).suffix or Path(pretrained).exists()):
        tag, heads = same_arch[0]
        raise NotFound(
            f"no paper preset for the checkpoint file {pretrained}: presets are keyed by pretrained tag "
            f"({', '.join(t for t, _ in same_arch)} for {key[0]})",
            hint=f"if it holds the {tag} weights, pass --preset {key[0]}/{tag} (a study: preset = "
            f'"{key[0]}/{tag}" in its [[models]] entry), or --policy heads --heads {heads.replace(" ", ",")}',
        )
    raise NotFound(f"no paper preset for {key[0]}/{key[1] or '(no tag)'}", hint=f"presets exist for: {known}")


def check_preset(preset: str, model: str | None) -> tuple[str, str]:
    """(architecture, pretrained tag) of `--preset MODEL/TAG`: the paper's head lists of those weights applied
    to `model`, a checkpoint file or local-dir folder holding them (presets are keyed by tag, and a file does
    not say which training run it came from). Refused unless the preset exists and `model`'s image tower has
    the preset architecture's shape (a -quickgelu name or a local-dir folder of it included); cheap."""
    import open_clip

    from surgeon.core.fallback import is_toy_model
    from surgeon.core.paths import read_json_object
    from surgeon.model.load import TOY_MODEL_DIR, _local_dir

    arch, _, tag = preset.partition("/")
    if (arch, tag) not in PAPER_HEADS:
        known = ", ".join(f"{m}/{t}" for m, t in PAPER_HEADS)
        raise InvalidInput(f"no paper preset {echo(preset)}", hint=f"presets: {known}", field="preset")
    folder = TOY_MODEL_DIR if is_toy_model(model) else _local_dir(model)
    if folder is not None:
        config = read_json_object(folder / "open_clip_config.json", "model config").get("model_cfg", {})
    else:
        config = open_clip.get_model_config(model) or {}
    shape = ("layers", "width", "head_width", "patch_size", "image_size")
    mine, theirs = config.get("vision_cfg", {}), open_clip.get_model_config(arch)["vision_cfg"]
    if any(mine.get(k) != theirs.get(k) for k in shape):
        raise InvalidInput(
            f"--preset {preset} names {arch} heads, but {model or 'the toy model'} has another image tower",
            hint=f"the preset's architecture is {arch}: pass --model {arch} with its checkpoint file",
            field="preset",
        )
    return arch, tag


def _paper(which: str, options: PolicyOptions) -> Selection:
    key = (options.model_name, options.pretrained or "")
    refs = parse_heads(check_paper_preset(which, *key).split())
    return Selection(refs, {r.name: f"paper's {which}-CCS set for {key[0]}/{key[1]}" for r in refs})


@policy("paper-high", reads_ranking=False, preset=True)
def paper_high(ranking: Ranking | None, options: PolicyOptions) -> Selection:
    """The paper's high-CCS heads for this model (presets for a few open_clip models)."""
    return _paper("high", options)


@policy("paper-low", reads_ranking=False, preset=True)
def paper_low(ranking: Ranking | None, options: PolicyOptions) -> Selection:
    """The paper's low-CCS heads for this model."""
    return _paper("low", options)


def _paper_lists(options: PolicyOptions) -> tuple[list[HeadRef], list[HeadRef]]:
    key = (options.model_name, options.pretrained or "")
    return parse_heads(check_paper_preset("high", *key).split()), parse_heads(check_paper_preset("low", *key).split())


@policy("paper-equal-high", options=("seed", "seeds"), reads_ranking=False, seeded=True, preset=True)
def paper_equal_high(ranking: Ranking | None, options: PolicyOptions) -> Selection:
    """min(#high, #low) of the paper's high-CCS heads for this model (its experiment 3, equal budgets)."""
    return _equal_budget("high", *_paper_lists(options), options.seed, "paper's")


@policy("paper-equal-low", options=("seed", "seeds"), reads_ranking=False, seeded=True, preset=True)
def paper_equal_low(ranking: Ranking | None, options: PolicyOptions) -> Selection:
    """min(#high, #low) of the paper's low-CCS heads for this model (its experiment 3, equal budgets)."""
    return _equal_budget("low", *_paper_lists(options), options.seed, "paper's")


@policy("paper-random", options=("seed", "seeds"), reads_ranking=False, seeded=True, preset=True)
def paper_random(ranking: Ranking, options: PolicyOptions) -> Selection:
    """The paper's random control for this model: as many random heads as its high-CCS set, excluding that set.

    Drawn with the seed from the layers the paper analysed (the last 4; all 12 for ViT-B-32/openai).
    `--seeds N` averages N draws, as the paper does."""
    import open_clip

    key = (options.model_name, options.pretrained or "")
    high = set(parse_heads(check_paper_preset("high", *key).split()))
    vision = open_clip.get_model_config(key[0])["vision_cfg"]
    n_layers, n_heads = vision["layers"], vision["width"] // vision.get("head_width", 64)
    first = 0 if key == ("ViT-B-32", "openai") else n_layers - 4
    pool = [HeadRef(layer, head) for layer in range(first, n_layers) for head in range(n_heads)]
    chosen = random.Random(options.seed).sample([r for r in pool if r not in high], len(high))
    why = f"random draw (seed {options.seed}) from layers {first}-{n_layers - 1}, excluding the paper's high-CCS set"
    return Selection(sorted(chosen), {r.name: why for r in chosen})


#: what the debias search minimises and its stop split checks: the reported figure itself, MaxSkew@k, on
#: probes of the reported probe's size, averaged over the split's probes (toy: validate.PROBES_PER_SPLIT). On
#: design probes it picked the head best on average in 9 of 10 rotations; NDKL on one probe in 4 (NOTES.md)
SEARCH_OBJECTIVE = "max_skew"
SEARCH_RESAMPLES = 50  # bootstrap resamples behind each search decision (standard errors, selection frequency)


@dataclass
class BiasMeasure:
    """One split of a bias set, measured with heads removed: `similarity(heads)` is its (queries x images)
    similarity matrix; the rest says how to score it (surgeon.results.bias)."""

    name: str
    similarity: Callable[[list[HeadRef]], np.ndarray]
    groups: np.ndarray
    n_groups: int
    units: np.ndarray | None = None
    k: int = 10
    desired: str | None = None
    protocol: str = "surgeon"
    probes: np.ndarray | None = None  # per image, its probe: each ranked apart, figures averaged (validate.BiasSet)

    def score(self, heads: list[HeadRef], weights: np.ndarray) -> Score:
        """MaxSkew@k, the mean over the split's probes: its point estimate and one value per bootstrap
        resample `weights`."""
        from surgeon.results.bias import resampled_skews

        sim = self.similarity(heads)
        draws = resampled_skews(sim, self.groups, self.n_groups, weights, with_ndkl=False, **self._rule())
        return Score(self._value(sim), draws["max"].mean(1))

    def value(self, heads: list[HeadRef]) -> float:
        """MaxSkew@k, the mean over the split's probes (the point estimate alone)."""
        return self._value(self.similarity(heads))

    def _value(self, similarity: np.ndarray) -> float:
        from surgeon.results.bias import bias_metrics

        return float(bias_metrics(similarity, self.groups, self.n_groups, **self._rule())[f"max_skew@{self.k}"])

    def _rule(self) -> dict:
        return {"k": self.k, "desired": self.desired, "protocol": self.protocol, "probes": self.probes}

    def resamples(self, n: int, seed: int) -> np.ndarray:
        """Bootstrap multiplicities drawing units within each probe (each keeps its size)."""
        from surgeon.results.bias import unit_weights

        return unit_weights(self.units, len(self.groups), n, seed, strata=self.probes)


@dataclass
class Score:
    value: float
    draws: np.ndarray  # per bootstrap resample


@dataclass
class DebiasData:
    """What the debias policy measures on: a search split, a disjoint stop split (both bias sets), and mean
    zero-shot accuracy on the search split's tasks. The report split is not here: selection cannot touch it."""

    search: BiasMeasure
    stop: BiasMeasure
    accuracy: Callable[[list[HeadRef]], float]
    pin: Callable[[list[HeadRef]], None] = lambda heads: None  # the search continues from these heads (a cache)
    advance: Callable[[int], None] = lambda n: None  # one step per head set measured


def debias_bound(n_heads: int, budget: int, candidates: int) -> int:
    """The most head sets a debias search measures: the search split's baseline and every head alone, then per
    further step the candidates not yet chosen; the stop split's baseline and one set per step; accuracy of
    the baseline, of each head chosen and of each candidate refused for it."""
    pool = min(candidates, n_heads)
    greedy = sum(max(0, pool - step) for step in range(1, budget))
    return (1 + n_heads + greedy) + (1 + budget) + (1 + budget + pool)


@policy("debias", options=("k", "max_acc_drop", "seed"), measures=True, default_k="at most 4")
def debias(ranking: Ranking, options: PolicyOptions) -> Selection:
    """Greedy, held-out-checked: heads whose removal lowers bias reliably, within an accuracy budget (needs a bias set).

    Searches on one split and decides on another, so that noise does not pick heads: every analysed head is
    measured alone on the search split, and those lowering its MaxSkew@k (the mean over its probes) by more
    than a bootstrap standard error (at most `candidates`, 8) are candidates. Each step takes the candidate
    that is best in most bootstrap resamples of the search split (stability), and keeps it only if it lowers
    the stop split's MaxSkew@k by more than that gain's bootstrap standard error, within k heads (default 4)
    and a mean accuracy drop on the search split (default 1 point). `seed` draws the resamples (and, in
    `prune`, the splits)."""
    import numpy as np

    data = options.measure
    if data is None:
        raise InvalidInput("the debias policy needs a validation set to measure bias and accuracy on")
    budget = _k(options, ranking) if options.k is not None else min(4, len(ranking.heads))
    max_drop = 1.0 if options.max_acc_drop is None else options.max_acc_drop
    search_weights = data.search.resamples(SEARCH_RESAMPLES, options.seed)
    stop_weights = data.stop.resamples(SEARCH_RESAMPLES, options.seed + 1)
    measured = {"search": 0, "stop": 0, "accuracy": 0}
    objective = f"MaxSkew@{data.search.k}"

    def counted(kind: str) -> None:
        measured[kind] += 1
        data.advance(1)

    def search_score(heads: list[HeadRef]) -> Score:
        counted("search")
        return data.search.score(heads, search_weights)

    def stop_score(heads: list[HeadRef]) -> Score:
        counted("stop")
        return data.stop.score(heads, stop_weights)

    def accuracy(heads: list[HeadRef]) -> float:
        counted("accuracy")
        return data.accuracy(heads)

    base = search_score([])
    alone = {ref: search_score([ref]) for ref in (_ref(h) for h in ranking.sorted_heads())}
    effects = {ref: (s.value - base.value, float(np.std(s.draws - base.draws, ddof=1))) for ref, s in alone.items()}
    pool = sorted((r for r, (gain, se) in effects.items() if gain < -se), key=lambda r: effects[r][0])
    pool = pool[: options.candidates]
    details: dict = {
        "objective": SEARCH_OBJECTIVE,
        "resamples": SEARCH_RESAMPLES,
        "search": data.search.name,
        "stop": data.stop.name,
        "base": {SEARCH_OBJECTIVE: base.value},
        "alone": {
            r.name: {"effect": round(gain, 6), "se": round(se, 6)}
            for r, (gain, se) in sorted(effects.items(), key=lambda item: item[1][0])
        },
        "candidates": [r.name for r in pool],
        "steps": [],
        "bound": debias_bound(len(ranking.heads), budget, options.candidates),
        "measured": measured,  # head sets measured, by split (filled in as the search goes)
    }
    if not pool:
        details["stopped"] = f"no head lowers the search split's {objective} by more than its bootstrap standard error"
        raise InvalidInput(details["stopped"], hint="a larger bias set (more scenes or identities) measures less noise")
    base_acc = accuracy([])
    current, current_stop = base, stop_score([])
    chosen: list[HeadRef] = []
    reasons: dict[str, str] = {}
    stopped = f"reached the budget of {budget} head(s)"
    while len(chosen) < budget:
        scored = {r: alone[r] if not chosen else search_score(chosen + [r]) for r in pool if r not in chosen}
        if not scored:
            stopped = "no candidate left"
            break
        stacked = np.stack([s.draws for s in scored.values()])
        wins = np.bincount(stacked.argmin(0), minlength=len(scored)) / stacked.shape[1]
        frequency = dict(zip(scored, wins.tolist(), strict=True))
        order = sorted(scored, key=lambda r: (-frequency[r], scored[r].value))
        order = [r for r in order if scored[r].value < current.value]
        step: dict = {"frequency": {r.name: round(frequency[r], 3) for r in scored}}
        details["steps"].append(step)
        if not order:
            stopped = f"no remaining candidate lowers the search split's {objective}"
            break
        for ref in order:
            acc = accuracy(chosen + [ref])
            if (base_acc - acc) * 100 <= max_drop:
                break
            step.setdefault("over_accuracy_budget", []).append(ref.name)
            pool.remove(ref)
        else:
            stopped = f"every remaining candidate costs more than {max_drop} point(s) of mean accuracy"
            break
        new_stop = stop_score(chosen + [ref])
        gain = current_stop.value - new_stop.value
        se = float(np.std(current_stop.draws - new_stop.draws, ddof=1))
        step.update(head=ref.name, search=scored[ref].value, stop=new_stop.value, stop_gain=gain, stop_se=se, acc=acc)
        if gain <= se:
            stopped = (
                f"the next head, {ref.name}, lowered the stop split's {objective} by {gain:.4f} "
                f"(bootstrap SE {se:.4f}): not more than its standard error"
            )
            break
        reasons[ref.name] = (
            f"removing it lowered bias ({objective}) {current.value:.4f} -> {scored[ref].value:.4f} on the "
            f"search split (best in {frequency[ref]:.0%} of resamples) and {current_stop.value:.4f} -> "
            f"{new_stop.value:.4f} (gain {gain:.4f} > SE {se:.4f}) on the stop split; mean accuracy "
            f"{base_acc * 100:.2f} -> {acc * 100:.2f} (search split)"
        )
        step["accepted"] = True
        chosen.append(ref)
        if len(chosen) < budget:
            data.pin(chosen)
        current, current_stop = scored[ref], new_stop
    details["stopped"] = f"asked for up to {budget} head(s), pruned {len(chosen)}: {stopped}"
    if not chosen:
        raise InvalidInput(f"debias pruned no head: {stopped}", hint="a larger bias set measures less noise")
    return Selection(sorted(chosen), reasons, details)
