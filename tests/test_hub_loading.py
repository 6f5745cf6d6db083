"""`--model hf-hub:ORG/NAME`: every run folder surgeon writes (soft- and hard-pruned) loads by its Hub name from
the local hub cache, offline; what cannot be loaded says why in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgeon.core.errors import InvalidInput, NotFound, PreconditionFailed
from surgeon.exporting.card import base_model_facts
from surgeon.model.load import load_model
from surgeon.pruning.prune import prune
from surgeon.selection.policies import PolicyOptions
from tests.conftest import offline_hub_cache, synthetic_suite

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["zero", "hard"])
def pruned_run(request, tmp_path_factory):
    """(the pruned model, its run folder): safetensors only, as `surgeon prune` writes by default."""
    from tests.conftest import save_local_dir, tiny_config

    base = tmp_path_factory.mktemp(f"hub-{request.param}")
    loaded = load_model(f"local-dir:{save_local_dir(base / 'tiny', tiny_config('default'))}", device="cpu")
    run = base / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SURGEON_CACHE_DIR", str(base / "cache"))
        prune(
            loaded,
            None,
            synthetic_suite(),
            "heads",
            PolicyOptions(heads="L1.H2,L2.H0"),
            mode=request.param,
            out_dir=run,
        )
    return loaded, run


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_every_run_folder_loads_by_its_hub_name(pruned_run, hub_cache):
    loaded, run = pruned_run
    offline_hub_cache(hub_cache, "someone/pruned-tiny", run)
    reloaded = load_model("hf-hub:someone/pruned-tiny", device="cpu")
    assert reloaded.identity == "hf-hub:someone/pruned-tiny"
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded.model.encode_image(pixels), loaded.model.encode_image(pixels))
        tokens = reloaded.tokenizer(["a red dog"])
        assert torch.equal(reloaded.model.encode_text(tokens), loaded.model.encode_text(tokens))
    with pytest.raises(InvalidInput, match="takes no --pretrained"):
        load_model("hf-hub:someone/pruned-tiny", "x.safetensors", device="cpu")


def test_what_the_cache_cannot_give_is_one_clear_error(hub_cache, tmp_path):
    with pytest.raises(NotFound, match="not in the local Hub cache") as missing:
        load_model("hf-hub:someone/never-downloaded", device="cpu")
    assert "hf download someone/never-downloaded" in str(missing.value.hint)
    with pytest.raises(InvalidInput, match="does not name a Hub repository"):
        load_model("hf-hub:../../etc", device="cpu")
    onnx_only = tmp_path / "onnx-only"
    (onnx_only / "onnx").mkdir(parents=True)
    (onnx_only / "onnx" / "visual.onnx").write_bytes(b"graph")
    offline_hub_cache(hub_cache, "someone/onnx-only", onnx_only)
    with pytest.raises(PreconditionFailed, match="ONNX graphs only") as graphs:
        load_model("hf-hub:someone/onnx-only", device="cpu")
    assert "surgeon infer" in str(graphs.value.hint)


@pytest.mark.slow  # a child process: the hub reads its cache folder at import
def test_the_cli_reads_the_hub_cache_of_its_environment(pruned_run, tmp_path):
    """The real user path: HF_HUB_OFFLINE and HF_HUB_CACHE in the environment, the CLI in its own process."""
    _, run = pruned_run
    cache = offline_hub_cache(tmp_path / "hub", "someone/pruned-tiny", run)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "surgeon", "validate", "--data", "toy", "--json", "-q", "--device", "cpu"]
    done = subprocess.run(
        [*command, "--model", "hf-hub:someone/pruned-tiny"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["model"] == "hf-hub:someone/pruned-tiny"
    missing = subprocess.run(
        [*command, "--model", "hf-hub:someone/elsewhere"], env=env, capture_output=True, text=True, timeout=300
    )
    assert missing.returncode == NotFound.exit_code and "hf download someone/elsewhere" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_card_names_its_hub_base_model(hub_cache, tmp_path):
    assert base_model_facts({"name": "hf-hub:someone/pruned-tiny", "pretrained": None})["base_model"] == (
        "someone/pruned-tiny"
    )
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("---\nlicense: apache-2.0\n---\n# pruned\n", encoding="utf-8")
    offline_hub_cache(hub_cache, "someone/pruned-tiny", card)
    assert base_model_facts({"name": "hf-hub:someone/pruned-tiny"}) == {
        "base_model": "someone/pruned-tiny",
        "license": "apache-2.0",
    }


def test_the_docs_upload_with_the_current_hub_cli():
    for page in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))):
        # current huggingface_hub ships `hf`, not huggingface-cli
        assert "huggingface-cli" not in page.read_text(encoding="utf-8"), page
    publishing = (REPO / "docs" / "exporting.md").read_text(encoding="utf-8")
    assert "hf upload USER/REPO RUN_DIR" in publishing and "--model hf-hub:USER/REPO" in publishing
