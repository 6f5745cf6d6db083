"""A study's [[tables]]: one table per experiment, only the cells some table shows computed."""

from __future__ import annotations

import csv
import json

import pytest

from surgeon.core.errors import InvalidInput
from surgeon.studies.study import BASELINE, cells, compute_study, markdown_table, parse_study

STUDY = """
name = "tables"
[[models]]
name = "toy"
[[policies]]
policy = "heads"
heads = "L1.H0"
label = "one"
[[policies]]
policy = "heads"
heads = "L1.H1,L1.H2"
label = "two"
[[data]]
name = "shape"
path = "toy:shape"
n = 40
[[data]]
name = "color"
path = "toy:color"
n = 40
[[retrieval]]
name = "captions"
path = "toy:captions"
n = 30
[[tables]]
name = "A. one on shape"
policies = ["one"]
data = ["shape"]
[[tables]]
name = "B. both on color and captions"
policies = ["two", "one"]
data = ["color", "captions"]
"""


def test_tables_compute_only_their_cells_and_each_is_written(tmp_path):
    study_file = tmp_path / "s.toml"
    study_file.write_text(STUDY)
    study = parse_study(study_file)
    # 3 baselines; "one" on shape, color, captions; "two" on color, captions (never on shape)
    shown = cells(study)
    assert len(shown) == 3 + 3 + 2 and not any(c.policy == 1 and c.data == 0 for c in shown)
    run = compute_study(study, tmp_path / "out")
    assert [t["name"] for t in run.tables] == ["A. one on shape", "B. both on color and captions"]
    second = run.tables[1]
    assert [c["name"] for c in second["columns"]] == ["color", "captions"]
    assert [r["policy"] for r in second["rows"]] == ["none", "two", "one"]
    # each table starts with the unpruned model (no change to show)
    assert run.tables[0]["rows"][0]["cells"]["shape"]["change"] is None
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "# Study: A. one on shape" in markdown and "# Study: B. both on color and captions" in markdown
    rows = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    assert {r["table"] for r in rows} == {"A. one on shape", "B. both on color and captions"}
    listing = json.loads((tmp_path / "out" / "table.json").read_text())
    assert len(listing["tables"]) == 2 and all((tmp_path / "out" / f"study-{i}.png").is_file() for i in (1, 2))


def test_a_table_naming_an_unknown_policy_or_data_set(tmp_path):
    study_file = tmp_path / "s.toml"
    study_file.write_text(STUDY.replace('policies = ["one"]', 'policies = ["three"]'))
    with pytest.raises(InvalidInput, match=r"tables\[0\].policies: 'three' is not one of the study's policies"):
        parse_study(study_file)
    study_file.write_text(STUDY.replace('data = ["shape"]', 'data = ["shapes"]'))
    with pytest.raises(InvalidInput, match=r"tables\[0\].data: 'shapes' is not one of the study's data"):
        parse_study(study_file)


@pytest.mark.parametrize(("values", "floor"), [((0.42, 0.34), True), ((0.42, 0.15), False)])
def test_a_bias_column_calls_chance_its_floor_only_when_no_row_is_below_it(values, floor):
    def row(policy: str, value: float) -> dict:
        cell = {"value": value, "std": None, "seeds": 1, "change": None, "values": [value], "error": None}
        return {"model": "toy", "policy": policy, "mode": BASELINE, "heads": None, "cells": {"probe": cell}}

    column = {"name": "probe", "kind": "bias", "metric": "max_skew@10", "floor": 0.207}
    rows = [row(BASELINE, values[0]), row("debias", values[1])]
    text = markdown_table({"name": "t", "columns": [column], "rows": rows, "failures": []})
    assert "A ranking that ignores the images scores max_skew@10 0.207 on probe: " in text
    assert ("that column's floor, not 0." in text) is floor
    assert ("rows below it rank more evenly than chance." in text) is not floor
