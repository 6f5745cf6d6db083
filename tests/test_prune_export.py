"""The prune pipeline and exports on a tiny real open_clip model: run folder, gates, ONNX parity, card."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from surgeon.core.errors import ExportFailed, InvalidInput, PreconditionFailed
from surgeon.core.options import OnnxExport
from surgeon.model.load import load_model
from surgeon.pruning.prune import prune
from surgeon.selection.policies import PolicyOptions
from surgeon.validation.validate import Gates
from tests.conftest import synthetic_suite


def test_prune_writes_run_folder_and_onnx_matches(setup, tmp_path, tiny_default_dir):
    loaded, ranking = setup
    out = tmp_path / "run"
    result = prune(
        loaded,
        ranking,
        synthetic_suite(),
        "top-k",
        PolicyOptions(k=2),
        mode="hard",
        out_dir=out,
        exporters=["safetensors", "onnx"],
        onnx=OnnxExport(None, 1e-4),
    )
    assert result.exported and not result.gate_failures
    plan = json.loads((out / "plan.json").read_text())
    assert plan["policy"] == "top-k" and len(plan["heads"]) == 2 and plan["mode"] == "hard"
    assert plan["heads"][0]["reason"] and plan["ranking_sha256"] == ranking.digest()
    validation = json.loads((out / "validation.json").read_text())
    assert {r["task"] for r in validation["after"]["results"]} == {"zeroshot_classification", "bias"}
    assert "max_skew@10" in validation["before"]["summary"]
    # safetensors: reloads (hard layout from the config) and matches the pruned model exactly
    reloaded = load_model(f"local-dir:{out}", device="cpu")  # weights next to README.md: the Hub layout
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = loaded.model.encode_image(pixels, normalize=True)
        got_reloaded = reloaded.model.encode_image(pixels, normalize=True)
    pruned_state = loaded.model.state_dict()
    assert all(torch.equal(v, pruned_state[k]) for k, v in reloaded.model.state_dict().items())
    assert (got_reloaded - expected).abs().max() <= 1e-6
    # onnx: self-contained, dynamic batch, provenance in metadata, parity with torch
    session = ort.InferenceSession(str(out / "onnx" / "visual.onnx"))
    got = session.run(None, {"pixel_values": pixels.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(out / "onnx" / "visual.onnx")).metadata_props}
    assert json.loads(props["plan"])["mode"] == "hard" and float(props["export_max_abs_diff"]) <= 1e-4
    assert props["base_weights_sha256"] == ranking.model["weights_sha256"] != props["pruned_weights_sha256"]
    # model card and surgery.json with hashes of every file
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: onnx") and "attention-head-pruning" in card  # open_clip cannot load it
    surgery = json.loads((out / "surgery.json").read_text())
    assert "onnx/visual.onnx" in surgery["sha256"] and "README.md" in surgery["sha256"]


def test_zero_pruned_checkpoint_loads_in_plain_open_clip(setup, tmp_path):
    import open_clip

    loaded, ranking = setup
    out = tmp_path / "run"
    prune(loaded, ranking, synthetic_suite(), "heads", PolicyOptions(heads="L1.H2,L2.H0"), out_dir=out)
    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.eval().encode_image(pixels), loaded.model.encode_image(pixels))


def test_gate_failure_skips_export_unless_forced(setup, tmp_path):
    loaded, ranking = setup
    result = prune(
        loaded,
        ranking,
        synthetic_suite(),
        "top-k",
        PolicyOptions(k=4),
        gates=Gates(max_skew=-1.0),
        out_dir=tmp_path / "gated",
    )
    assert result.gate_failures and "max-skew" in result.gate_failures[0]
    assert not (tmp_path / "gated" / "open_clip_model.safetensors").exists()
    assert "FAILED" in (tmp_path / "gated" / "report.md").read_text()


def test_failed_onnx_check_leaves_nothing(setup, tmp_path):
    loaded, ranking = setup
    with pytest.raises(ExportFailed, match="exceeds the tolerance"):
        prune(
            loaded,
            ranking,
            synthetic_suite(),
            "top-k",
            PolicyOptions(k=1),
            out_dir=tmp_path / "strict",
            exporters=["safetensors", "onnx"],
            onnx=OnnxExport(atol=0.0),
        )
    assert not (tmp_path / "strict").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict")]


def test_ranking_of_another_model_and_bad_labels(setup, tmp_path, tiny_model_dir):
    loaded, ranking = setup
    other = load_model(f"local-dir:{tiny_model_dir}", device="cpu")
    if other.weights_hash != loaded.weights_hash:
        with pytest.raises(PreconditionFailed, match="ranking was made for"):
            prune(other, ranking, synthetic_suite(), "top-k", PolicyOptions(k=1), out_dir=tmp_path / "x")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\ncat\n")
    with pytest.raises(InvalidInput, match="labels file .*: class labels repeat cat"):
        prune(
            loaded,
            ranking,
            synthetic_suite(),
            "top-k",
            PolicyOptions(k=1),
            out_dir=tmp_path / "y",
            exporters=["safetensors", "onnx"],
            onnx=OnnxExport(labels),
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_export_with_no_run_folder_says_what_to_do(tmp_path):
    import os

    from tests.conftest import run_cli

    env = {**os.environ, "SURGEON_EXPORTS_DIR": str(tmp_path / "exports")}
    done = run_cli("export", env=env)
    assert done.returncode == 3 and "surgeon prune" in done.stderr, done.stderr
    assert not (tmp_path / "exports").exists()


def test_accuracy_needs_a_classification_set(setup, tmp_path):
    """A bias set alone measures no accuracy: debias, --seeds, accuracy gates and sweeps refuse at once."""
    from dataclasses import replace

    from surgeon.validation.sweep import run_sweep

    loaded, ranking = setup
    bias_only = replace(synthetic_suite(), tasks=[])
    for policy, options, kwargs in [
        ("debias", PolicyOptions(), {}),
        ("random", PolicyOptions(k=1), {"seeds": 2}),
        ("top-k", PolicyOptions(k=1), {"gates": Gates(max_acc_drop=1.0)}),
    ]:
        with pytest.raises(InvalidInput, match="classification set"):
            prune(loaded, ranking, bias_only, policy, options, out_dir=tmp_path / "run", **kwargs)
    with pytest.raises(InvalidInput, match="classification set"):
        run_sweep(loaded, ranking, bias_only, counts=[0, 1], quiet=True)
    assert not (tmp_path / "run").exists()
    # the bias alone is fine for a plain policy
    result = prune(loaded, ranking, bias_only, "top-k", PolicyOptions(k=1))
    assert result.after["summary"]["mean_acc1"] is None and "max_skew@10" in result.after["summary"]


def test_a_hard_pruned_model_is_not_pruned_twice(setup, tmp_path):
    loaded, ranking = setup
    prune(loaded, ranking, synthetic_suite(), "top-k", PolicyOptions(k=1), mode="hard", out_dir=tmp_path / "run")
    again = load_model(f"local-dir:{tmp_path / 'run'}", device="cpu")
    with pytest.raises(PreconditionFailed, match="already hard-pruned"):
        prune(again, ranking, synthetic_suite(), "top-k", PolicyOptions(k=1))


def test_ranking_file_that_is_not_an_object(tmp_path):
    from surgeon.core.errors import CorruptInput
    from surgeon.ranking.rank import Ranking

    (tmp_path / "ranking.json").write_text("[1, 2]")
    with pytest.raises(CorruptInput):
        Ranking.read(tmp_path / "ranking.json")


def test_onnx_weights_in_external_data_files_are_kept_and_listed(setup, tmp_path, monkeypatch):
    """Models over 2 GB come out of torch.onnx with external-data files; simulated here on the tiny model."""
    import surgeon.exporting.export as export_module

    real_export = export_module._export_graph

    def export_external(graph, path, opset, exporter):
        real_export(graph, path, opset, exporter)
        proto = onnx.load(str(path))
        onnx.save(proto, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)

    monkeypatch.setattr(export_module, "_export_graph", export_external)
    loaded, ranking = setup
    out = tmp_path / "run"
    prune(loaded, ranking, synthetic_suite(), "top-k", PolicyOptions(k=1), out_dir=out, exporters=["onnx"])
    data = out / "onnx" / "visual.onnx.data"
    assert data.is_file() and data.stat().st_size > (out / "onnx" / "visual.onnx").stat().st_size
    assert onnx.load(str(out / "onnx" / "visual.onnx"), load_external_data=False).metadata_props  # provenance kept
    session = ort.InferenceSession(str(out / "onnx" / "visual.onnx"))
    assert session.run(None, {"pixel_values": np.zeros((1, 3, 32, 32), np.float32)})[0].shape[0] == 1
    assert "onnx/visual.onnx.data" in json.loads((out / "surgery.json").read_text())["sha256"]
