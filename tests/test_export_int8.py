"""int8 exports of runs of real (non-toy) models: a run records which data validated it (paths and content
hashes), `surgeon export RUN --quantize int8` measures int8 on it (or on --data), and reports the int8 graphs'
parity as measured; an export says what it will write before writing; bad options fail before loading."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from dataclasses import replace

import numpy as np
import onnx
import pytest
from PIL import Image

from surgeon.api import ExportSpec, ModelSpec, PruneSpec, ValidationSpec, run_export, run_prune
from surgeon.core.errors import InvalidInput, PreconditionFailed, StorageError
from surgeon.validation.datarecord import DATA_RECORD

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def colour_folder(root, per_class: int = 4, seed: int = 0):
    """An ImageFolder of noisy colour fields, three classes."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(colour, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A tiny real model pruned by the API the CLI and the service use, validated on an ImageFolder."""
    from tests.conftest import save_local_dir, tiny_config

    base = tmp_path_factory.mktemp("int8")
    model = save_local_dir(base / "tiny", tiny_config("default"))
    data = colour_folder(base / "colours" / "val")
    spec = PruneSpec(
        model=ModelSpec(f"local-dir:{model}", device="cpu"),
        policy="heads",
        heads="L1.H2,L2.H0",
        validation=ValidationSpec(data=data),
        out_dir=base / "run",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SURGEON_CACHE_DIR", str(base / "cache"))
        run_prune(spec)
    return namedtuple("Run", "dir data")(base / "run", data)


def test_a_run_records_its_validation_data(recorded_run):
    record = json.loads((recorded_run.dir / DATA_RECORD).read_text())
    assert record["paths"]["data"]["path"] == str(recorded_run.data.resolve())
    assert len(record["paths"]["data"]["sha256"]) == 64 and len(record["images_sha256"]) == 1
    assert json.loads((recorded_run.dir / "surgery.json").read_text())["sha256"][DATA_RECORD]  # verified like the rest


def test_int8_is_measured_on_the_recorded_data_and_its_parity_reported_as_measured(recorded_run, tmp_path):
    out = tmp_path / "int8"
    run_export(ExportSpec(recorded_run.dir, quantize="int8", max_accuracy_drop=100.0, out_dir=out))
    record = json.loads((out / "onnx" / "quantization.json").read_text())
    assert str(recorded_run.data) in record["suite"] and record["graphs"] == ["visual.onnx"]
    parity = json.loads((out / "onnx" / "parity.json").read_text())
    assert parity["precision"] == {"visual.onnx": "int8", "text.onnx": "fp32"}
    assert parity["max_abs_diff"]["visual.onnx"] > parity["fp32_max_abs_diff"]["visual.onnx"]  # int8's own
    assert parity["max_abs_diff"]["text.onnx"] == parity["fp32_max_abs_diff"]["text.onnx"]
    props = {p.key: p.value for p in onnx.load(str(out / "onnx" / "visual.onnx")).metadata_props}
    assert props["quantization"] == "int8"
    assert float(props["export_max_abs_diff"]) == pytest.approx(parity["max_abs_diff"]["visual.onnx"], rel=1e-3)
    card = (out / "README.md").read_text()
    measured = f"| visual.onnx | int8 | {parity['max_abs_diff']['visual.onnx']:.2e} | none (int8: gated on accuracy) |"
    assert measured in card and f"{parity['fp32_max_abs_diff']['visual.onnx']:.2e}" not in card
    assert (out / DATA_RECORD).read_bytes() == (recorded_run.dir / DATA_RECORD).read_bytes()


def test_changed_or_named_data(recorded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded_run.dir, run)
    record = json.loads((run / DATA_RECORD).read_text())
    data = colour_folder(tmp_path / "moved" / "val")  # same images, elsewhere: the record still points there
    record["paths"]["data"]["path"] = str(data)
    (run / DATA_RECORD).write_text(json.dumps(record))
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(data / "red" / "0.png")  # one image changed
    export = ExportSpec(run, quantize="int8", max_accuracy_drop=100.0, verify=False, out_dir=tmp_path / "out")
    with pytest.raises(PreconditionFailed, match="changed since the run"):
        run_export(export)
    assert not (tmp_path / "out").exists()
    named = replace(export, validation=ValidationSpec(data=data))
    named.check()
    run_export(named)  # the user's data instead of the record's
    assert str(data) in json.loads((tmp_path / "out" / "onnx" / "quantization.json").read_text())["suite"]
    with pytest.raises(InvalidInput, match="read by --quantize only"):
        ExportSpec(run, validation=ValidationSpec(data=data)).check()


def test_unknown_quantization_is_refused_before_anything_loads(recorded_run, monkeypatch):
    import surgeon.model.load

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(surgeon.model.load, "load_model", no_loading)
    with pytest.raises(InvalidInput, match="unknown quantization 'int4'"):
        ExportSpec(recorded_run.dir, quantize="int4").check()
    with pytest.raises(InvalidInput, match="unknown quantization 'int4'"):
        run_export(ExportSpec(recorded_run.dir, quantize="int4"))


def test_an_export_says_what_it_writes_before_writing(recorded_run, tmp_path, monkeypatch):
    import surgeon.exporting.export
    from surgeon.exporting.export import size_estimate
    from surgeon.model.load import load_model

    out = tmp_path / "both"
    with pytest.warns(UserWarning, match=r"the export writes about .*; `--format onnx` alone writes"):
        files = run_export(ExportSpec(recorded_run.dir, format="both", out_dir=out))
    loaded = load_model(f"local-dir:{recorded_run.dir}", device="cpu")
    estimate = size_estimate(loaded, ["safetensors", "onnx"])
    written = {
        name: sum(p.stat().st_size for p in files if str(p.relative_to(out)).startswith(name)) for name in estimate
    }
    for name, size in estimate.items():  # graph structure adds a few hundred KB per graph: large on tiny models
        assert 0.75 * written[name] <= size <= 1.1 * written[name], (name, size, written[name])
    assert 0.9 * sum(written.values()) <= sum(estimate.values()) <= 1.1 * sum(written.values())
    monkeypatch.setattr(surgeon.exporting.export.shutil, "disk_usage", lambda _: namedtuple("Usage", "free")(999))
    with pytest.raises(StorageError, match="needs about .* but .* has 999 B free") as full:
        run_export(ExportSpec(recorded_run.dir, format="both", out_dir=tmp_path / "full"))
    assert "`--format onnx` alone" in str(full.value.hint) and not (tmp_path / "full").exists()


def test_the_cli_refuses_bad_export_options_in_one_line(recorded_run):
    from tests.conftest import run_cli

    for options, message in (
        (["--quantize", "int4"], "unknown quantization 'int4'"),
        (["--data", str(recorded_run.data)], "the validation options are read by --quantize only"),
    ):
        done = run_cli("export", str(recorded_run.dir), *options)
        assert done.returncode == InvalidInput.exit_code and message in done.stderr
        assert "Traceback" not in done.stderr and not (recorded_run.dir / "export-onnx").exists()


def test_the_record_rebuilds_every_validation_option_and_the_toy_sets_by_name(tmp_path, monkeypatch):
    """Before: the record kept five path and five value options, so bias columns, retrieval sets and frames
    were dropped when int8 was measured on it, and a named toy set (toy:counterfactuals) failed the prune
    (a path that does not exist was hashed)."""
    from dataclasses import asdict
    from pathlib import Path

    from surgeon.validation.datarecord import record_validation_data, recorded_suite

    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path / "cache"))
    spec = ValidationSpec(
        bias_data=Path("toy:counterfactuals"),
        bias_attribute="background",
        retrieval_data=Path("toy:captions"),
        frames=4,
        skew_k=4,
    )
    suite = spec.build(None)
    (tmp_path / DATA_RECORD).write_text(json.dumps(record_validation_data(asdict(spec), suite)))
    rebuilt = recorded_suite(tmp_path, None)
    assert suite.bias is not None and rebuilt.bias is not None
    assert rebuilt.bias.group_names == suite.bias.group_names == sorted(set(suite.bias.group_names))
    default_column = replace(spec, bias_attribute=None, retrieval_data=None).build(None)
    assert default_column.bias is not None and rebuilt.bias.group_names != default_column.bias.group_names
    assert np.array_equal(rebuilt.bias.groups, suite.bias.groups) and rebuilt.bias.k == 4
    assert [r.captions for r in rebuilt.retrieval] == [r.captions for r in suite.retrieval] != []
