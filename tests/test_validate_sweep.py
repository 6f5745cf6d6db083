"""Validation on user data (ImageFolder, CSV manifests), the layer-cached evaluator, sweeps, the CLI verbs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from surgeon.core.errors import InvalidInput, NotFound
from surgeon.model.heads import HeadRef
from surgeon.model.load import load_model
from surgeon.validation.sweep import run_sweep
from surgeon.validation.validate import Evaluator, Gates, build_suite, validate
from tests.conftest import run_cli, synthetic_suite


def test_imagefolder_csv_and_bias_manifest(tiny_default_dir, user_data):
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    suite = build_suite(
        user_data / "imagefolder", bias_data=user_data / "bias.csv", queries=user_data / "queries.txt", skew_k=4
    )
    assert suite.tasks[0].classnames == ["blue thing", "dog", "red thing"] and len(suite.tasks[0].labels) == 12
    report = validate(loaded, suite)
    cls, bias = report["results"]
    assert cls["task"] == "zeroshot_classification" and 0 <= cls["metrics"]["acc1"] <= cls["metrics"]["acc5"] <= 1
    assert bias["task"] == "bias" and bias["metrics"]["queries"] == ["doctor", "nurse"]
    assert 0 <= bias["metrics"]["max_skew@4"] <= np.log(2) + 1e-9  # two groups, uniform target
    manifest = build_suite(user_data / "manifest.csv")
    assert manifest.tasks[0].classnames == ["dog", "red thing"] and list(manifest.tasks[0].labels[:4]) == [0] * 4


@pytest.mark.parametrize(
    ("kwargs", "message", "error"),
    [
        ({"data": "empty"}, "is empty", InvalidInput),
        ({"data": "manifest_missing.csv"}, "not found", NotFound),
        ({"bias_data": "bias_missing.csv", "queries": "two_names.txt"}, "manifest not found", NotFound),
        ({"bias_data": "bias.csv"}, "needs --queries", InvalidInput),
        ({"data": "imagefolder", "classnames": "two_names.txt"}, "2 names for 3 classes", InvalidInput),
    ],
)
def test_bad_validation_data(user_data, kwargs, message, error):
    (user_data / "empty").mkdir()
    (user_data / "two_names.txt").write_text("a\nb\n")
    with pytest.raises(error, match=message):
        build_suite(**{k: user_data / v for k, v in kwargs.items()})


def test_layer_cache_gives_identical_numbers_and_restores_weights(setup):
    loaded, ranking = setup
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    heads = [HeadRef(2, 0), HeadRef(2, 3), HeadRef(1, 1)]
    naive = Evaluator(loaded, synthetic_suite(), first_layer=0)
    cached = Evaluator(loaded, synthetic_suite(), first_layer=1)
    streamed = Evaluator(loaded, synthetic_suite(), first_layer=1, cache=False)  # nothing kept
    assert not streamed._prefixes and cached._prefixes
    assert naive.evaluate(heads) == cached.evaluate(heads) == streamed.evaluate(heads)
    assert naive.evaluate([]) != naive.evaluate(heads)
    assert all((v == loaded.model.state_dict()[k]).all() for k, v in state.items())
    with pytest.raises(InvalidInput, match="only re-runs layers >= 1"):
        cached.evaluate([HeadRef(0, 0)])


def test_sweep_curves(setup):
    loaded, ranking = setup
    result = run_sweep(loaded, ranking, synthetic_suite(), counts=[0, 2, 4])
    assert set(result["curves"]) == {"high-CCS first", "low-CCS first", "random (seed 0)"}
    starts = {c[0]["mean_acc1"] for c in result["curves"].values()}
    assert len(starts) == 1  # zero heads pruned: the same model for every ordering
    with pytest.raises(InvalidInput):
        run_sweep(loaded, ranking, synthetic_suite(), counts=[0, 99])


def test_gates():
    before = {"summary": {"mean_acc1": 0.90, "max_skew@10": 0.5}}
    after = {"summary": {"mean_acc1": 0.86, "max_skew@10": 0.2}}
    assert Gates(max_acc_drop=5).check(before, after) == []
    assert "fell 4.00 points" in Gates(max_acc_drop=3).check(before, after)[0]
    assert "max-skew" in Gates(max_skew=0.1).check(before, after)[0]
    assert "min-acc" in Gates(min_acc=90).check(before, after)[0]


def test_validate_and_sweep_cli(tiny_default_dir, user_data, image_folder, pool_file, tmp_path):
    taxonomy = tmp_path / "tax.json"
    taxonomy.write_text(json.dumps({"concepts": {"animals": {"terms": ["dog", "cat"]}}}))
    model = ["--model", f"local-dir:{tiny_default_dir}"]
    data = [
        "--data",
        str(user_data / "imagefolder"),
        "--bias-data",
        str(user_data / "bias.csv"),
        "--queries",
        str(user_data / "queries.txt"),
        "--skew-k",
        "4",
    ]
    result = run_cli("validate", *model, *data, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["summary"]["mean_acc1"] >= 0
    bad = run_cli(
        "prune",
        *model,
        *data,
        "--policy",
        "top-k",
        "--k",
        "0",
        "--images",
        str(image_folder),
        "--texts",
        str(pool_file),
    )
    assert bad.returncode == 2 and "k must be an integer in 1.." in bad.stderr
    gated = run_cli(
        "prune",
        *model,
        *data,
        "--policy",
        "top-k",
        "--k",
        "2",
        "--images",
        str(image_folder),
        "--texts",
        str(pool_file),
        "--layers",
        "1-2",
        "--max-skew",
        "-1",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    )
    assert gated.returncode == 10 and "max-skew" in gated.stderr
    assert (tmp_path / "run" / "report.md").exists() and not (tmp_path / "run" / "open_clip_model.safetensors").exists()
