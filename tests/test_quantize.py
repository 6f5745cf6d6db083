"""`surgeon export --quantize int8`: onnxruntime's dynamic quantization, gated on the zero-shot accuracy it costs
on a validation suite; a refused export writes nothing and keeps the previous output."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from surgeon.core.errors import GateFailed, InvalidInput, PreconditionFailed
from surgeon.exporting.quantize import RECORD, onnx_mean_accuracy, quantize_export
from surgeon.runtime.session import ExportedModel
from surgeon.validation.validate import ClassificationSet, ValidationSuite
from tests.test_deploy import zero_run  # noqa: F401 - a real pruned run folder with ONNX + classifier
from tests.test_runtime import exported  # noqa: F401 - a tiny real export

TEMPLATES = ["a photo of a {c}."]


def near_tie_suite(onnx_dir, n: int = 200) -> ValidationSuite:
    """Noise images over 100 near-identical class names, labelled with the fp32 export's own predictions: fp32
    scores 100 %, and the top-2 logits of many images lie within int8's rounding (5 of 200 flip; seeded)."""
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    classnames = [f"object number {i}" for i in range(100)]
    served = ExportedModel(onnx_dir)
    embeds = served.encode_images([Image.fromarray(x) for x in images])
    labels = (embeds @ served.class_embeddings(classnames, TEMPLATES).T).argmax(axis=1)
    return ValidationSuite([ClassificationSet("noise", classnames, TEMPLATES, images, labels)], None, "files", "noise")


@pytest.fixture
def export_copy(exported, tmp_path):  # noqa: F811
    _, root, _ = exported
    target = tmp_path / "onnx"
    shutil.copytree(root / "onnx", target)
    return target


def test_int8_within_the_gate_is_written_with_its_record(export_copy, caplog):
    suite = near_tie_suite(export_copy)
    fp32 = ExportedModel(export_copy)
    pixels = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    before, size = fp32.encode_pixels(pixels), (export_copy / "visual.onnx").stat().st_size
    record = quantize_export(export_copy, suite, "int8", max_drop=100.0)
    assert "pre-processing" not in caplog.text  # onnxruntime's advice, logged on every call, stays off the terminal
    assert record["graphs"] == ["visual.onnx", "classifier.onnx"] and record["mean_acc1_fp32"] == 1.0
    assert json.loads((export_copy / RECORD).read_text()) == record
    assert record["mean_acc1_int8"] == onnx_mean_accuracy(export_copy, suite)  # reproducible
    assert (export_copy / "visual.onnx").stat().st_size < size
    after = ExportedModel(export_copy, verify=False).encode_pixels(pixels)  # quantized in place: no manifest yet
    assert not np.array_equal(after, before) and (after * before).sum(axis=1).min() > 0.95  # int8, still close


def test_int8_over_the_gate_is_refused(export_copy):
    suite = near_tie_suite(export_copy)
    with pytest.raises(GateFailed, match="fell .* points .* more than --max-accuracy-drop 0"):
        quantize_export(export_copy, suite, "int8", max_drop=0.0)
    with pytest.raises(InvalidInput, match="unknown quantization"):
        quantize_export(export_copy, suite, "int4")


@pytest.mark.slow  # builds a pruned run with the dynamo ONNX exporter (tests/test_deploy.py's zero_run)
def test_refused_export_keeps_the_previous_output(zero_run, tmp_path, monkeypatch):  # noqa: F811
    import surgeon.exporting.export
    from surgeon.exporting.export import export_existing_run

    _, run = zero_run
    out = tmp_path / "out"
    with pytest.raises(PreconditionFailed, match="does not record which data validated it"):  # nor named: refused
        export_existing_run(run, ["onnx"], out, quantize="int8")
    monkeypatch.setattr(surgeon.exporting.export, "_quantization_suite", lambda *_: near_tie_suite(run / "onnx"))
    files = export_existing_run(run, ["onnx"], out, quantize="int8", max_accuracy_drop=100.0)
    assert out / "onnx" / RECORD in files and "int8" in (out / "README.md").read_text()
    assert json.loads((out / "surgery.json").read_text())["sha256"]["onnx/quantization.json"]
    ExportedModel(out)  # the hashes in surgery.json cover the int8 files
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(GateFailed):
        export_existing_run(run, ["onnx"], out, force=True, quantize="int8", max_accuracy_drop=0.0)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    with pytest.raises(InvalidInput, match="needs the ONNX format"):
        export_existing_run(run, ["safetensors"], tmp_path / "st", quantize="int8")
