"""Selection by measurement (debias) never reports on the data it selected on: the suite splits into disjoint
search, stop and report splits (toy: other streams; files: seeded, by a unit column), too-small splits refused,
and nothing of the report split is read while heads are selected."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from PIL import Image

from surgeon.core.errors import InvalidInput
from surgeon.model.heads import HeadRef
from surgeon.results.bias import bias_metrics
from surgeon.selection.policies import BiasMeasure
from surgeon.validation.validate import (
    DESIGN_PROBES,
    PROBES_PER_SPLIT,
    REPORT_PROBES,
    bias_set,
    search_probe_seeds,
    toy_suite,
)


def digests(images) -> set[str]:
    return {hashlib.sha256(np.asarray(image).tobytes()).hexdigest() for image in images}


def test_toy_search_and_stop_suites_share_no_image_with_the_reported_one():
    suite = toy_suite(n_per_task=64, n_scenes=24)
    splits = suite.split_for_search()
    search, stop, report = splits.search, splits.stop, splits.report
    assert report is suite and "test split" in report.description and "val split" in search.description
    assert len(search.tasks[0].labels) == 64 and not stop.tasks
    assert np.bincount(report.bias.probes).tolist() == [48] * len(REPORT_PROBES)  # the reported probes, 24 scenes each
    for side in (search, stop):  # several probes of the report probe's size, each image marked with its probe
        assert len(np.unique(side.bias.units)) == 24 * PROBES_PER_SPLIT
        assert np.bincount(side.bias.probes).tolist() == [48] * PROBES_PER_SPLIT
    assert not digests(search.tasks[0].images) & digests(report.tasks[0].images)
    probes = [digests(side.bias.images) for side in (search, stop, report)]
    assert not probes[0] & probes[1] and not probes[0] & probes[2] and not probes[1] & probes[2]
    assert search.bias.queries == stop.bias.queries == report.bias.queries
    other = suite.split_for_search(seed=1)  # another split seed draws other search and stop probes
    assert not digests(other.search.bias.images) & probes[0] and other.report is suite


def test_toy_search_probes_avoid_the_reported_and_the_design_probes():
    used = [seed for split in range(6) for seeds in search_probe_seeds(split) for seed in seeds]
    assert len(used) == len(set(used)) == 6 * 2 * PROBES_PER_SPLIT  # no probe in two splits or two split seeds
    assert not set(used) & set(range(20))  # below 20: the reported probes and those the search was designed on
    assert not set(used) & set(DESIGN_PROBES)  # later design probes and the fresh probes results are judged on
    assert not set(REPORT_PROBES) & set(range(10, 20))  # the design probes (NOTES.md) are never reported on


def test_search_objective_is_the_mean_over_probes_ranked_apart():
    """A split of two probes scores each probe's own ranking and averages; one ranking over both differs."""
    rng = np.random.default_rng(0)
    groups, units = np.tile([0, 1], 40), np.repeat(np.arange(40), 2)
    probes = np.repeat([0, 1], 40)
    sim = rng.normal(size=(3, 80)) + np.where(groups == 0, 0.3, 0.0) * (probes == 0)  # probe 0 biased only
    measure = BiasMeasure("two", lambda heads: sim, groups, 2, units, 10, probes=probes)
    weights = measure.resamples(20, 0)
    assert (weights[:, probes == 0].sum(1) == 40).all() and (weights[:, probes == 1].sum(1) == 40).all()
    score = measure.score([], weights)
    each = [bias_metrics(sim[:, probes == p], groups[probes == p], 2, 10) for p in (0, 1)]
    assert score.value == pytest.approx(np.mean([m["max_skew@10"] for m in each]))
    assert score.value != pytest.approx(bias_metrics(sim, groups, 2, 10)["max_skew@10"])
    assert score.draws.shape == (20,) and abs(score.draws.mean() - score.value) < 0.2


@pytest.fixture
def manifest(tmp_path):
    """40 images of 20 identities (2 each), 2 groups."""
    rng = np.random.default_rng(0)
    rows = ["path,group,identity"]
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i // 2 % 2]},person{i // 2}")
    (tmp_path / "bias.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "queries.txt").write_text("a doctor\na nurse\n")
    return tmp_path


def test_files_split_keeps_each_identity_in_one_split_reproducibly(manifest):
    from surgeon.validation.validate import ValidationSuite

    bias = bias_set(manifest / "bias.csv", manifest / "queries.txt", k=5, split_by="identity")
    suite = ValidationSuite([], bias, "files", "bias.csv")
    splits = suite.split_for_search(seed=0)
    sides = [{int(p.stem) // 2 for p in side.bias.images} for side in (splits.search, splits.stop, splits.report)]
    assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]
    assert sum(len(side.bias.images) for side in (splits.search, splits.stop, splits.report)) == 40
    assert "report split" in splits.report.description and "stop split" in splits.stop.description
    again = suite.split_for_search(seed=0)
    assert [p.name for p in again.search.bias.images] == [p.name for p in splits.search.bias.images]
    other = suite.split_for_search(seed=1)
    assert [p.name for p in other.report.bias.images] != [p.name for p in splits.report.bias.images]


def test_bad_or_too_small_splits_are_refused(manifest):
    from surgeon.validation.validate import ValidationSuite

    with pytest.raises(InvalidInput, match="not a column of bias.csv"):
        bias_set(manifest / "bias.csv", manifest / "queries.txt", split_by="face")
    bias = bias_set(manifest / "bias.csv", manifest / "queries.txt", k=8, split_by="identity")
    with pytest.raises(InvalidInput, match="too small to split"):
        ValidationSuite([], bias, "files", "bias.csv").split_for_search()


def test_a_huge_split_column_is_refused_before_any_work():
    from tests.conftest import run_cli

    done = run_cli("prune", "--bias-split-by", "x" * 100_000)

    code, err = done.returncode, done.stderr
    assert code == 2 and "bias_split_by is 100,000 characters long" in err and len(err) < 2_000


def test_selection_never_reads_the_report_split(setup, tmp_path, monkeypatch):
    """Every image file opened while the debias policy selects belongs to the search or stop split; the report
    split's files are read only afterwards (validation, the comparison with random head sets)."""
    from surgeon.pruning import prune as prune_module
    from surgeon.selection.policies import PolicyOptions, Selection
    from surgeon.validation import validate as validate_module
    from surgeon.validation.validate import ValidationSuite, classification_set

    loaded, ranking = setup
    rng = np.random.default_rng(0)
    rows, task_rows = ["path,group,identity"], ["path,label"]
    for i in range(72):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"b{i}.png")
        rows.append(f"b{i}.png,{'ab'[i % 2]},person{i // 2}")
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"t{i}.png")
        task_rows.append(f"t{i}.png,{['red', 'blue'][i % 2]}")
    (tmp_path / "bias.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "task.csv").write_text("\n".join(task_rows) + "\n")
    (tmp_path / "queries.txt").write_text("a doctor\na nurse\n")
    bias = bias_set(tmp_path / "bias.csv", tmp_path / "queries.txt", k=4, split_by="identity")
    suite = ValidationSuite([classification_set(tmp_path / "task.csv")], bias, "files", "files")
    opened: dict[str, list[str]] = {"selecting": [], "after": []}
    phase = ["after"]
    real_open, real_data, real_select = validate_module.open_image, prune_module.search_data, prune_module.select_heads

    def recording_open(path):
        opened[phase[0]].append(path.name)
        return real_open(path)

    def recorded_data(*args, **kwargs):  # selection starts with the search and stop splits' evaluators
        phase[0] = "selecting"
        return real_data(*args, **kwargs)

    def recorded_select(*args, **kwargs):
        try:
            return real_select(*args, **kwargs)
        except InvalidInput:  # a random tiny model may have no reliable head: what was read is the point
            head = ranking.sorted_heads()[0]
            return Selection([HeadRef(head.layer, head.head)], {head.name: "test"})
        finally:
            phase[0] = "after"

    monkeypatch.setattr(validate_module, "open_image", recording_open)
    monkeypatch.setattr(prune_module, "search_data", recorded_data)
    monkeypatch.setattr(prune_module, "select_heads", recorded_select)
    result = prune_module.prune(loaded, ranking, suite, "debias", PolicyOptions(k=2, seed=3))
    splits = suite.split_for_search(seed=3)
    report = {p.name for p in splits.report.bias.images} | {p.name for p in splits.report.tasks[0].images}
    selected_on = {p.name for p in splits.search.bias.images} | {p.name for p in splits.stop.bias.images}
    assert selected_on <= set(opened["selecting"])  # the recorder saw the selection's reads
    assert not report & set(opened["selecting"])
    assert report <= set(opened["after"])
    chance = result.against_chance  # measured on the report split, against every other set of its size
    size, n = len(result.plan.heads), len(ranking.heads)
    assert chance["size"] == size and chance["sets"] == min(50, math.comb(n, size) - 1)
    assert chance["measured_on"] == splits.report.description and 0 < chance["p_value"] <= 1
    floor = result.after["results"][-1]["metrics"]["chance"][chance["metric"]]  # the report split's bias set
    assert chance["chance"] == pytest.approx(floor) and 0 < floor < 1
    if chance["base"] > floor:
        removed = (chance["base"] - chance["policy"]) / (chance["base"] - floor)
        assert chance["excess_removed"] == pytest.approx(removed, abs=1e-5)


def test_tasks_sharing_one_image_array_split_it_once(manifest):
    """The toy's six factor tasks hold one image array: with a bias file they go through the files split, and
    each task drew its own halves, so a task's report images had been searched under another task's labels."""
    from surgeon.validation.validate import ValidationSuite, toy_tasks

    tasks = toy_tasks(40, "test")
    assert all(task.images is tasks[0].images for task in tasks)
    bias = bias_set(manifest / "bias.csv", manifest / "queries.txt", k=5, split_by="identity")
    splits = ValidationSuite(tasks, bias, "toy+files", "toy + bias.csv").split_for_search(seed=0)
    searched = set().union(*(digests(task.images) for task in splits.search.tasks))
    reported = set().union(*(digests(task.images) for task in splits.report.tasks))
    assert not searched & reported and len(searched) + len(reported) == len(digests(tasks[0].images))
    # and the halves stay one array each, so the evaluator still runs one forward pass for all six tasks
    assert all(task.images is splits.report.tasks[0].images for task in splits.report.tasks)
