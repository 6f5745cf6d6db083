"""The debias search's layer cache (Evaluator deep=True, pin) gives the numbers a full forward gives, and
re-runs only the blocks from a head set's first new head on."""

from __future__ import annotations

import torch

from surgeon.model.heads import HeadRef
from surgeon.model.hooks import vision_blocks, vision_tower
from surgeon.model.load import load_model
from surgeon.validation.validate import Evaluator
from tests.conftest import synthetic_suite


def test_deep_cache_and_pinned_set_match_a_full_forward(tiny_default_dir):
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")  # 3 layers x 4 heads
    suite = synthetic_suite()
    full = Evaluator(loaded, suite, first_layer=0, batch_size=8, cache=False)
    deep = Evaluator(loaded, suite, first_layer=0, batch_size=8, deep=True)
    blocks_run: list[int] = []
    hooks = [  # on ln_1: the last block runs at the CLS token through its parts, not its own forward
        block.ln_1.register_forward_hook(lambda module, args, out, i=i: blocks_run.append(i))
        for i, block in enumerate(vision_blocks(vision_tower(loaded.model)))
    ]
    try:
        sets = [[], [HeadRef(2, 1)], [HeadRef(0, 3)], [HeadRef(1, 0), HeadRef(2, 2)]]
        name = suite.bias.name
        for heads in sets:
            assert torch.equal(full.embeddings(name, heads), deep.embeddings(name, heads))
        blocks_run.clear()
        deep.embeddings(name, [HeadRef(2, 1)])  # resumes at the last block: 30 images in 4 batches of 8
        assert blocks_run == [2] * 4
        deep.pin([HeadRef(0, 3)])
        for heads in ([HeadRef(0, 3), HeadRef(2, 0)], [HeadRef(0, 3), HeadRef(1, 1)], [HeadRef(1, 1)]):
            assert torch.equal(full.embeddings(name, heads), deep.embeddings(name, heads))
        for heads, resumed_at in (([HeadRef(0, 3), HeadRef(2, 0)], 2), ([HeadRef(0, 3), HeadRef(1, 1)], 1)):
            blocks_run.clear()
            deep.embeddings(name, heads)  # extends the pinned set: resumes at the new head's layer
            assert blocks_run == list(range(resumed_at, 3)) * 4
    finally:
        for hook in hooks:
            hook.remove()
