"""The records a run hands on round-trip through their JSON, and bad JSON is one clear error."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from surgeon.core.errors import CorruptInput, PreconditionFailed
from surgeon.ranking.rank import RANKING_SCHEMA, Ranking
from surgeon.results.records import Plan, PlannedHead, ValidationSummary, check_validation_report
from surgeon.validation.validate import markdown_report


def _plan(**changes) -> Plan:
    values = dict(
        base_model={"name": "ViT-B-32", "pretrained": "openai", "weights_sha256": "ab"},
        ranking_sha256=None,
        policy="heads",
        options={"heads": "L1.H0"},
        mode="zero",
        tower="vision",
        seed=0,
        heads=(PlannedHead("L1.H0", 1, 0, "listed"), PlannedHead("L1.H3", 1, 3, "listed", "color", 5)),
        policy_details={},
        record={"heads_kept": {"1": [1, 2]}},
        validated_on="toy tasks",
    )
    return Plan(**{**values, **changes})


def test_plan_round_trips_through_json_and_omits_what_the_run_did_not_have():
    plan = _plan()
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["schema"] == "surgeon.plan/1" and "selected_on" not in data and "seeds" not in data
    assert Plan.from_dict(data) == plan
    assert plan.base_identity == "ViT-B-32/openai" and plan.hard and plan.heads_per_layer() == {"1": [0, 3]}
    seeded = _plan(selected_on="search half", seeds=[{"seed": 0, "mean_acc1": 0.5}], seed_mean={"mean_acc1": 0.5})
    assert Plan.from_dict(json.loads(json.dumps(seeded.to_dict()))) == seeded


@pytest.mark.parametrize(
    "data, error",
    [
        ([], CorruptInput),
        ({"schema": "surgeon.plan/0"}, PreconditionFailed),
        ({**_plan().to_dict(), "heads": [{"head": "L1.H0"}]}, CorruptInput),
        ({k: v for k, v in _plan().to_dict().items() if k != "policy"}, CorruptInput),
        ({**_plan().to_dict(), "base_model": "ViT-B-32"}, CorruptInput),
        ({**_plan().to_dict(), "base_model": {}}, CorruptInput),
        ({**_plan().to_dict(), "heads": 3}, CorruptInput),
        ({**_plan().to_dict(), "heads": [{"head": 1, "layer": 0, "index": 0}]}, CorruptInput),
        ({**_plan().to_dict(), "seed": "0"}, CorruptInput),
    ],
)
def test_a_bad_plan_is_one_clear_error(data, error):
    with pytest.raises(error):
        Plan.from_dict(data)


def test_validation_summary_keys_round_trip():
    plain = ValidationSummary(0.5)
    assert plain.to_dict() == {"mean_acc1": 0.5} and plain.headline_skew() is None
    assert ValidationSummary.from_dict(plain.to_dict()) == plain
    summed = ValidationSummary(0.5, skew_k=10, max_skew=0.2, max_skew_sum=2.0, ndkl=0.1)
    assert summed.to_dict() == {"mean_acc1": 0.5, "max_skew@10": 0.2, "max_skew@10_sum": 2.0, "ndkl": 0.1}
    assert ValidationSummary.from_dict({**summed.to_dict(), "n": 3}) == summed  # a sweep point carries n too
    assert summed.headline_skew() == ("max_skew@10_sum", 2.0)
    assert ValidationSummary(0.5, skew_k=5, max_skew=0.3).headline_skew() == ("max_skew@5", 0.3)
    with pytest.raises(CorruptInput):
        ValidationSummary.from_dict({"max_skew@x": 1.0})


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(_plan().to_dict())), value=JSON)
def test_any_plan_json_is_a_plan_or_one_clear_error(field, value):
    """A plan.json with any one field replaced by any JSON value: read, or refused as corrupt, nothing else."""
    data = {**_plan().to_dict(), field: value}
    try:
        plan = Plan.from_dict(data)
    except (CorruptInput, PreconditionFailed):
        return
    plan.to_dict(), plan.base_identity, plan.heads_per_layer(), plan.hard  # noqa: B018  every reader's access works


def _ranking_dict() -> dict:
    head = {"layer": 1, "head": 0, "texts": ["a"], "stds": [0.5], "label": "color", "verdicts": [True],
            "ccs": 1, "variance": 2.0, "effective_rank": 3}  # fmt: skip
    return {"schema": RANKING_SCHEMA, "model": {"name": "toy"}, "images": {}, "layers": [1], "n_heads": 1, "m": 1,
            "span_rank": 80, "pool": {}, "judge": "lexicon", "heads": [head], "surgeon_version": "0"}  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(_ranking_dict())), value=JSON, in_head=st.booleans())
def test_any_ranking_json_is_a_ranking_or_one_clear_error(field, value, in_head):
    data = _ranking_dict()
    if in_head:
        data["heads"][0] = {**data["heads"][0], "ccs": value}
    else:
        data[field] = value
    try:
        ranking = Ranking.from_dict(data)
    except CorruptInput:
        return
    ranking.sorted_heads(), ranking.clamp_note(), ranking.ccs_distribution(), ranking.digest()


def test_a_ranking_listing_a_head_twice_is_corrupt():
    """bottom-k 3 of such a ranking 'pruned 3 heads' in plan, report and card while removing one."""
    data = _ranking_dict()
    data["heads"] = [data["heads"][0], {**data["heads"][0], "ccs": 0}]
    with pytest.raises(CorruptInput, match="L1.H0 is listed more than once"):
        Ranking.from_dict(data)


def _report(acc: float = 0.5) -> dict:
    zeroshot = {"dataset": "toy/shape", "task": "zeroshot_classification",
                "metrics": {"acc1": acc, "acc5": 1.0, "mean_per_class_recall": acc, "n": 4}}  # fmt: skip
    bias = {"dataset": "probe", "task": "bias", "metrics": {"protocol": "surgeon", "max_skew@10": 0.2, "ndkl": 0.1}}
    return {"summary": {"mean_acc1": acc, "max_skew@10": 0.2, "ndkl": 0.1}, "results": [zeroshot, bias]}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda v: v.pop("after"),
        lambda v: v["before"].pop("results"),
        lambda v: v["before"]["results"][0]["metrics"].pop("acc5"),
        lambda v: v["after"]["results"][0]["metrics"].update(acc1="high"),
        lambda v: v["after"]["results"][1]["metrics"].update(protocol="CCS"),
        lambda v: v["after"]["results"].pop(1),
        lambda v: v["after"]["summary"].update({"max_skew@10": "0.2"}),
    ],
)
def test_a_bad_validation_report_is_refused_before_the_card_reads_it(mutate):
    validation = {"before": _report(), "after": _report(0.4)}
    check_validation_report(validation, "validation.json")
    markdown_report(validation["before"], validation["after"])
    mutate(validation)
    with pytest.raises(CorruptInput):
        check_validation_report(validation, "validation.json")
