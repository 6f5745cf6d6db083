"""A debias result is shown next to chance (report.md, the card, the terminal), and a run folder whose
comparison is malformed is refused on re-export instead of breaking the card."""

from __future__ import annotations

import copy

import pytest

from surgeon.core.errors import CorruptInput
from surgeon.model.heads import HeadRef
from surgeon.results.records import check_validation_report
from surgeon.selection.debias import chance_line, chance_lines, null_sets

CHANCE = {
    "metric": "max_skew@10",
    "measured_on": "toy world: test split, bias probes (seeds 0, 7, 8, 9)",
    "size": 1,
    "sets": 31,
    "exhaustive": True,
    "base": 0.445866,
    "base_ci95": [0.3346, 0.5813],
    "policy": 0.270896,
    "policy_ci95": [0.2431, 0.4823],
    "change": -0.392428,
    "change_ci95": [-0.4587, 0.1027],
    "random": {"mean": 0.4482, "sd": 0.0525, "min": 0.3405, "max": 0.5195, "mean_change": 0.0053},
    "percentile": 100.0,
    "p_value": 0.0312,
    "bootstrap": {"resamples": 500, "level": 0.95},
}
REPORT = {"summary": {"mean_acc1": 0.9}, "results": []}


def test_the_comparison_reads_as_a_table_and_a_line():
    table = "\n".join(chance_lines(CHANCE))
    assert "| change | -39.2% | [-45.9%, +10.3%] |" in table
    assert "all 31 other sets of 1 head(s) | mean 0.4482 (+0.5%), sd 0.0525" in table and "p = 0.031" in table
    line = chance_line(CHANCE)
    assert "0.446 -> 0.271 (-39.2%, 95% CI [-45.9%, +10.3%]); all 31 other 1-head sets" in line
    assert "beats 100.0%" in line
    no_bias = {**CHANCE, "base": 0.0, "change": None, "change_ci95": None}
    no_bias["random"] = {**CHANCE["random"], "mean_change": None}
    assert "n/a (no bias before)" in chance_line(no_bias)


def test_chance_above_the_unpruned_figure_is_no_floor_and_leaves_no_excess_share():
    """Where the unpruned figure is above chance the excess over it is shared out; where it is not, chance is
    named without calling it a floor and no share is printed."""
    above = {**CHANCE, "chance": 0.207, "excess_removed": 0.731}
    assert "(its floor, not 0); the policy removed 73% of the excess over it." in "\n".join(chance_lines(above))
    assert "; floor (random ranking) 0.207" in chance_line(above)
    below = {**CHANCE, "chance": 0.5, "excess_removed": None}
    text = "\n".join(chance_lines(below)) + chance_line(below)
    assert "floor" not in text and "removed" not in text
    assert "max_skew@10 0.5000 on this set in expectation (not less than the unpruned 0.4459: no excess" in text


def test_chance_is_no_floor_under_a_pruned_figure_below_it():
    """The unpruned figure above chance, the pruned one below: chance was still called "its floor", as report.md
    did before its note read the pruned figure too (results.bias.below_chance now decides both)."""
    crossed = {**CHANCE, "chance": 0.3, "excess_removed": 1.201}
    text = "\n".join(chance_lines(crossed)) + chance_line(crossed)
    assert "floor" not in text and "(not less than the pruned 0.2709)" in text
    assert "random ranking (not below the pruned) 0.300" in chance_line(crossed)


def test_a_malformed_comparison_is_refused():
    check_validation_report({"before": REPORT, "after": REPORT, "against_chance": CHANCE}, "validation.json")
    broken = copy.deepcopy(CHANCE)
    broken["random"]["sd"] = "wide"
    with pytest.raises(CorruptInput, match="against_chance"):
        check_validation_report({"before": REPORT, "after": REPORT, "against_chance": broken}, "validation.json")


def test_null_sets_are_every_other_set_or_distinct_draws():
    pool = [HeadRef(layer, head) for layer in range(4) for head in range(8)]
    sets, exhaustive = null_sets(pool, [HeadRef(1, 7)], 50, seed=0)
    assert exhaustive and len(sets) == 31 and (HeadRef(1, 7),) not in sets
    sets, exhaustive = null_sets(pool, [HeadRef(0, 7), HeadRef(1, 7)], 50, seed=0)
    assert not exhaustive and len(set(sets)) == 50 and (HeadRef(0, 7), HeadRef(1, 7)) not in sets
    assert sets == null_sets(pool, [HeadRef(0, 7), HeadRef(1, 7)], 50, seed=0)[0]
