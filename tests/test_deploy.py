"""Deploying pruned models: the run folder as a Hugging Face Hub repo (hf-hub: loading from an offline cache),
its model card, the ONNX files' shapes and doc strings, and serving from the plain (torch-free) install."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from surgeon.core.errors import PreconditionFailed
from surgeon.core.options import OnnxExport, RankMethod
from surgeon.exporting.card import base_model_facts
from surgeon.model.load import load_model
from surgeon.pruning.prune import prune
from surgeon.runtime.session import ExportedModel
from surgeon.selection.policies import PolicyOptions
from tests.conftest import TAXONOMY, offline_hub_cache, synthetic_suite, tiny_config

REPO = Path(__file__).resolve().parents[1]
LABELS = ["red", "blue", "green", "dog"]


def _run(tmp_path_factory, mode: str, exporter: str) -> tuple[object, Path]:
    """(the pruned LoadedModel, its run folder) for the tiny default model, ONNX with a baked classifier."""
    from surgeon.inputs.images import folder_images
    from surgeon.inputs.pools import TextPool
    from surgeon.ranking.rank import rank_heads
    from tests.conftest import save_local_dir

    base = tmp_path_factory.mktemp(f"deploy-{mode}")
    model_dir = save_local_dir(base / "tiny", tiny_config("default"))
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"img{i:02d}.png")
    labels = base / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    loaded = load_model(f"local-dir:{model_dir}", device="cpu")
    pool = TextPool("t", ("a red dog", "a blue cat", "green bird", "a red cat", "a dog", "blue"), TAXONOMY)
    run = base / "run"
    with pytest.MonkeyPatch.context() as patch:  # a module fixture: conftest's per-test cache folder is not set yet
        patch.setenv("SURGEON_CACHE_DIR", str(base / "cache"))
        ranking = rank_heads(loaded, folder_images(images), pool, RankMethod(layers="1-2", m=3), quiet=True)
        prune(
            loaded,
            ranking,
            synthetic_suite(),
            "heads",
            PolicyOptions(heads="L1.H2,L2.H0"),
            mode=mode,
            out_dir=run,
            exporters=["safetensors", "onnx"],
            onnx=OnnxExport(labels, 1e-4, exporter),
        )
    return loaded, run


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    return _run(tmp_path_factory, "zero", "dynamo")


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory):
    return _run(tmp_path_factory, "hard", "torchscript")  # the deprecated exporter, still parity-checked


@pytest.mark.slow  # a child process: the hub reads its cache folder at import
def test_run_folder_loads_through_open_clip_hf_hub(zero_run, tmp_path):
    loaded, run = zero_run
    assert (run / "README.md").is_file() and (run / "open_clip_config.json").is_file()
    assert (run / "open_clip_model.safetensors").is_file() and (run / "onnx" / "visual.onnx").is_file()
    cache = offline_hub_cache(tmp_path / "hub", "someone/pruned-tiny", run)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(pixels, tmp_path / "pixels.pt")
    script = f"""
import sys, torch, open_clip
model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:someone/pruned-tiny")
tokenizer = open_clip.get_tokenizer("hf-hub:someone/pruned-tiny")
pixels = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
with torch.no_grad():
    image = model.eval().encode_image(pixels, normalize=True)
    text = model.encode_text(tokenizer(["a red dog"]), normalize=True)
torch.save({{"image": image, "text": text}}, {str(tmp_path / "out.pt")!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        expected = loaded.model.encode_image(pixels, normalize=True)
        text = loaded.model.encode_text(loaded.tokenizer(["a red dog"]), normalize=True)
    assert torch.allclose(got["image"], expected, atol=1e-6) and torch.allclose(got["text"], text, atol=1e-6)


def test_hard_pruned_run_reloads_with_surgeon_from_its_root(hard_run):
    loaded, run = hard_run
    reloaded = load_model(f"local-dir:{run}", device="cpu")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded.model.encode_image(pixels), loaded.model.encode_image(pixels))


def test_runs_written_before_the_hub_layout_still_export(zero_run, tmp_path):
    from surgeon.core.paths import newest_run
    from surgeon.exporting.export import export_existing_run

    _, run = zero_run
    old = tmp_path / "exports" / "old-run"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("onnx"))
    (old / "model").mkdir()
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        (old / name).rename(old / "model" / name)
    record = json.loads((old / "surgery.json").read_text())  # what such a run recorded: model/, no onnx/ here
    record["sha256"] = {
        (f"model/{name}" if name.startswith("open_clip_") else name): digest
        for name, digest in record["sha256"].items()
        if not name.startswith("onnx/")
    }
    (old / "surgery.json").write_text(json.dumps(record))
    assert newest_run(hint="", root=tmp_path / "exports") == old
    files = export_existing_run(old, ["safetensors"], tmp_path / "new")
    assert tmp_path / "new" / "open_clip_model.safetensors" in files
    assert (tmp_path / "new" / "README.md").is_file() and not (tmp_path / "new" / "model").exists()


def _card(run: Path) -> tuple[dict, str]:
    card = ModelCard.load(run / "README.md")  # the Hub's own parser: model-index entries must be valid
    return card.data.to_dict(), card.text


def test_card_metadata_is_honest(zero_run, hard_run):
    zero, _ = _card(zero_run[1])
    hard, hard_text = _card(hard_run[1])
    assert zero["library_name"] == "open_clip" and hard["library_name"] == "onnx"
    assert "hf-hub:USER/REPO" in _card(zero_run[1])[1] and "surgeon.model.load.load_model('local-dir:.')" in hard_text
    for meta in (zero, hard):
        assert meta["license"] == "unknown" and "base_model" not in meta  # a local folder: nothing to inherit
        tasks = {r["task"]["type"] for entry in meta["model-index"] for r in entry["results"]}
        assert tasks == {"zero-shot-image-classification"}  # bias metrics are in the body, not a made-up task
        assert "onnx" in meta["tags"]
    assert "MaxSkew" in hard_text or "max_skew" in hard_text


def test_base_model_is_a_hub_id_and_the_license_is_inherited(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    plan = {"name": "ViT-B-32", "pretrained": "openai"}
    assert base_model_facts({"name": "toy"}) == {"license": "mit"}
    assert base_model_facts({"name": "ViT-B-32", "pretrained": "/ckpt/x.safetensors"}) == {"license": "unknown"}
    assert base_model_facts(plan) == {
        "base_model": "timm/vit_base_patch32_clip_224.openai",
        "license": "other",
        "license_name": "same-as-base-model",
        "license_link": "https://huggingface.co/timm/vit_base_patch32_clip_224.openai",
    }
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("---\ntags:\n- clip\nlicense: apache-2.0\n---\n# base\n", encoding="utf-8")
    offline_hub_cache(tmp_path / "hub", "timm/vit_base_patch32_clip_224.openai", card)
    assert base_model_facts(plan) == {"base_model": "timm/vit_base_patch32_clip_224.openai", "license": "apache-2.0"}


@pytest.mark.parametrize("which", ["zero_run", "hard_run"])
def test_onnx_files_name_their_dims_and_say_what_they_are(which, request):
    loaded, run = request.getfixturevalue(which)
    onnx_dir = run / "onnx"
    assert (onnx_dir / "clip_tokenizer.json").is_file() and not (onnx_dir / "tokenizer.json").exists()
    widths = {"visual.onnx": loaded.embed_dim, "text.onnx": loaded.embed_dim, "classifier.onnx": len(LABELS)}
    exporter = "dynamo" if which == "zero_run" else "torchscript"
    for name, width in widths.items():
        proto = onnx.load(str(onnx_dir / name))
        out_dims = proto.graph.output[0].type.tensor_type.shape.dim
        in_dims = proto.graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in out_dims] == ["batch", width]
        assert in_dims[0].dim_param == "batch" and all(d.dim_value > 0 for d in in_dims[1:])
        assert proto.doc_string.startswith(loaded.identity) and "batch" in proto.doc_string
        assert {p.key: p.value for p in proto.metadata_props}["exporter"] == exporter
    served = ExportedModel(run)
    assert served.encode_texts(["a red dog"]).shape == (1, loaded.embed_dim)  # the renamed tokenizer file is found


def test_unknown_exporter_fails_before_any_work(tmp_path):
    from surgeon.core.errors import InvalidInput
    from surgeon.exporting.export import export_existing_run

    with pytest.raises(InvalidInput, match="unknown ONNX exporter"):
        export_existing_run(REPO, ["onnx"], tmp_path / "x", exporter="jit")


# ---- the plain install: serving without torch --------------------------------------------------------------


@pytest.fixture(scope="session")
def plain_venv(tmp_path_factory) -> Path:
    """A fresh venv with surgeon's wheel and its runtime dependencies from the package index (no extras)."""
    base = tmp_path_factory.mktemp("plain-install")
    source = base / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "surgeon", source / "surgeon", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(base / "dist"), str(source)], check=True)
    target = base / "venv"
    venv.create(target, with_pip=True)
    wheel = next((base / "dist").glob("surgeon-*.whl"))
    with zipfile.ZipFile(wheel) as archive:  # one namespace: nothing else lands in site-packages
        tops = {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"surgeon"}, tops
    install = [target / "bin" / "python", *pip[1:], "install", str(wheel)]
    subprocess.run(install, check=True, timeout=900, env=outside_env())
    return target


def outside_env() -> dict[str, str]:
    """This environment without PYTHONPATH: the venv must see only what was installed into it."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.slow  # builds a venv from the package index: about 2 minutes
def test_plain_install_serves_an_export_without_torch(plain_venv, zero_run, tmp_path):
    loaded, run = zero_run
    python, surgeon = plain_venv / "bin" / "python", plain_venv / "bin" / "surgeon"
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=outside_env())
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(image)
    env = outside_env()
    done = subprocess.run([surgeon, "infer", str(run), str(image), "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    served = json.loads(done.stdout)["predictions"][0]["top"]
    expected = ExportedModel(run).classify([image], top_k=5)[0].top
    assert [t["label"] for t in served] == [t.label for t in expected]
    assert np.allclose([t["logit"] for t in served], [t.logit for t in expected], atol=1e-4)
    triton = subprocess.run(
        [surgeon, "triton-repo", str(run), "--out", str(tmp_path / "triton")], capture_output=True, text=True, env=env
    )
    assert triton.returncode == 0 and (tmp_path / "triton" / "run_visual" / "config.pbtxt").is_file(), triton.stderr
    # a surgery verb says in one line which extra to install, with the extra's name intact
    rank = subprocess.run([surgeon, "rank"], capture_output=True, text=True, env={**env, "COLUMNS": "200"})
    assert rank.returncode == 5 and "Traceback" not in rank.stderr
    assert rank.stderr.splitlines() == [
        "error: surgeon rank needs the surgery extra (torch is not installed)",
        "  hint: pip install 'surgeon[surgery]'",
    ]
    wide = {**env, "COLUMNS": "200"}
    oip = subprocess.run([surgeon, "serve-model", str(run)], capture_output=True, text=True, env=wide)
    assert oip.returncode == 5 and oip.stderr.splitlines() == [
        "error: surgeon serve-model needs the oip extra (mlserver is not installed)",
        "  hint: pip install 'surgeon[oip]'",
    ]


# ---- Docker: two targets, pinned base, constrained packages ------------------------------------------------


def _dockerfile() -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_pins_its_base_and_packages_and_runs_as_a_numeric_user():
    lines = _dockerfile()
    base = next(line for line in lines if line.startswith("ARG PYTHON_IMAGE="))
    assert "@sha256:" in base and len(base.split("@sha256:")[1]) == 64
    stages = [line.split()[-1] for line in lines if line.startswith("FROM ")]
    assert {"serving", "oip", "surgery"} <= set(stages) and stages[-1] == "surgery"  # the default target stays surgery
    assert all(line.split()[1] in ("${PYTHON_IMAGE}", *stages) for line in lines if line.startswith("FROM "))
    installs = [cmd for line in lines for cmd in re.split(r";|&&", line) if "pip install" in cmd]
    assert installs and all("-c /tmp/constraints.txt" in line for line in installs if "onnxruntime-gpu" not in line)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and all(part.isdigit() for user in users for part in user.split(":"))
    oip, surgery = [line for line in lines if line.startswith("HEALTHCHECK --interval")]
    assert "os.environ['SURGEON_PORT']" in surgery and "ENV SURGEON_PORT=50051" in lines
    assert "/v2/health/ready" in oip  # the Open Inference Protocol's readiness: the export verified and loaded


def test_constraints_satisfy_every_requirement():
    import tomllib
    from packaging.requirements import Requirement

    pins = {}
    for line in (REPO / "docker" / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    for raw in project["dependencies"] + extras["surgery"] + extras["serve"] + extras["oip"]:
        req = Requirement(raw)
        name = req.name.lower().replace("_", "-")
        assert name in pins and req.specifier.contains(pins[name]), (raw, pins.get(name))


# ---- Triton model repository -------------------------------------------------------------------------------


def _pbtxt_tensors(config: str, kind: str) -> list[tuple[str, str, list[int]]]:
    block = re.search(rf"^{kind} \[\n(.*?)\n\]", config, re.S | re.M).group(1)
    found = re.findall(r'name: "([^"]+)", data_type: (\w+), dims: \[ ([-\d, ]+) \]', block)
    return [(n, t, [int(d) for d in dims.split(",")]) for n, t, dims in found]


def test_triton_repository_matches_the_onnx_files(hard_run, tmp_path):
    from typer.testing import CliRunner

    from surgeon.cli import app

    loaded, run = hard_run
    out = tmp_path / "triton"
    result = CliRunner().invoke(app, ["triton-repo", str(run), "--out", str(out), "--name", "pruned"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["pruned_classifier", "pruned_text", "pruned_visual"]
    types = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}
    for folder in out.iterdir():
        config = (folder / "config.pbtxt").read_text(encoding="utf-8")
        filename = re.search(r'default_model_filename: "(.+)"', config).group(1)
        proto = onnx.load(str(folder / "1" / filename))
        assert f'name: "{folder.name}"' in config and 'backend: "onnxruntime"' in config
        assert "max_batch_size: 32" in config and "dynamic_batching { max_queue_delay_microseconds: 1000 }" in config
        for kind, values in (("input", proto.graph.input), ("output", proto.graph.output)):
            expected = [
                (v.name, types[v.type.tensor_type.elem_type], [d.dim_value for d in v.type.tensor_type.shape.dim][1:])
                for v in values
            ]
            assert _pbtxt_tensors(config, kind) == expected
    classifier = (out / "pruned_classifier" / "config.pbtxt").read_text(encoding="utf-8")
    assert 'label_filename: "labels.txt"' in classifier
    assert (out / "pruned_classifier" / "labels.txt").read_text(encoding="utf-8").split() == LABELS
    text_dir = out / "pruned_text"
    served = ExportedModel(run)
    copied = ort.InferenceSession(str(text_dir / "1" / "text.onnx"))  # the copied graph runs as the export does
    tokens = served.tokenizer(["a red dog", "blue"])
    assert np.allclose(copied.run(None, {"input_ids": tokens})[0], served.encode_texts(["a red dog", "blue"]))
    assert {"clip_tokenizer.json", "preprocess.json", "bpe_simple_vocab_16e6.txt.gz"} <= {
        p.name for p in text_dir.iterdir()
    }
    unbatched = CliRunner().invoke(
        app, ["triton-repo", str(run), "--out", str(out), "--max-batch-size", "0", "--force"]
    )
    assert unbatched.exit_code == 0, unbatched.output
    config = (out / "run_visual" / "config.pbtxt").read_text(encoding="utf-8")
    assert _pbtxt_tensors(config, "input")[0][2] == [-1, 3, 32, 32] and "dynamic_batching" not in config
    again = CliRunner().invoke(app, ["triton-repo", str(run), "--out", str(out)])
    assert isinstance(again.exception, PreconditionFailed)  # an existing repository stays unless --force
