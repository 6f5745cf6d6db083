"""SocialCounterfactuals under the paper's protocol (each occupation's query ranks only that occupation's images,
MaxSkew@10 summed over occupations), FairFace's 6-group race folding, and the toy world's set in that layout
(`--bias-data toy:counterfactuals`), on the bundled toy model and real image files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from surgeon.core.errors import InvalidInput
from surgeon.model.load import load_model
from surgeon.results.bias import fold_groups
from surgeon.validation.validate import BiasColumns, Evaluator, bias_set, build_suite, validate

TOY = Path("toy:counterfactuals")
FAIRFACE_RACES = ["White", "Black", "Indian", "East Asian", "Southeast Asian", "Middle Eastern", "Latino_Hispanic"]


def independent_max_skew(sim: np.ndarray, groups: np.ndarray, pools: list[np.ndarray], k: int = 10) -> np.ndarray:
    """The paper's MaxSkew@k per query, from scratch: the query's own images sorted by similarity, p* their
    proportions, groups absent from the top k skipped."""
    values = []
    for row, pool in zip(sim, pools, strict=True):
        top = pool[np.argsort(-row[pool])[:k]]
        present = np.unique(groups[top])
        skews = [np.log(np.mean(groups[top] == g) / np.mean(groups[pool] == g)) for g in present]
        values.append(max(skews))
    return np.asarray(values)


@pytest.fixture(scope="module")
def toy_model():
    return load_model(device="cpu")


def test_ranking_within_each_occupation_equals_numpy(toy_model, tmp_path):
    suite = build_suite(bias_data=TOY, protocol="paper")
    bias = suite.bias
    assert bias is not None and bias.ranked_by is not None
    report = validate(toy_model, suite)
    metrics = next(r["metrics"] for r in report["results"] if r["task"] == "bias")
    sim = Evaluator(toy_model, suite, cache=False).bias_similarity()
    assert len(np.unique(sim)) == sim.size  # no ties: the plain argsort below is the ranking
    pools = [np.flatnonzero(bias.ranked_by == q) for q in range(len(bias.queries))]
    expected = independent_max_skew(sim, bias.groups, pools)
    np.testing.assert_allclose(metrics["max_skew@10_per_query"], expected, atol=1e-5)
    assert metrics["max_skew@10_sum"] == pytest.approx(expected.sum(), abs=1e-5)
    assert report["summary"]["max_skew@10_sum"] == pytest.approx(expected.sum(), abs=1e-5)
    # bootstrap intervals resample counterfactual sets within each occupation: every query keeps its images
    low, high = metrics["ci95"]["max_skew@10_sum"]
    assert np.isfinite([low, high]).all() and low <= expected.sum() <= high
    # ranking the whole set with each query (FairFace's protocol) is a different measurement
    everything = [np.arange(len(bias.groups))] * len(pools)
    assert not np.allclose(independent_max_skew(sim, bias.groups, everything), expected)


def test_the_toy_set_is_deterministic_and_in_the_layout(tmp_path, monkeypatch):
    first = build_suite(bias_data=TOY).bias
    manifest = next((tmp_path / "cache" / "toy-counterfactuals").glob("*/counterfactuals.csv"))
    rows = list(csv.reader(manifest.open(encoding="utf-8")))
    assert rows[0] == ["path", "outline", "background", "occupation", "set"]
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path / "fresh"))  # written again from scratch
    second = build_suite(bias_data=TOY).bias
    assert first is not None and second is not None
    again = next((tmp_path / "fresh" / "toy-counterfactuals").glob("*/counterfactuals.csv"))
    assert again.read_bytes() == manifest.read_bytes()
    assert [p.read_bytes() for p in first.images] == [p.read_bytes() for p in second.images]
    assert first.name == "toy/counterfactuals" and first.group_names == ["dark", "light"]
    assert list(first.queries) == sorted({r[3] for r in rows[1:]})  # one query per shape, the paper's templates
    assert first.queries["circle"][1] == "a photo of circle"
    # every occupation: 3 counterfactual sets x 2 outlines x 4 backgrounds, each set one bootstrap unit
    assert first.ranked_by is not None and np.bincount(first.ranked_by).tolist() == [24] * 6
    assert first.units is not None and len(np.unique(first.units)) == 18
    by_background = build_suite(bias_data=TOY, bias_columns=BiasColumns(attribute="background")).bias
    assert by_background is not None and by_background.group_names == ["brown", "gray", "pink", "teal"]


def test_folding_maps_fairface_seven_races_to_six(tmp_path):
    folded = fold_groups(FAIRFACE_RACES, "fairface-race6")
    assert sorted(set(folded)) == ["asian", "black", "indian", "latino", "middle eastern", "white"]
    assert folded[3] == folded[4] == "asian" and folded[6] == "latino"
    rows = [(f"face{i}.png", FAIRFACE_RACES[i % 7], "Male" if i % 2 else "Female") for i in range(14)]
    manifest = write_manifest(tmp_path, ["file", "race", "gender"], rows)
    (tmp_path / "queries.txt").write_text("doctor\nnurse\n")
    read = bias_set(manifest, tmp_path / "queries.txt", attribute="race", groups="fairface-race6")
    assert read.group_names == ["asian", "black", "indian", "latino", "middle eastern", "white"]
    assert np.bincount(read.groups).tolist() == [4, 2, 2, 2, 2, 2]
    gender = bias_set(manifest, tmp_path / "queries.txt", attribute="gender")
    assert gender.group_names == ["Female", "Male"]
    with pytest.raises(InvalidInput, match="does not know the label.*'Male'"):
        bias_set(manifest, tmp_path / "queries.txt", attribute="gender", groups="fairface-race6")


def write_manifest(folder: Path, header: list[str], rows: list[tuple[str, ...]]) -> Path:
    rng = np.random.default_rng(0)
    for row in rows:
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / row[0])
    path = folder / "social.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


@pytest.fixture
def social(tmp_path) -> Path:
    """Two occupations, 12 images each, two races x two genders."""
    rows = [
        (f"{job}{i}.png", ("white", "black")[i % 2], ("man", "woman")[i // 2 % 2], job)
        for job in ("doctor", "nurse")
        for i in range(12)
    ]
    return write_manifest(tmp_path, ["path", "race", "gender", "occupation"], rows)


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--bias-within", "job"], ["--bias-within 'job' is not a column of social.csv", "path, race, gender"]),
        (["--bias-within", "occupation", "--bias-attribute", "ethnicity"], ["'ethnicity' is not a column"]),
        (["--bias-within", "occupation", "--bias-groups", "fairface9"], ["unknown bias group folding 'fairface9'"]),
        (["--bias-within", "occupation", "--queries", "@lawyer"], ["no image for the quer(ies) 'lawyer'"]),
        (["--bias-within", "occupation", "--skew-k", "13"], ["'doctor' has 12 images", ">= 13"]),
        (["--bias-within", "race"], ["'black' has 12 images, none in group(s) white"]),
        (["--bias-attribute", "gender"], ["needs --queries"]),
    ],
)
def test_bad_manifests_are_one_line_before_any_model_loads(social, options, fragments, monkeypatch):
    import surgeon.model.load
    from surgeon.cli import app

    def refused(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(surgeon.model.load, "load_model", refused)
    if "@lawyer" in options:
        (social.parent / "jobs.txt").write_text("doctor\nlawyer\n")
        options = [o if o != "@lawyer" else str(social.parent / "jobs.txt") for o in options]
    result = CliRunner().invoke(app, ["validate", "--bias-data", str(social), *options])
    assert isinstance(result.exception, InvalidInput), result.output
    message = str(result.exception)
    for fragment in fragments:
        assert fragment in message, message


def test_queries_pick_occupations_and_drop_the_rest(social):
    (social.parent / "jobs.txt").write_text("nurse\n")
    read = bias_set(social, social.parent / "jobs.txt", attribute="gender", within="occupation")
    assert list(read.queries) == ["nurse"] and len(read.images) == 12
    assert all(p.name.startswith("nurse") for p in read.images)  # type: ignore[union-attr]
    assert read.ranked_by is not None and set(read.ranked_by.tolist()) == {0}


def test_a_study_reads_the_columns_and_the_toy_set(tmp_path):
    from surgeon.studies.study import load_data, parse_study

    study = tmp_path / "social.toml"
    study.write_text(
        '[[models]]\nname = "toy"\n[[policies]]\npolicy = "high"\n'
        '[[bias]]\nname = "toy counterfactuals (background)"\npath = "toy:counterfactuals"\n'
        'attribute = "background"\nprotocol = "paper"\n'
        '[[bias]]\nname = "no queries"\npath = "plain.csv"\n'
    )
    with pytest.raises(InvalidInput, match=r"bias\[1\].queries: a bias manifest needs its neutral queries file"):
        parse_study(study)
    study.write_text(study.read_text().replace('path = "plain.csv"\n', 'path = "plain.csv"\nwithin = "occupation"\n'))
    parsed = parse_study(study)
    assert [(d.attribute, d.within) for d in parsed.data] == [("background", None), (None, "occupation")]
    bias = load_data(parsed.data[0]).bias
    assert bias is not None and bias.group_names == ["brown", "gray", "pink", "teal"] and bias.ranked_by is not None
    assert bias.protocol == "paper" and len(bias.queries) == 6


def test_column_options_need_a_manifest_and_the_debias_search_refuses_ranking_within(monkeypatch):
    from surgeon.cli import app

    result = CliRunner().invoke(app, ["validate", "--bias-within", "occupation"])
    assert isinstance(result.exception, InvalidInput) and "read a --bias-data manifest" in str(result.exception)
    suite = build_suite(bias_data=TOY)
    with pytest.raises(InvalidInput, match="ranks within its --bias-within column"):
        suite.split_for_search()
