"""CLI conventions: --version, completion, the exit codes in --help, one JSON document per verb with --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surgeon import __version__
from surgeon.cli import app
from tests.conftest import run_cli

runner = CliRunner()


def run_json(*args: str) -> dict:
    """Invoke a verb in-process with --json: stdout must be exactly one JSON document with the common keys."""
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    document = json.loads(result.stdout)
    assert {"command", "out", "files", "summary"} <= set(document)
    for name in document["files"]:
        assert Path(name).is_file(), name
    return document


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag):
    result = run_cli(flag)
    assert result.returncode == 0 and result.stdout.strip() == f"surgeon {__version__}"


def test_unknown_plot_format_exits_2_before_any_work(tmp_path):
    result = run_cli("rank", "--plot-format", "gif", "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "unknown plot format 'gif'" in result.stderr and not (tmp_path / "r").exists()


def test_help_lists_exit_codes_and_completion():
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for code in ("2 invalid input", "3 not found", "4 corrupt input", "10 validation gate failed", "130 interrupted"):
        assert code in text
    assert "--install-completion" in text and "--show-completion" in text
    for verb in (["validate"], ["toy", "images"]):
        assert "3 not found" in " ".join(runner.invoke(app, [*verb, "--help"], terminal_width=200).stdout.split())


@pytest.fixture
def shapes(tmp_path) -> Path:
    """A small ImageFolder of toy shapes, to keep validation quick."""
    from PIL import Image

    from surgeon.inputs.toy import world

    task = next(t for t in world.zeroshot_tasks(n=24) if t.name == "shape")
    for i, (image, label) in enumerate(zip(task.images, task.labels, strict=True)):
        path = tmp_path / "shapes" / task.classnames[label] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return tmp_path / "shapes"


def test_json_of_every_verb(tmp_path, shapes):
    data = ("--data", str(shapes))
    ranked = run_json("rank", "--n-images", "64", "--out", str(tmp_path / "rank"), "--quiet", "--plot-format", "svg")
    assert ranked["files"][-1] == str(tmp_path / "rank" / "ccs_heatmap.svg")
    assert ranked["command"] == "rank" and ranked["out"] == str(tmp_path / "rank")
    assert ranked["summary"]["heads"] == len(ranked["heads"]) == 32 and ranked["summary"]["images"] == 64
    ranking = str(tmp_path / "rank" / "ranking.json")

    pruned = run_json(
        "prune", "--ranking", ranking, "--policy", "top-k", "--k", "1", "--out", str(tmp_path / "run"), *data
    )
    assert pruned["summary"]["after"]["mean_acc1"] <= 1 and len(pruned["heads"]) == 1
    files = {Path(f).relative_to(tmp_path / "run").as_posix() for f in pruned["files"]}
    assert {"plan.json", "validation.json", "report.md", "open_clip_model.safetensors"} <= files
    # clip_benchmark's files for the original and the pruned model, told apart by the pretrained tag
    benchmark = sorted(f for f in files if f.startswith("clip_benchmark/"))
    assert benchmark == [
        "clip_benchmark/shapes__toy_en_zeroshot_classification.json",
        "clip_benchmark/shapes_pruned-top-k-1_toy_en_zeroshot_classification.json",
    ]

    sweep = ("sweep", "--ranking", ranking, "--counts", "0,2", "--seeds", "2", "--plot-format", "pdf")
    swept = run_json(*sweep, "--out", str(tmp_path / "sweep"), *data)
    assert set(swept["summary"]) == {"high-CCS first", "low-CCS first", "random (mean of 2 seeds)"}
    assert swept["counts"] == [0, 2] and swept["files"][-1].endswith("sweep.pdf")

    exported = run_json("export", str(tmp_path / "run"), "--format", "safetensors")
    assert exported["out"] == str(tmp_path / "run" / "export-safetensors") and exported["summary"]["files"] >= 1

    validated = run_json("validate", "--out", str(tmp_path / "validation"), *data)
    assert validated["summary"]["mean_acc1"] > 0.5
    assert all(r["language"] == "en" for r in validated["results"])

    listed = run_json("models")
    assert listed["models"][0]["name"] == "toy" and listed["summary"]["models"] == len(listed["models"])

    images = run_json("toy", "images", "--out", str(tmp_path / "pngs"), "--n", "3")
    assert len(images["files"]) == 4  # 3 PNGs and labels.csv
