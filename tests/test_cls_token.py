"""The last vision block at the CLS token alone (surgeon.model.cls_token) gives the full block's CLS row, for
open_clip's two block types, zero-ablated and hard-pruned heads; other blocks run whole; the Evaluator's
embeddings stay encode_image's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgeon.model.cls_token import block_at_cls, computes_cls_only
from surgeon.model.heads import HeadRef
from surgeon.model.hooks import attention, encode_image, residual_in, set_attention, vision_blocks, vision_tower
from surgeon.model.load import load_model
from surgeon.model.pruned import PrunedAttention
from surgeon.model.surgery import remove_heads
from surgeon.validation import validate as validate_module
from surgeon.validation.validate import Evaluator, heads_zeroed, toy_suite
from tests.conftest import synthetic_suite

TIGHT = 1e-5  # float32 rounding: the CLS query's attention is summed in another order than the full block's


def _entering_last(loaded) -> torch.Tensor:
    """The residual stream entering the last vision block, for 6 random images."""
    visual = vision_tower(loaded.model)
    x = residual_in(visual, torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    for block in vision_blocks(visual)[:-1]:
        x = block(x)
    return x


def _gap(block: nn.Module, x: torch.Tensor) -> float:
    out = block_at_cls(block, x)
    assert out.shape == (len(x), 1, x.shape[-1])
    return (out - block(x)[:, :1]).abs().max().item()


@torch.no_grad()
def test_the_cls_row_equals_the_full_blocks(tiny_model_dir):
    loaded = load_model(f"local-dir:{tiny_model_dir}", device="cpu")  # 3 layers x 4 heads, both block types
    blocks = vision_blocks(vision_tower(loaded.model))
    x = _entering_last(loaded)
    assert computes_cls_only(blocks[2])
    assert _gap(blocks[2], x) <= TIGHT
    with heads_zeroed(blocks, [HeadRef(2, 1), HeadRef(2, 3)]):
        assert _gap(blocks[2], x) <= TIGHT
    whole = blocks[2](x)[:, :1]
    remove_heads(blocks, [HeadRef(2, 0)])
    assert isinstance(attention(blocks[2]), PrunedAttention) and computes_cls_only(blocks[2])
    assert _gap(blocks[2], x) <= TIGHT and (block_at_cls(blocks[2], x) - whole).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # remove_heads builds a 0-wide layer
def test_a_layer_with_every_head_removed_adds_the_out_proj_bias(tiny_model_dir):
    loaded = load_model(f"local-dir:{tiny_model_dir}", device="cpu")
    blocks = vision_blocks(vision_tower(loaded.model))
    x = _entering_last(loaded)
    remove_heads(blocks, [HeadRef(2, h) for h in range(4)])
    assert computes_cls_only(blocks[2]) and _gap(blocks[2], x) <= TIGHT


class _Wrapped(nn.Module):
    """A module surgeon does not know, computing what the wrapped one does."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@torch.no_grad()
def test_unknown_blocks_and_attention_run_whole(tiny_model_dir):
    loaded = load_model(f"local-dir:{tiny_model_dir}", device="cpu")
    block = vision_blocks(vision_tower(loaded.model))[2]
    x = _entering_last(loaded)
    expected = block(x)[:, :1]
    runs: list[str] = []

    def counted(module: nn.Module, name: str) -> nn.Module:
        module.register_forward_hook(lambda *_: runs.append(name))
        return module

    assert torch.equal(block_at_cls(counted(_Wrapped(block).eval(), "block"), x), expected) and runs == ["block"]
    set_attention(block, counted(_Wrapped(attention(block)), "attention"))
    assert not computes_cls_only(block)
    assert torch.equal(block_at_cls(block, x), expected) and runs == ["block", "attention"]
    set_attention(block, attention(block).inner)
    counted(block, "trained block").train()  # dropout, if any, draws per token: the block runs as trained
    assert not computes_cls_only(block) and block_at_cls(block, x).shape == expected.shape
    assert runs == ["block", "attention", "trained block"]


def test_evaluator_embeddings_are_encode_images_without_running_the_last_block_whole(tiny_model_dir):
    loaded = load_model(f"local-dir:{tiny_model_dir}", device="cpu")
    suite = synthetic_suite()
    evaluator = Evaluator(loaded, suite, batch_size=16, cache=False)
    blocks = vision_blocks(vision_tower(loaded.model))
    pixels = torch.cat(list(evaluator._pixel_batches(suite.bias.images)))
    runs: list[int] = []
    hook = blocks[2].register_forward_hook(lambda *_: runs.append(2))
    try:
        for heads in ([], [HeadRef(1, 2), HeadRef(2, 0)]):
            with torch.no_grad(), heads_zeroed(blocks, heads):
                expected = F.normalize(encode_image(loaded.model, pixels), dim=-1)
            runs.clear()
            got = evaluator.embeddings(suite.bias.name, heads)
            assert runs == [] and (got - expected).abs().max() <= TIGHT
    finally:
        hook.remove()


def test_the_toy_suites_metrics_are_unchanged(monkeypatch):
    loaded = load_model(None)  # the bundled toy model
    suite = toy_suite(n_per_task=100, n_scenes=200)
    fast = Evaluator(loaded, suite, cache=False).evaluate(intervals=False)
    monkeypatch.setattr(validate_module, "block_at_cls", lambda block, x: block(x))
    whole = Evaluator(loaded, suite, cache=False).evaluate(intervals=False)
    assert fast["summary"] == pytest.approx(whole["summary"], abs=1e-6)  # NDKL moves ~1e-8 on the full suite
    assert [r["metrics"].get("acc1") for r in fast["results"]] == [r["metrics"].get("acc1") for r in whole["results"]]
