"""The last vision block at the CLS token alone. Surgeon's towers pool the CLS token (hooks.check_supported),
so the image embedding reads only row 0 of the last block's output: only that row's query, attention output,
out_proj, residual and MLP are needed, and decompose.head_z forms the CLS query's attention without the keys
and values of the other tokens. On ViT-B-32 (50 tokens) that block then costs a few percent of a full one,
and every Evaluator pass re-runs at least it (the debias search's single heads re-run 1 to 4 blocks)."""

from __future__ import annotations

import torch
from torch import nn

from surgeon.model.decompose import head_z
from surgeon.model.hooks import (
    after_attention,
    attention,
    attention_input,
    attention_layout,
    norms_across_heads,
    out_projection,
    packed_attention,
    plain_block,
)
from surgeon.model.pruned import PrunedAttention


def computes_cls_only(block: nn.Module) -> bool:
    """Whether block_at_cls computes the CLS row itself: an open_clip block in eval mode (no dropout) whose
    attention head_z reads (open_clip's or surgeon's pruned) and that has no norm across heads."""
    if block.training or not plain_block(block):
        return False
    attn = attention(block)
    return (isinstance(attn, PrunedAttention) or packed_attention(attn)) and not norms_across_heads(block)


def block_at_cls(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)[:, :1]`: the block's output at the CLS token, (batch, 1, width). out_proj is called as the
    module holds it (zero-ablated heads stay zero); any other block runs whole, its CLS row kept."""
    if not computes_cls_only(block):
        return block(x)[:, :1]
    attn = attention(block)
    attn_in = attention_input(block, x)
    if attention_layout(attn)[0]:
        z = head_z(block, attn_in).to(attn_in.dtype).flatten(1)
    else:  # every head pruned: out_proj adds its bias alone
        z = attn_in.new_zeros(len(attn_in), 0)
    return after_attention(block, x[:, :1], out_projection(attn)(z).unsqueeze(1))
