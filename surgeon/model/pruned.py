"""The hard-pruned attention module and how a model gets its narrower layout back: shared by surgery (which
creates it) and loading (which rebuilds a hard-pruned checkpoint before a strict load), so that loading a
model does not depend on the surgery stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.core.errors import CorruptInput, InvalidInput
from surgeon.core.limits import echo
from surgeon.model.decompose import AttentionParams
from surgeon.model.hooks import cosine_scale, head_scale, qk_norms, set_attention, tower_blocks


class PrunedAttention(nn.Module):
    """Multi-head self-attention over only the kept heads (inner width = len(kept) x head_dim).

    Drop-in for both open_clip block types: called like nn.MultiheadAttention (returns a tuple) when
    `mha_style`, else like open_clip's Attention (returns a tensor)."""

    def __init__(
        self,
        width: int,
        n_heads: int,
        head_dim: int,
        mha_style: bool,
        qk_norm: tuple[nn.Module, nn.Module] | None = None,
    ):
        super().__init__()
        inner = n_heads * head_dim
        self.num_heads, self.head_dim, self.mha_style = n_heads, head_dim, mha_style
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner))
        self.out_proj = nn.Linear(inner, width)
        self.ln_q = qk_norm[0] if qk_norm is not None else nn.Identity()
        self.ln_k = qk_norm[1] if qk_norm is not None else nn.Identity()

    def forward(
        self, x: torch.Tensor, k_x=None, v_x=None, need_weights: bool = False, attn_mask: torch.Tensor | None = None
    ):
        batch, tokens, _ = x.shape
        if self.num_heads == 0:
            out = self.out_proj.bias.expand(batch, tokens, -1).to(x.dtype)
        else:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (t.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            q, k = self.ln_q(q), self.ln_k(k)
            if attn_mask is not None and attn_mask.dtype != torch.bool:
                attn_mask = attn_mask.to(q.dtype)
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            out = self.out_proj(z.transpose(1, 2).reshape(batch, tokens, -1))
        return (out, None) if self.mha_style else out


def pruned_like(attn: nn.Module, n_kept: int, p: AttentionParams) -> PrunedAttention:
    if cosine_scale(attn) is not None or head_scale(attn) is not None:
        raise InvalidInput("hard pruning of scaled-cosine or head-scaled attention is not supported; use --mode zero")
    width = p.wo.shape[0]
    return PrunedAttention(width, n_kept, p.head_dim, isinstance(attn, nn.MultiheadAttention), qk_norms(attn))


def rebuild_pruned(model: nn.Module, record: object, config: str) -> nn.Module:
    """Give a freshly built model the narrower attention recorded by hard pruning, before a strict load. The
    layout comes from a config file: it is checked against the architecture first, so a bad one is one line."""
    for block, kept, p in pruned_layout(model, record, config):
        set_attention(block, pruned_like(p.module, len(kept), p))
    return model


def pruned_layout(model: nn.Module, record: object, config: str) -> list[tuple[nn.Module, list[int], AttentionParams]]:
    """(block, kept heads, its attention) for each layer of a "surgeon" config entry, or CorruptInput when a
    tower or layer is not the model's, or the kept heads are not distinct head indices of that layer (a 5 M
    character string as a layer's heads would otherwise size a 69 GB projection)."""
    where = f"{config}: surgeon"
    if not isinstance(record, dict):
        raise CorruptInput(f"{where} must be a JSON object, got {echo(record)}")
    heads_kept = record.get("heads_kept") or {}
    if not isinstance(heads_kept, dict):
        raise CorruptInput(f"{where}.heads_kept must map towers to layers, got {echo(heads_kept)}")
    out = []
    for tower, layers in heads_kept.items():
        if tower not in ("vision", "text") or not isinstance(layers, dict):
            raise CorruptInput(f"{where}.heads_kept: {echo(tower)} is not a tower (vision, text) mapping layers")
        blocks = tower_blocks(model, tower)[0][1]
        for layer, kept in layers.items():
            if not (isinstance(layer, str) and layer.isdecimal() and len(layer) <= 6 and int(layer) < len(blocks)):
                raise CorruptInput(
                    f"{where}.heads_kept.{tower}: the model has layers 0..{len(blocks) - 1}, not {echo(layer)}"
                )
            block = blocks[int(layer)]
            p = AttentionParams.of_block(block)
            if not (
                isinstance(kept, list)
                and len(kept) <= p.n_heads
                and all(type(h) is int and 0 <= h < p.n_heads for h in kept)
                and len(set(kept)) == len(kept)
            ):
                raise CorruptInput(
                    f"{where}.heads_kept.{tower}.{layer} must list distinct heads of 0..{p.n_heads - 1}, "
                    f"got {echo(kept)}"
                )
            out.append((block, kept, p))
    return out
