"""Loading models: every supported source works, every bad one gives one clear error and runs nothing."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from surgeon.errors import CorruptInput, InvalidInput, NotFound, PreconditionFailed
from surgeon.load import load_model, read_state_dict


def test_local_dir_loads_strictly_and_hashes(tiny_default_dir):
    a = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    b = load_model(str(tiny_default_dir), device="cpu")
    assert a.weights_hash == b.weights_hash and len(a.weights_hash) == 64
    assert a.encode_text(["a dog", "a cat"]).shape == (2, 32)
    assert a.preprocess_cfg["size"] == (32, 32)


def test_checkpoint_file_with_architecture_name(tmp_path):
    tiny = load_model("ViT-S-32", device="cpu")
    torch.save(tiny.model.state_dict(), tmp_path / "w.pt")
    again = load_model("ViT-S-32", str(tmp_path / "w.pt"), device="cpu")
    assert again.weights_hash == tiny.weights_hash


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(NotFound, match="unknown model 'ViT-B-33'") as info:
        load_model("ViT-B-33")
    assert "ViT-B-32" in info.value.hint


def test_pretrained_tag_missing_offline_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(NotFound, match="not in the local cache") as info:
        load_model("ViT-B-32", "openai")
    from huggingface_hub import constants

    assert "`hf download timm/vit_base_patch32_clip_224.openai`" in info.value.hint
    assert constants.HF_HUB_CACHE in info.value.hint and "huggingface-cli" not in info.value.hint


def test_unknown_pretrained_tag():
    with pytest.raises(NotFound, match="unknown pretrained tag"):
        load_model("ViT-B-32", "not-a-tag")


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(NotFound):
        load_model("ViT-S-32", str(tmp_path / "nope.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01truncated")
    with pytest.raises(CorruptInput, match="corrupt safetensors"):
        load_model("ViT-S-32", str(tmp_path / "bad.safetensors"))
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(CorruptInput):
        read_state_dict(tmp_path / "bad.pt")


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_with_code_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.bin", "wb") as handle:
        pickle.dump({"weight": Evil()}, handle)
    with pytest.raises(CorruptInput, match="refused"):
        read_state_dict(tmp_path / "evil.bin")
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_for_another_architecture(tiny_default_dir):
    with pytest.raises(PreconditionFailed, match="does not match"):
        load_model("ViT-S-32", str(tiny_default_dir / "open_clip_model.safetensors"))


def test_checkpoint_given_as_model(tiny_default_dir):
    with pytest.raises(InvalidInput, match="architecture name"):
        load_model(str(tiny_default_dir / "open_clip_model.safetensors"))


def test_local_dir_without_config(tmp_path):
    with pytest.raises(NotFound, match="open_clip_config.json"):
        load_model(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(CorruptInput):
        load_model(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"nothing": 1}))
    with pytest.raises(CorruptInput, match="model_cfg"):
        load_model(f"local-dir:{tmp_path}")


def test_a_quick_gelu_tag_builds_quick_gelu(monkeypatch, tmp_path):
    """OpenAI's weights load into either activation (no parameters differ): the tag must decide."""
    from open_clip.model import QuickGELU
    from safetensors.torch import save_file

    import surgeon.load as load

    tiny = load_model("ViT-S-32", device="cpu")
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    monkeypatch.setattr(load, "_find_in_hub_cache", lambda m, t: (tmp_path / "w.safetensors", {"quick_gelu": True}))
    tagged = load_model("ViT-S-32", "some-tag", device="cpu")
    assert isinstance(tagged.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not isinstance(tiny.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_towers_surgeon_cannot_decompose_are_refused_before_they_are_built():
    from surgeon.load import supported_architectures

    names = supported_architectures()
    assert "ViT-B-32" in names and "coca_ViT-B-32" not in names and "ViT-L-14-CLIPA" not in names
    assert not any(n.startswith(("convnext", "RN50")) for n in names)  # timm / ResNet towers
    with pytest.raises(InvalidInput, match="attention-pooled"):
        load_model("coca_ViT-B-32", device="cpu")
