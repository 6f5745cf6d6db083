"""clip_benchmark's formats, tested with clip_benchmark itself: its webdataset converter writes the shards
surgeon reads, and its `build` step aggregates the result files surgeon writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from surgeon.core.errors import CorruptInput, InvalidInput, NotFound
from surgeon.model.load import load_model
from surgeon.validation.validate import ValidationSuite, classification_set, validate
from tests.conftest import run_cli

N_IMAGES = 60


@pytest.fixture(scope="module")
def toy_shapes(tmp_path_factory) -> tuple[Path, Path, list[str], list[str]]:
    """The toy world's shape task as an ImageFolder and, converted by clip_benchmark, as a webdataset."""
    from clip_benchmark.webdataset_builder import convert_dataset, path_to_bytes

    from surgeon.inputs.toy import world

    task = next(t for t in world.zeroshot_tasks(n=N_IMAGES) if t.name == "shape")
    root = tmp_path_factory.mktemp("shapes")
    folder = root / "imagefolder"
    for i, (image, label) in enumerate(zip(task.images, task.labels, strict=True)):
        path = folder / task.classnames[label] / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    # the same files in the ImageFolder's order (class folders, then names), labelled in the task's class order
    samples = [(str(p), task.classnames.index(p.parent.name)) for p in sorted(folder.glob("*/*.png"))]

    class Dataset(list):  # what convert_dataset reads: (image, label) pairs with .classes and .templates
        classes = task.classnames
        templates = [t.replace("{}", "{c}") for t in task.templates]

    shards = root / "shapes"
    convert_dataset(Dataset(samples), "test", str(shards), transform=path_to_bytes, max_count=25, verbose=False)
    return folder, shards, task.classnames, task.templates


def test_webdataset_gives_the_imagefolder_numbers(toy_shapes):
    folder, shards, classnames, templates = toy_shapes
    assert len(list((shards / "test").glob("*.tar"))) == 3  # 60 samples, 25 per shard: streamed across shards
    templates_file = folder.parent / "templates.txt"
    templates_file.write_text("\n".join(templates) + "\n", encoding="utf-8")
    from_folder = classification_set(folder, templates_file=templates_file)
    from_shards = classification_set(shards)  # its own classnames.txt and zeroshot_classification_templates.txt
    assert from_shards.name == "wds/shapes" and from_shards.classnames == classnames
    # ImageFolder sorts classes by name; clip_benchmark keeps the task's order: compare per-image class names
    names_of = [from_folder.classnames[i] for i in from_folder.labels]
    assert [from_shards.classnames[i] for i in from_shards.labels] == names_of
    loaded = load_model(None, device="cpu")
    report_folder = validate(loaded, ValidationSuite([from_folder], source="files"))
    report_shards = validate(loaded, ValidationSuite([from_shards], source="files"))
    m_folder, m_shards = report_folder["results"][0]["metrics"], report_shards["results"][0]["metrics"]
    assert m_shards["n"] == N_IMAGES
    assert m_shards == pytest.approx(m_folder, abs=1e-6)
    assert m_shards["acc1"] > 0.5  # the toy model classifies shapes: the labels travelled with their images


def test_webdataset_prefix_and_errors(toy_shapes, tmp_path):
    _, shards, _, _ = toy_shapes
    task = classification_set(shards)
    head = task.images[:7]
    batches = list(head.batches(lambda image: torch.zeros(1), batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    with pytest.raises(NotFound, match="has no classnames.txt"):
        broken = tmp_path / "noclasses"
        (broken / "test").mkdir(parents=True)
        (broken / "test" / "0.tar").write_bytes((shards / "test" / "0.tar").read_bytes())
        classification_set(broken)
    (broken / "classnames.txt").write_text("circle\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match="but 1 class names"):
        classification_set(broken)
    (broken / "classnames.txt").write_text("\n".join(f"c{i}" for i in range(6)), encoding="utf-8")
    (broken / "test" / "0.tar").write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(CorruptInput, match="unreadable webdataset shard"):
        classification_set(broken)
    import webdataset

    png = next(shards.parent.rglob("*.png")).read_bytes()
    with webdataset.TarWriter(str(broken / "test" / "0.tar")) as sink:
        sink.write({"__key__": "s0000000", "png": png})  # no cls: the label pass does not count it
        sink.write({"__key__": "s0000001", "png": png, "cls": 2})
    task = classification_set(broken)
    assert list(task.labels) == [2]
    with pytest.raises(CorruptInput, match="s0000000 .* has no cls member"):
        list(task.images.batches(lambda image: torch.zeros(1), batch_size=4))
    (broken / "test" / "nshards.txt").write_text("2\n")
    with pytest.raises(NotFound, match="shard .*1.tar is missing"):
        classification_set(broken)


def test_json_classnames_and_templates(toy_shapes, tmp_path):
    folder, shards, classnames, templates = toy_shapes
    names = tmp_path / "en_classnames.json"
    names.write_text(json.dumps({"imagefolder": [f"{c} shape" for c in sorted(classnames)]}), encoding="utf-8")
    prompts = tmp_path / "en_zeroshot_classification_templates.json"
    prompts.write_text(json.dumps({"imagenet1k": ["a photo of a {c}."], "shapes": ["a {c} drawing"]}))
    task = classification_set(folder, names, prompts)
    assert task.classnames[0] == f"{sorted(classnames)[0]} shape"
    assert task.templates == ["a photo of a {c}."]  # no entry for imagefolder: imagenet1k's, as clip_benchmark
    assert classification_set(shards, templates_file=prompts).templates == ["a {c} drawing"]  # wds/shapes -> shapes
    with pytest.raises(InvalidInput, match="no entry for wds/shapes or shapes"):
        classification_set(shards, names)
    names.write_text("{not json", encoding="utf-8")
    with pytest.raises(CorruptInput, match="not valid JSON"):
        classification_set(folder, names)


def test_clip_benchmark_build_reads_the_result_files(toy_shapes, tmp_path):
    """`surgeon validate --out DIR` files go through clip_benchmark's own build step unchanged."""
    from clip_benchmark.cli import main_build

    _, shards, _, _ = toy_shapes
    out = tmp_path / "results"
    result = run_cli("validate", "--data", str(shards), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["out"] == str(out)
    files = [Path(f) for f in document["files"]]
    assert [f.relative_to(out).as_posix() for f in files] == [
        "clip_benchmark/shapes__toy_en_zeroshot_classification.json",  # the toy has no pretrained tag
        "validation.json",
    ]
    entry = json.loads(files[0].read_text())
    assert set(entry) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert entry["dataset"] == "wds/shapes" and entry["language"] == "en"

    class Args:  # clip_benchmark build's argparse namespace
        output = str(tmp_path / "benchmark.csv")

    Args.files = [str(out / "clip_benchmark")]  # a folder: build reads every .json in it
    main_build(Args)
    with open(Args.output, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    assert float(rows[0]["acc1"]) == pytest.approx(document["summary"]["mean_acc1"])
    assert rows[0]["model_fullname"] == "toy " and rows[0]["language"] == "en"


def test_validate_missing_data_exits_3(tmp_path):
    result = run_cli("validate", "--data", str(tmp_path / "nonexistent"))
    assert result.returncode == 3, result.stderr
    assert "validation data not found" in result.stderr and "Traceback" not in result.stderr


def test_numbers_are_reproducible(toy_shapes):
    _, shards, _, _ = toy_shapes
    loaded = load_model(None, device="cpu")
    suite = ValidationSuite([classification_set(shards)], source="files")
    first, second = validate(loaded, suite), validate(loaded, suite)
    assert first["results"] == second["results"]
    assert np.isfinite(first["results"][0]["metrics"]["acc1"])
