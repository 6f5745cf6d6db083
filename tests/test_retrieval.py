"""Image <-> text retrieval as a validation family (surgeon.results.retrieval): clip_benchmark's layouts and metrics,
checked against an independent numpy computation from the exported ONNX graphs."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from surgeon.api import ModelSpec, PruneSpec, ValidateSpec, ValidationSpec, run_prune, run_validate
from surgeon.core.errors import CorruptInput, InvalidInput
from surgeon.model.heads import parse_heads
from surgeon.model.hooks import vision_blocks, vision_tower
from surgeon.model.load import load_model
from surgeon.results.records import check_validation_report
from surgeon.validation.validate import Gates, ValidationSuite, build_suite, heads_zeroed, retrieval_set, validate

WORDS = ["red", "blue", "green", "dog", "cat", "bird", "tree", "car", "boat", "house", "sun", "moon"]


def caption_manifest(folder: Path, n_images: int = 14, seed: int = 0) -> Path:
    """n PNGs and a path,caption CSV: every image has 1-3 distinct captions (so both directions differ)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        for j in range(1 + i % 3):
            rows.append((f"im{i}.png", f"{WORDS[i % 12]} {WORDS[(i + j + 3) % 12]} number {i} caption {j}"))
    manifest = folder / "captions.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
    return manifest


def numpy_retrieval(image_emb: np.ndarray, text_emb: np.ndarray, owners: np.ndarray) -> dict[str, float]:
    """The metrics from full argsorts: the rank of the first right answer in each query's sorted list."""
    image_emb = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)
    text_emb = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    scores = text_emb @ image_emb.T
    text_ranks = np.array([int(np.nonzero(np.argsort(-row) == owners[t])[0][0]) + 1 for t, row in enumerate(scores)])
    image_ranks = np.array(
        [int(np.nonzero(owners[np.argsort(-scores[:, i])] == i)[0][0]) + 1 for i in range(len(image_emb))]
    )
    metrics = {}
    for prefix, ranks in (("image_retrieval", text_ranks), ("text_retrieval", image_ranks)):
        metrics |= {f"{prefix}_recall@{k}": float(np.mean(ranks <= k)) for k in (1, 5, 10)}
        metrics[f"{prefix}_median_rank"] = float(np.median(ranks))
        metrics[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    return metrics


def test_recall_equals_numpy_from_exported_onnx(tmp_path, tiny_default_dir):
    manifest = caption_manifest(tmp_path / "data")
    out = tmp_path / "run"
    spec = PruneSpec(
        model=ModelSpec(f"local-dir:{tiny_default_dir}", device="cpu"),
        policy="heads",
        heads="L1.H0,L2.H3",
        export="both",
        validation=ValidationSpec(retrieval_data=manifest),
        out_dir=out,
    )
    spec.check()
    result = run_prune(spec)
    assert result.exported
    validation = json.loads((out / "validation.json").read_text())
    check_validation_report(validation, "validation.json")
    (after,) = validation["after"]["results"]
    assert after["task"] == "zeroshot_retrieval" and after["metrics"]["n_texts"] == 27

    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    rows = list(csv.reader(manifest.open(encoding="utf-8")))[1:]
    names = list(dict.fromkeys(r[0] for r in rows))
    owners = np.array([names.index(r[0]) for r in rows])
    pixels = np.stack([loaded.preprocess(Image.open(manifest.parent / n)).numpy() for n in names])
    tokens = loaded.tokenizer([r[1] for r in rows]).numpy()
    visual = ort.InferenceSession(str(out / "onnx" / "visual.onnx"))
    text = ort.InferenceSession(str(out / "onnx" / "text.onnx"))
    image_emb = visual.run(None, {"pixel_values": pixels})[0]
    text_emb = text.run(None, {"input_ids": tokens})[0]
    expected = numpy_retrieval(image_emb, text_emb, owners)
    for key, value in expected.items():
        assert after["metrics"][key] == pytest.approx(value, abs=1e-9), key
    # the pruning changed what was measured: before differs from after (the exported graphs are the pruned model)
    (before,) = validation["before"]["results"]
    assert before["metrics"] != after["metrics"]
    # the card's model-index lists both directions with their task types; clip_benchmark files carry the task
    card = (out / "README.md").read_text()
    assert "task: {type: text-to-image-retrieval}" in card and "task: {type: image-to-text-retrieval}" in card
    assert "name: image_retrieval_recall@1, value: " in card
    assert "| captions.csv | image_retrieval_recall@1 |" in (out / "report.md").read_text()
    summary = validation["after"]["summary"]
    assert summary["mean_recall1"] == after["metrics"]["image_retrieval_recall@1"] and summary["mean_acc1"] is None


def retrieval_webdataset(folder: Path, n: int = 6, uncaptioned: int | None = None) -> Path:
    """clip_benchmark's retrieval export: test/0.tar of (png, txt with one caption per line), dataset_type.txt;
    sample `uncaptioned` has no txt."""
    rng = np.random.default_rng(1)
    (folder / "test").mkdir(parents=True)
    (folder / "dataset_type.txt").write_text("retrieval\n")
    with tarfile.open(folder / "test" / "0.tar", "w") as tar:
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png, format="PNG")
            members = {"png": png.getvalue(), "txt": f"{WORDS[i]} one\n{WORDS[i]} two\n".encode()}
            if i == uncaptioned:
                del members["txt"]
            for ext, data in members.items():
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


def test_clip_benchmark_retrieval_export_as_data(tmp_path, tiny_default_dir):
    """`--data` naming clip_benchmark's retrieval export makes a retrieval set (not a classification set)."""
    folder = retrieval_webdataset(tmp_path / "flickr-mini")
    spec = ValidateSpec(ModelSpec(f"local-dir:{tiny_default_dir}", device="cpu"), ValidationSpec(data=folder))
    spec.validation.check()
    suite = spec.validation.build(spec.model.model)
    assert not suite.tasks and suite.bias is None and suite.retrieval[0].name == "wds/flickr-mini"
    report, files = run_validate(ValidateSpec(spec.model, spec.validation, tmp_path / "out"), suite)
    (entry,) = report["results"]
    assert entry["metrics"]["n_images"] == 6 and entry["metrics"]["n_texts"] == 12
    (result_file,) = [p for p in files if p.name != "validation.json"]
    assert result_file.name.startswith("flickr-mini_") and result_file.name.endswith("_en_zeroshot_retrieval.json")
    written = json.loads(result_file.read_text())
    assert written["task"] == "zeroshot_retrieval" and "text_retrieval_recall@5" in written["metrics"]


def test_bad_retrieval_data_is_one_clear_error(tmp_path):
    manifest = caption_manifest(tmp_path / "data", n_images=3)
    with open(manifest, "a", encoding="utf-8") as handle:
        handle.write("im0.png,\n")
    with pytest.raises(InvalidInput, match=r"line 8: 2 column\(s\), column 2 is empty"):
        build_suite(retrieval=manifest)
    (tmp_path / "data" / "clip.mp4").write_bytes(b"")  # named files must exist: that is checked first
    (tmp_path / "data" / "mixed.csv").write_text("path,caption\nim0.png,a\nclip.mp4,b\n")
    with pytest.raises(InvalidInput, match="mixes videos and images"):
        build_suite(retrieval=tmp_path / "data" / "mixed.csv")
    with pytest.raises(InvalidInput, match="not a retrieval set"):
        build_suite(retrieval=tmp_path / "data")
    suite = build_suite(retrieval=retrieval_webdataset(tmp_path / "broken", n=3, uncaptioned=1))
    with pytest.raises(CorruptInput, match="s0001 .* has no txt member"):  # never an image paired with another's text
        validate(load_model(None), suite)


def test_recall_gate(tmp_path):
    before = {"summary": {"mean_acc1": None, "mean_recall1": 0.5}, "results": []}
    after = {"summary": {"mean_acc1": None, "mean_recall1": 0.42}, "results": []}
    assert Gates(max_recall_drop=10).check(before, after) == []
    (failure,) = Gates(max_recall_drop=5).check(before, after)
    assert failure.startswith("max-recall-drop: mean R@1 fell 8.00 points")
    suite = build_suite(retrieval=caption_manifest(tmp_path / "d", n_images=2))
    Gates(max_recall_drop=1).check_measurable(suite)
    with pytest.raises(InvalidInput, match="needs a retrieval set"):
        Gates(max_recall_drop=1).check_measurable(build_suite(data=Path("toy")))


def test_a_study_with_retrieval_columns(tmp_path):
    """[[retrieval]] tables: one column each (text -> image / video R@1 in %), the change from the unpruned
    model per policy, the same number a direct validation of the pruned model gives."""
    from surgeon.studies.study import compute_study, parse_study

    study_file = tmp_path / "study.toml"
    study_file.write_text(
        'name = "t"\n[[models]]\nname = "toy"\n[[policies]]\npolicy = "heads"\nheads = "L1.H0,L1.H1"\n'
        '[[retrieval]]\nname = "captions"\npath = "toy:captions"\nn = 40\n'
        '[[retrieval]]\nname = "videos"\npath = "toy:videos"\nn = 6\nframes = 4\n'
    )
    run = compute_study(parse_study(study_file), tmp_path / "out")
    assert run.table is not None
    columns = {c["name"]: c for c in run.table["columns"]}
    assert columns["captions"]["metric"] == "image_retrieval_recall@1" and columns["videos"]["kind"] == "retrieval"
    table = (tmp_path / "out" / "table.md").read_text()
    assert "captions (R@1 %)" in table and "videos (R@1 %)" in table
    pruned = next(r for r in run.table["rows"] if r["policy"] == "heads")
    loaded = load_model(None)
    with heads_zeroed(vision_blocks(vision_tower(loaded.model)), parse_heads("L1.H0,L1.H1")):
        suite = ValidationSuite([], None, "toy", "toy videos", [retrieval_set(Path("toy:videos"), frames=4, n=6)])
        direct = validate(loaded, suite)
    assert pruned["cells"]["videos"]["value"] == direct["results"][0]["metrics"]["video_retrieval_recall@1"]


def test_grpc_validation_data_names_retrieval_sets_inside_the_data_root(tmp_path):
    """ValidationData.retrieval_data / frames / templates map to the spec; a manifest may not reach outside
    the data root (its images are checked as the classification manifests' are)."""
    from surgeon.core.errors import PermissionDenied
    from surgeon.server.paths import Root
    from surgeon.server.specs import ServerConfig, SpecBuilder
    from surgeon.v1 import surgeon_pb2 as pb

    data = tmp_path / "data"
    caption_manifest(data / "caps", n_images=3)
    config = ServerConfig(
        Root.create("exports", tmp_path / "exports", make=True), Root.create("models", None), Root.create("data", data)
    )
    builder = SpecBuilder(config)
    spec, build = builder.suite(pb.ValidationData(retrieval_data="caps/captions.csv", frames=32, templates="food101"))
    assert spec.retrieval_data == data / "caps" / "captions.csv" and spec.frames == 32
    assert spec.templates == Path("food101")
    assert build(None).retrieval[0].n_items == 3
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside)
    (data / "escape.csv").write_text("path,caption\n../elsewhere.png,out of bounds\n")
    with pytest.raises(PermissionDenied):
        builder.suite(pb.ValidationData(retrieval_data="escape.csv"))
