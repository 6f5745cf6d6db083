"""Equal budgets (the paper's experiment 3): n = min(#high, #low) heads from each list."""

from __future__ import annotations

import pytest

from surgeon.api import ModelSpec, PruneSpec
from surgeon.core.errors import InvalidInput, NotFound
from surgeon.model.heads import parse_heads
from surgeon.selection.policies import PAPER_HEADS, POLICIES, PolicyOptions, policy_names
from surgeon.studies.study import STUDY_POLICIES
from tests.test_policies import CCS, names, select
from tests.test_policies import ranking as ranking  # noqa: F401  (the fixture)


def test_equal_budget_from_a_ranking(ranking):  # noqa: F811
    high = {f"L{layer}.H{head}" for (layer, head), (ccs, _, _) in CCS.items() if ccs == 5}
    low = {f"L{layer}.H{head}" for (layer, head), (ccs, _, _) in CCS.items() if ccs <= 1}
    assert len(high) == 3 and len(low) == 3  # equal lists: each taken whole, whatever the seed
    assert set(names(select("equal-high", ranking, seed=4))) == high
    assert set(names(select("equal-low", ranking, seed=4))) == low
    ranking.heads[3].ccs = 2  # L2.H3 leaves the low list: 3 high, 2 low
    draws = {tuple(names(select("equal-high", ranking, seed=s))) for s in range(12)}
    assert all(len(d) == 2 and set(d) <= high for d in draws) and len(draws) > 1  # seeded draws of 2 of the 3
    assert names(select("equal-high", ranking, seed=7)) == names(select("equal-high", ranking, seed=7))
    selection = select("equal-low", ranking, seed=0)
    assert set(names(selection)) == low - {"L2.H3"} and selection.details == {"budget": 2, "high": 3, "low": 2}
    assert "equal budget of 2 (min of 3 high, 2 low)" in next(iter(selection.reasons.values()))
    for head in ranking.heads:
        head.ccs = 3
    with pytest.raises(InvalidInput, match="needs both lists: 0 high-CCS and 0 low-CCS"):
        select("equal-high", ranking)


def test_equal_budget_from_the_paper_presets():
    key = ("ViT-B-32", "openai")  # 8 high, 4 low
    high, low = (set(parse_heads(PAPER_HEADS[key][which].split())) for which in ("high", "low"))
    options = {"model_name": key[0], "pretrained": key[1]}
    chosen = POLICIES.get("paper-equal-high").select(None, PolicyOptions(seed=1, **options)).heads
    assert len(chosen) == 4 and set(chosen) <= high
    assert set(POLICIES.get("paper-equal-low").select(None, PolicyOptions(seed=1, **options)).heads) == low
    seeded = set(policy_names(lambda p: p.seeded))
    assert {"equal-high", "paper-equal-low"} <= seeded and "paper-equal-high" in STUDY_POLICIES


def test_every_paper_preset_is_checked_before_any_work():
    """Each paper-* policy is refused early for a model without presets; before, the check looked up the
    policy's own name in the preset table and paper-random raised a KeyError for the models that have one."""
    for policy in ("paper-high", "paper-low", "paper-random", "paper-equal-high", "paper-equal-low"):
        PruneSpec(model=ModelSpec("ViT-B-32", "openai"), policy=policy).check()
        with pytest.raises(NotFound, match="no paper preset for ViT-B-16/laion"):
            PruneSpec(model=ModelSpec("ViT-B-16", "laion400m_e32"), policy=policy).check()
