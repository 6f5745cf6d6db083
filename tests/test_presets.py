"""`--preset MODEL/TAG` (study: `preset = "MODEL/TAG"` in a [[models]] entry): the paper's head lists of those
weights applied to a checkpoint file or folder of the same architecture (presets are keyed by pretrained tag)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest

from surgeon.api import ModelSpec, PruneSpec
from surgeon.core.errors import InvalidInput
from surgeon.selection.policies import PAPER_HEADS, POLICIES, PolicyOptions


def spec(model: str | None, policy: str = "paper-high", preset: str | None = "ViT-B-32/openai") -> PruneSpec:
    return PruneSpec(model=ModelSpec(model, "weights.safetensors" if model else None), policy=policy, preset=preset)


def test_a_checkpoint_file_of_the_architecture_takes_the_presets_heads():
    """Before: presets were keyed by tag only, so a file holding OpenAI's ViT-B-32 weights could not use them."""
    for model in ("ViT-B-32", "ViT-B-32-quickgelu"):  # same image tower, either activation
        file_spec = spec(model)
        file_spec.check()
        assert file_spec.preset_key == ("ViT-B-32", "openai")
    name, tag = spec("ViT-B-32").preset_key
    chosen = POLICIES.get("paper-high").select(None, PolicyOptions(model_name=name or "", pretrained=tag))
    assert {h.name for h in chosen.heads} == set(PAPER_HEADS[("ViT-B-32", "openai")]["high"].split())
    assert all(reason == "paper's high-CCS set for ViT-B-32/openai" for reason in chosen.reasons.values())


def test_a_local_dir_folder_is_matched_by_its_image_tower(tmp_path):
    config = {"model_cfg": open_clip.get_model_config("ViT-B-32")}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    spec(f"local-dir:{tmp_path}").check()
    config["model_cfg"]["vision_cfg"]["layers"] = 6
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInput, match="has another image tower"):
        spec(f"local-dir:{tmp_path}").check()


@pytest.mark.parametrize(
    "model, policy, preset, message",
    [
        ("ViT-S-32", "paper-high", "ViT-B-32/openai", "names ViT-B-32 heads, but ViT-S-32 has another image tower"),
        ("ViT-B-16", "paper-low", "ViT-B-32/openai", "but ViT-B-16 has another image tower"),
        ("ViT-B-32", "paper-high", "ViT-B-32/laion", "no paper preset 'ViT-B-32/laion'"),
        ("ViT-B-32", "top-k", "ViT-B-32/openai", "--preset names the heads of the paper-high"),
        (None, "paper-high", "ViT-B-32/openai", "the toy model has another image tower"),
    ],
)
def test_a_preset_that_does_not_fit_is_refused_before_any_work(model, policy, preset, message):
    with pytest.raises(InvalidInput, match=message):
        spec(model, policy, preset).check()


def test_a_study_model_entry_names_its_preset(tmp_path):
    from surgeon.studies.study import cell_key, cells, parse_study

    body = '[[policies]]\npolicy = "paper-high"\n[[data]]\nname = "shape"\npath = "toy:shape"\n'
    path = tmp_path / "s.toml"
    path.write_text('[[models]]\nname = "ViT-B-32"\npretrained = "w.safetensors"\npreset = "ViT-B-32/openai"\n' + body)
    study = parse_study(path)
    assert study.models[0].preset == ("ViT-B-32", "openai")

    class Loaded:  # what cell_key reads of a loaded model
        name, pretrained, forward_identity = "ViT-B-32", str(Path(tmp_path / "w.safetensors")), "f"

    pruned = [c for c in cells(study) if c.policy is not None][0]
    keyed = cell_key(study, pruned, Loaded(), "d", None)  # type: ignore[arg-type]
    path.write_text('[[models]]\nname = "ViT-B-32"\npretrained = "w.safetensors"\n' + body)
    assert cell_key(parse_study(path), pruned, Loaded(), "d", None) != keyed  # type: ignore[arg-type]
    path.write_text('[[models]]\nname = "ViT-S-32"\npreset = "ViT-B-32/openai"\n' + body)
    with pytest.raises(InvalidInput, match=r"models\[0\]\.preset: --preset ViT-B-32/openai names ViT-B-32 heads"):
        parse_study(path)
