"""Surgery modes on real open_clip models: zero, mean, hard (and its strict reload)."""

from __future__ import annotations

import copy

import pytest
import torch

from surgeon.core.errors import InvalidInput
from surgeon.model.checkpoint import write_local_dir
from surgeon.model.decompose import head_means
from surgeon.model.heads import HeadRef, parse_heads
from surgeon.model.hooks import record
from surgeon.model.load import load_model
from surgeon.model.pruned import PrunedAttention
from surgeon.model.surgery import SurgeryRequest, apply_surgery

HEADS = [HeadRef(1, 0), HeadRef(2, 1), HeadRef(2, 3)]


@pytest.fixture
def images():
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_zero_changes_outputs_and_keeps_shapes(tiny_model_dir, images):
    loaded = load_model(f"local-dir:{tiny_model_dir}", device="cpu")
    shapes = {k: v.shape for k, v in loaded.model.state_dict().items()}
    before = loaded.model.encode_image(images)
    record_ = apply_surgery(loaded.model, SurgeryRequest(HEADS, "zero"))
    after = loaded.model.encode_image(images)
    assert {k: v.shape for k, v in loaded.model.state_dict().items()} == shapes
    assert (before - after).abs().max() > 1e-3
    assert record_["heads"] == ["L1.H0", "L2.H1", "L2.H3"] and "heads_kept" not in record_
    attn = loaded.model.visual.transformer.resblocks[2].attn
    assert attn.out_proj.weight[:, 16:32].abs().sum() == 0 and attn.out_proj.weight[:, :16].abs().sum() > 0


@pytest.mark.parametrize("tower", ["vision", "both"])
def test_hard_equals_zero_and_reloads_strictly(tiny_model_dir, images, tmp_path, tower):
    zero = load_model(f"local-dir:{tiny_model_dir}", device="cpu")
    hard = load_model(f"local-dir:{tiny_model_dir}", device="cpu")
    apply_surgery(zero.model, SurgeryRequest(HEADS, "zero", tower))
    rec = apply_surgery(hard.model, SurgeryRequest(HEADS, "hard", tower))
    assert isinstance(hard.model.visual.transformer.resblocks[2].attn, PrunedAttention)
    assert hard.model.visual.transformer.resblocks[2].attn.in_proj_weight.shape[0] == 3 * 2 * 16
    assert rec["heads_kept"]["vision"] == {"1": [1, 2, 3], "2": [0, 2]}
    tokens = zero.tokenizer(["a red star", "two dogs"])
    with torch.no_grad():
        assert (zero.model.encode_image(images) - hard.model.encode_image(images)).abs().max() <= 1e-5
        assert (zero.model.encode_text(tokens) - hard.model.encode_text(tokens)).abs().max() <= 1e-5
    out = tmp_path / "hard"
    out.mkdir()
    write_local_dir(hard, out, rec)
    reloaded = load_model(f"local-dir:{out}", device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded.model.encode_image(images), hard.model.encode_image(images))


def test_mean_ablation_keeps_the_mean_cls_residual(tiny_default_dir, images):
    """Replacing a head's CLS output by its mean leaves the layer's mean CLS attention output unchanged."""
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    visual = loaded.model.visual
    heads = [HeadRef(2, 1)]
    with torch.no_grad(), record(visual, ["blocks.2.attn_out"]) as cache:
        visual(images)
        before = cache["blocks.2.attn_out"][:, 0].clone()
    means = head_means(visual, [images], heads)
    apply_surgery(loaded.model, SurgeryRequest(heads, "mean", reference_means=lambda blocks, hs: means))
    with torch.no_grad(), record(visual, ["blocks.2.attn_out"]) as cache:
        visual(images)
        after = cache["blocks.2.attn_out"][:, 0]
    assert (before - after).abs().max() > 1e-4  # per image it changes...
    torch.testing.assert_close(before.mean(0), after.mean(0), atol=1e-5, rtol=0)  # ...on average it does not


def test_bad_heads_are_refused(tiny_default_dir):
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    untouched = copy.deepcopy(loaded.model.state_dict())
    for spec in ["L99.H3", "L1.H9"]:
        with pytest.raises(InvalidInput):
            apply_surgery(loaded.model, SurgeryRequest(parse_heads(spec), "zero"))
    for spec in ["foo", "L1H2", ""]:
        with pytest.raises(InvalidInput):
            parse_heads(spec)
    with pytest.raises(InvalidInput, match="surgery mode"):
        apply_surgery(loaded.model, SurgeryRequest([HeadRef(0, 0)], "melt"))
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in untouched.items())
