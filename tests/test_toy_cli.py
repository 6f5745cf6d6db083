"""The embedded default end to end: every verb with no arguments beyond the verb, on the bundled toy model."""

from __future__ import annotations

import json
import os

import onnxruntime as ort
import pytest

from surgeon.model.load import TOY_MODEL_DIR
from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(
    not (TOY_MODEL_DIR / "open_clip_config.json").is_file(), reason="the bundled toy model is not built"
)


def test_bundled_model_loads_in_plain_open_clip():
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{TOY_MODEL_DIR}")
    size = sum(p.stat().st_size for p in TOY_MODEL_DIR.iterdir())
    assert size <= 40 * 2**20 and model.visual.transformer.layers >= 4


def test_bundled_model_was_trained_on_this_world_with_the_default_recipe():
    """Changing the world's rendering or the training defaults means retraining the bundled model."""
    from surgeon.inputs.toy.world import WORLD_VERSION
    from surgeon.studies.toy_train import TrainConfig

    meta = json.loads((TOY_MODEL_DIR / "open_clip_config.json").read_text())["surgeon_toy"]
    assert meta["world_version"] == WORLD_VERSION
    assert meta["train_config"] == json.loads(json.dumps(TrainConfig().to_json()))


@pytest.mark.slow  # every verb on the bundled toy model
def test_rank_and_prune_debias_onnx_with_no_arguments(tmp_path):
    exports = tmp_path / "exports"
    ranked = run_cli("rank", "--quiet", "--out", str(exports / "rank"))
    assert ranked.returncode == 0, ranked.stderr
    ranking = json.loads((exports / "rank" / "ranking.json").read_text())
    assert ranking["pool"]["name"] == "toy" and ranking["judge"] == "lexicon"
    factors = {"colors", "shapes", "sizes", "positions", "backgrounds", "textures", "none"}
    assert {h["label"] for h in ranking["heads"]} <= factors and all(
        h["ccs"] == sum(h["verdicts"]) for h in ranking["heads"]
    )
    pruned = run_cli("prune", "--policy", "debias", "--export", "onnx", "--quiet", "--out", str(exports / "run"))
    assert pruned.returncode in (0, 10), pruned.stderr  # 10: a gate failed (none are set by default)
    run = exports / "run"
    plan = json.loads((run / "plan.json").read_text())
    assert plan["policy"] == "debias" and plan["heads"] and all("lowered bias" in h["reason"] for h in plan["heads"])
    assert "val split" in plan["selected_on"] and "test split, bias probes (seeds 0, 7, 8, 9)" in plan["validated_on"]
    validation = json.loads((run / "validation.json").read_text())
    before, after = validation["before"]["summary"], validation["after"]["summary"]
    assert after["max_skew@10"] < before["max_skew@10"]  # selected on the search probe, holds on the held-out one
    session = ort.InferenceSession(str(run / "onnx" / "visual.onnx"))
    assert session.get_inputs()[0].name == "pixel_values"
    card = (run / "README.md").read_text()
    assert "library_name: open_clip" in card and "debias" in card
    # export and infer with no arguments take the newest run of ./exports and, for infer, held-out toy images
    exported = run_cli("export", cwd=tmp_path)
    assert exported.returncode == 0 and f"newest run: {run}" in " ".join(exported.stderr.split()), exported.stderr
    assert (run / "export-onnx" / "onnx" / "visual.onnx").is_file()
    inferred = run_cli("infer", "--json", "-k", "1", cwd=tmp_path)
    assert inferred.returncode == 0, inferred.stderr
    result = json.loads(inferred.stdout)
    assert result["export"] == str(run / "export-onnx" / "onnx") and len(result["predictions"]) == 8
    right = [p["top"][0]["label"] in p["image"] for p in result["predictions"]]  # names carry the true shape
    assert sum(right) >= 6, result  # the debiased model still classifies shapes (96% before pruning)


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--steps", "0"], "step count", 2),
        (["--steps", "-3"], "step count", 2),
    ],
)
def test_toy_train_refuses_bad_input(tmp_path, args, message, code):
    result = run_cli("toy", "train", "--out", str(tmp_path / "model"), *args)
    assert result.returncode == code and message in result.stderr
    assert not (tmp_path / "model").exists()


def test_toy_train_refuses_existing_and_unwritable_folders(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    result = run_cli("toy", "train", "--out", str(existing), "--steps", "1")
    assert result.returncode != 0 and "--force" in result.stderr
    assert (existing / "keep.txt").read_text() == "mine"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = run_cli("toy", "train", "--out", str(locked / "model"), "--steps", "1")
        assert result.returncode != 0 and "write" in result.stderr.lower()


def test_toy_images_writes_pngs_and_labels(tmp_path):
    result = run_cli("toy", "images", "--out", str(tmp_path / "world"), "--n", "12")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "world").glob("**/*.png"))) == 12
    header = (tmp_path / "world" / "labels.csv").read_text().splitlines()[0]
    assert "shape" in header and "group" in header
