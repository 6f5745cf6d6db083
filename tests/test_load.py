"""Loading models: every supported source works, every bad one gives one clear error and runs nothing."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from surgeon.core.errors import CorruptInput, InvalidInput, NotFound, PreconditionFailed
from surgeon.model.load import load_model, read_state_dict


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

    import surgeon.model.load as load

    tiny = load_model("ViT-S-32", device="cpu")
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    monkeypatch.setattr(load, "_find_in_hub_cache", lambda m, t: (tmp_path / "w.safetensors", {"quick_gelu": True}))
    tagged = load_model("ViT-S-32", "some-tag", device="cpu")
    assert isinstance(tagged.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not isinstance(tiny.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_towers_surgeon_cannot_decompose_are_refused_before_they_are_built():
    from surgeon.model.load import supported_architectures

    names = supported_architectures()
    assert "ViT-B-32" in names and "coca_ViT-B-32" not in names and "ViT-L-14-CLIPA" not in names
    assert not any(n.startswith(("convnext", "RN50")) for n in names)  # timm / ResNet towers
    with pytest.raises(InvalidInput, match="attention-pooled"):
        load_model("coca_ViT-B-32", device="cpu")


@pytest.mark.parametrize(
    "part, key, value, what",
    [
        ("vision_cfg", "layers", 10_000, "parameters"),
        ("vision_cfg", "width", 10**6, "parameters"),
        (None, "embed_dim", 10**9, "parameters"),
        ("text_cfg", "context_length", 10**8, "parameters"),  # its causal mask alone: 10^16 floats
        ("vision_cfg", "image_size", 10**6, "parameters"),
        ("text_cfg", "context_length", 20_000, "tokens in a sequence"),
        ("vision_cfg", "image_size", [960, 960], "activations per sample"),
    ],
)
def test_a_model_config_too_large_for_any_machine_is_refused_before_it_is_built(
    tmp_path, monkeypatch, part, key, value, what
):
    """Before: a local-dir open_clip_config.json with 10,000 layers (or context_length 10^8...) allocated until
    the allocator refused. Now its size is estimated from the numbers and refused in milliseconds."""
    import time

    import open_clip
    import open_clip.model

    config = open_clip.get_model_config("ViT-B-32")
    (config[part] if part else config)[key] = value
    if isinstance(value, list):  # 14,401 tokens (within bounds) x width 6,000: 86 M activations per block
        config["vision_cfg"].update(patch_size=8, width=6000)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"x")

    def built(*args, **kwargs):
        raise AssertionError("the model was built before its size was checked")

    monkeypatch.setattr(open_clip.model.CLIP, "__init__", built)
    started = time.monotonic()
    with pytest.raises(InvalidInput, match=f"builds about .* {what}"):
        load_model(f"local-dir:{tmp_path}", device="cpu")
    assert time.monotonic() - started < 2


def test_a_model_config_number_that_is_not_a_number_is_named():
    from surgeon.model.load import build_clip
    from tests.conftest import tiny_config

    config = tiny_config()
    config["vision_cfg"]["layers"] = "twelve"
    with pytest.raises(CorruptInput, match=r"vision_cfg\.layers must be a positive number, got 'twelve'"):
        build_clip(config)


def test_the_size_estimate_matches_real_models():
    import open_clip

    from surgeon.model.load import build_clip, model_size

    for name in ("ViT-S-32", "ViT-B-32"):
        config = open_clip.get_model_config(name)
        real = sum(p.numel() for p in build_clip(config).parameters())
        assert abs(model_size(config)[0] - real) / real < 0.01
