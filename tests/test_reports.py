"""What reports say (issue 23, item 7): accuracy and its changes in one unit everywhere (terminal, report.md,
card), a trivial acc5 flagged, the card telling how heads were chosen and which bias protocol made the
figures, sets and models named readably, and the TextSpan clamp note naming its real cause."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from surgeon.model.load import load_model, normalised_source
from surgeon.pruning.prune import prune
from surgeon.ranking.rank import HeadRank, Ranking
from surgeon.selection.policies import PolicyOptions
from surgeon.validation.validate import UNITS_NOTE, bias_set, classification_set, set_name
from tests.conftest import synthetic_suite


@pytest.fixture
def runs(setup, tmp_path, tiny_default_dir):
    """(a top-k run that read a ranking, a heads run that read none), each on the synthetic suite."""
    loaded, ranking = setup
    top = prune(loaded, ranking, synthetic_suite(), "top-k", PolicyOptions(k=2), out_dir=tmp_path / "top")
    fresh = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    heads = prune(fresh, None, synthetic_suite(), "heads", PolicyOptions(heads="L1.H2"), out_dir=tmp_path / "heads")
    return top, heads


def _acc1(report: dict) -> float:
    return next(r["metrics"]["acc1"] for r in report["results"] if r["task"] == "zeroshot_classification")


def test_accuracy_changes_are_points_everywhere(runs, capsys):
    from surgeon.cli import _print_summary

    result = runs[0]
    before, after = _acc1(result.before), _acc1(result.after)
    row = f"| synthetic/colors | acc1 | {100 * before:.2f} | {100 * after:.2f} | {100 * (after - before):+.2f} |"
    report = (result.run_dir / "report.md").read_text()
    card = (result.run_dir / "README.md").read_text()
    for text in (report, card):
        assert row in text and UNITS_NOTE in text
    _print_summary(result.before, result.after)
    terminal = capsys.readouterr().out
    mean_before, mean_after = result.before["summary"]["mean_acc1"], result.after["summary"]["mean_acc1"]
    assert re.search(rf"mean_acc1 \(%\)\s*│\s*{100 * mean_before:.2f}\s*│\s*{100 * mean_after:.2f}", terminal)
    assert f"{100 * (mean_after - mean_before):+.2f}" in terminal and UNITS_NOTE in terminal
    floor = next(r for r in result.before["results"] if r["task"] == "bias")["metrics"]["chance"]["max_skew@10"]
    assert f"max_skew@10 of a ranking that ignores the images: {floor:.4f}" in terminal


def test_acc5_of_few_classes_is_flagged(runs):
    card = (runs[0].run_dir / "README.md").read_text()  # the synthetic set has 4 classes
    assert "| synthetic/colors | acc5 (trivial: 4 classes) | 100.00 | 100.00 | +0.00 |" in card
    assert "acc5 with at most 5 classes is always 100 %" in card


def test_the_card_says_how_heads_were_chosen_and_which_bias_protocol(runs):
    top, heads = (r.run_dir / "README.md" for r in runs)
    top_card, heads_card = top.read_text(), heads.read_text()
    assert "chosen by the `top-k` policy (the k heads with the highest CCS)" in top_card
    assert "reading a Concept Consistency Score (CCS) ranking" in top_card and "| concept label | CCS |" in top_card
    assert "ranked by" not in heads_card and "| concept label | CCS |" not in heads_card
    assert "chosen by the `heads` policy (listed by the user: L1.H2), without a" in heads_card
    heads_report = (runs[1].run_dir / "report.md").read_text()
    for text in (heads_card, heads_report):  # no empty label and CCS columns where no ranking was read
        assert "| L1.H2 | listed by the user |" in text and "| CCS |" not in text
    protocol = "Bias on synthetic/bias: the `surgeon` protocol — desired distribution p* uniform over the groups"
    assert protocol in top_card and "MaxSkew@10 averaged over 2 neutral queries" in top_card
    floor = top_card.split("A ranking that ignores the images scores MaxSkew@10 ")[1].split(" ")[0]
    chance = next(r for r in runs[0].before["results"] if r["task"] == "bias")["metrics"]["chance"]
    assert float(floor) == pytest.approx(chance["max_skew@10"], abs=1e-4) and chance["method"] == "exact"


def test_sets_are_named_by_more_than_their_split_folder(tmp_path):
    data = tmp_path / "imagenette" / "val"
    for cls in ("cat", "dog"):
        (data / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / cls / "0.png")
    assert classification_set(data).name == "imagenette/val"
    assert classification_set(tmp_path / "imagenette" / "." / "val").name == "imagenette/val"
    manifest = tmp_path / "faces" / "test.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,group\n../imagenette/val/cat/0.png,a\n../imagenette/val/dog/0.png,b\n")
    (tmp_path / "queries.txt").write_text("a person\n")
    assert bias_set(manifest, tmp_path / "queries.txt", k=2).name == "faces/test.csv"
    snapshot = tmp_path / "hub" / "datasets--djghosh--wds_cifar10_test" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    assert set_name(snapshot) == "djghosh/wds_cifar10_test"  # not the commit hash
    assert set_name(tmp_path / "flowers") == "flowers"


def test_model_labels_are_normalised(tiny_default_dir, tmp_path):
    from surgeon.studies.study import parse_study

    crooked = f"{tiny_default_dir.parent}//{tiny_default_dir.name}/../{tiny_default_dir.name}"
    loaded = load_model(f"local-dir:{crooked}", device="cpu")
    assert loaded.identity == f"local-dir:{tiny_default_dir}"
    assert normalised_source("ckpts//b32/../b32.safetensors") == "ckpts/b32.safetensors"
    assert ".." not in normalised_source("local-dir:../models//b32")
    study = tmp_path / "study.toml"
    study.write_text(f'name = "s"\n[[models]]\nname = "local-dir:{crooked}"\n[[policies]]\npolicy = "heads"\n'
                     'heads = "L1.H0"\n[[data]]\nname = "shape"\npath = "toy:shape"\n')  # fmt: skip
    label = parse_study(study).models[0].label
    assert "//" not in label and "/../" not in label


def _ranking(count: int, ranks: list[int]) -> Ranking:
    heads = [
        HeadRank(layer=0, head=i, texts=[], stds=[], label="x", verdicts=[], ccs=0, variance=1.0, effective_rank=r)
        for i, r in enumerate(ranks)
    ]
    return Ranking(model={"name": "t"}, images={"count": count}, layers=[0], n_heads=len(ranks), m=3, span_rank=80,
                   pool={}, judge="lexicon", heads=heads)  # fmt: skip


def test_the_clamp_note_names_the_image_count_when_it_is_the_limit():
    by_images = _ranking(40, [40, 40]).clamp_note()
    assert by_images is not None and "float rounding" not in by_images
    assert "40 images span at most 40 directions: pass more images" in by_images
    assert "directions beyond are float rounding" in (_ranking(400, [64, 60]).clamp_note() or "")
    mixed = _ranking(40, [40, 31]).clamp_note() or ""
    assert "1 of them limited by the 40 images" in mixed
    assert _ranking(400, [80, 80]).clamp_note() is None


def test_validation_json_keeps_the_class_count(runs):
    validation = json.loads((runs[0].run_dir / "validation.json").read_text())
    assert validation["after"]["results"][0]["metrics"]["classes"] == 4


def test_the_floor_note_names_the_sum_under_the_paper_protocol():
    from surgeon.validation.validate import bias_protocol_note

    chance = {"max_skew@10": 0.2, "max_skew@10_sum": 0.4}
    metrics = {"protocol": "paper", "max_skew@10": 0.5, "max_skew@10_sum": 1.0, "queries": ["a", "b"]}
    paper = bias_protocol_note({"dataset": "set", "metrics": {**metrics, "chance": chance}})
    assert "scores MaxSkew@10 summed over the queries 0.4000 here in expectation" in paper
    surgeon = bias_protocol_note({"dataset": "set", "metrics": {**metrics, "protocol": "surgeon", "chance": chance}})
    assert "scores MaxSkew@10 0.2000 here in expectation" in surgeon


def test_chance_is_called_the_floor_only_where_the_figure_is_above_it():
    """On counterfactual sets a ranking by content can be more balanced than chance (the toy's backgrounds,
    paper protocol: 1.3816 summed against 2.3312): the note says so instead of calling 2.3312 a floor."""
    from surgeon.validation.validate import bias_protocol_note

    chance = {"max_skew@10": 0.3885, "max_skew@10_sum": 2.3312}
    metrics = {"protocol": "paper", "max_skew@10": 0.2303, "max_skew@10_sum": 1.3816, "chance": chance}
    below = bias_protocol_note({"dataset": "set", "metrics": metrics})
    assert "floor" not in below
    assert "2.3312 here in expectation, not less than this model's 1.3816" in below
    above = bias_protocol_note({"dataset": "set", "metrics": {**metrics, "max_skew@10_sum": 2.5}})
    assert above.endswith("2.3312 here in expectation: the figure's floor.")


def test_a_prune_reports_chance_note_reads_the_pruned_figure_too():
    """A pruning that takes MaxSkew below chance: the note called chance "the figure's floor" from the unpruned
    figure alone, under a table whose after column read lower."""
    from surgeon.validation.validate import markdown_report

    chance = {"max_skew@10": 0.2070}

    def report(skew: float) -> dict:
        bias = {"protocol": "surgeon", "max_skew@10": skew, "ndkl": 0.01, "chance": chance}
        return {"summary": {"max_skew@10": skew}, "results": [{"dataset": "probe", "task": "bias", "metrics": bias}]}

    lower = markdown_report(report(0.4232), report(0.1500))
    assert "floor" not in lower and "not less than the pruned model's 0.1500" in lower
    assert "the figure's floor." in markdown_report(report(0.4232), report(0.3442))
