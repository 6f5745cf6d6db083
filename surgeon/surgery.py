"""Stage 6: surgery on attention heads (METHOD.md §2).

- zero: the paper's soft pruning — zero the head's out_proj columns and its Q rows / Q bias.
- mean: replace the head's output by its mean over reference images (at the CLS position, the direct
  effect TextSpan measures), folded into the out_proj bias; no run-time cost.
- hard: physically remove the heads with `PrunedAttention`, whose inner width is heads_kept x head_dim;
  the kept heads per layer are recorded so the model is rebuilt and loaded strictly.
All modes act on a model in place and return the surgery record stored with exported checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.decompose import AttentionParams
from surgeon.errors import InvalidInput
from surgeon.limits import echo
from surgeon.registry import Registry

TOWERS = ("vision", "text", "both")


@dataclass(frozen=True, order=True)
class HeadRef:
    layer: int
    head: int

    @property
    def name(self) -> str:
        return f"L{self.layer}.H{self.head}"

    @classmethod
    def parse(cls, spec: str) -> HeadRef:
        import re

        match = re.fullmatch(r"\s*L(\d{1,6})\.H(\d{1,6})\s*", spec, flags=re.IGNORECASE)
        if not match:
            raise InvalidInput(f"malformed head {echo(spec)}", hint="write heads as L<layer>.H<head>, e.g. L11.H5")
        return cls(int(match[1]), int(match[2]))


def parse_heads(spec: str | Iterable[str]) -> list[HeadRef]:
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    heads = [HeadRef.parse(p) for p in parts if p.strip()]
    if not heads:
        raise InvalidInput("no heads given", hint="e.g. --heads L11.H5,L10.H8")
    return sorted(set(heads))


class PrunedAttention(nn.Module):
    """Multi-head self-attention over only the kept heads (inner width = len(kept) x head_dim).

    Drop-in for both open_clip block types: called like nn.MultiheadAttention (returns a tuple) when
    `mha_style`, else like open_clip's Attention (returns a tensor)."""

    def __init__(self, width: int, n_heads: int, head_dim: int, mha_style: bool, qk_norm: nn.Module | None = None):
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


def _blocks(model: nn.Module, tower: str) -> list[tuple[str, nn.ModuleList]]:
    if tower not in TOWERS:
        raise InvalidInput(f"unknown tower {tower!r}", hint=f"choose one of {', '.join(TOWERS)}")
    towers = []
    if tower in ("vision", "both"):
        towers.append(("vision", model.visual.transformer.resblocks))
    if tower in ("text", "both"):
        if not hasattr(model, "transformer"):
            raise InvalidInput("this model's text tower is not an open_clip transformer; prune the vision tower")
        towers.append(("text", model.transformer.resblocks))
    return towers


def check_heads(model: nn.Module, heads: Iterable[HeadRef], tower: str = "vision") -> None:
    for name, blocks in _blocks(model, tower):
        for ref in heads:
            if not 0 <= ref.layer < len(blocks):
                raise InvalidInput(f"{ref.name}: the {name} tower has layers 0..{len(blocks) - 1}")
            n = AttentionParams.of(blocks[ref.layer].attn).n_heads
            if not 0 <= ref.head < n:
                raise InvalidInput(f"{ref.name}: layer {ref.layer} of the {name} tower has heads 0..{n - 1}")


def _by_layer(heads: Iterable[HeadRef]) -> dict[int, list[int]]:
    layers: dict[int, list[int]] = {}
    for ref in sorted(set(heads)):
        layers.setdefault(ref.layer, []).append(ref.head)
    return layers


@torch.no_grad()
def zero_heads(blocks: nn.ModuleList, heads: Iterable[HeadRef]) -> None:
    for layer, head_ids in _by_layer(heads).items():
        p = AttentionParams.of(blocks[layer].attn)
        for h in head_ids:
            cols = slice(h * p.head_dim, (h + 1) * p.head_dim)
            p.wo[:, cols] = 0
            p.wq[cols] = 0
            if p.bq is not None:
                p.bq[cols] = 0


@torch.no_grad()
def fold_means(blocks: nn.ModuleList, means: dict[HeadRef, torch.Tensor]) -> None:
    """Add W_O,h @ mean(z_h) to the out_proj bias, then zero the head: its output becomes its mean."""
    for ref, z_mean in means.items():
        p = AttentionParams.of(blocks[ref.layer].attn)
        cols = slice(ref.head * p.head_dim, (ref.head + 1) * p.head_dim)
        p.bo.add_(p.wo[:, cols] @ z_mean.to(p.wo))
    zero_heads(blocks, means)


@torch.no_grad()
def remove_heads(blocks: nn.ModuleList, heads: Iterable[HeadRef]) -> dict[int, list[int]]:
    """Replace each touched layer's attention by a narrower PrunedAttention; returns the kept heads."""
    kept_by_layer = {}
    for layer, head_ids in _by_layer(heads).items():
        block = blocks[layer]
        p = AttentionParams.of(block.attn)
        kept = [h for h in range(p.n_heads) if h not in head_ids]
        new = _pruned_like(block.attn, len(kept), p)
        rows = (
            torch.cat([torch.arange(h * p.head_dim, (h + 1) * p.head_dim) for h in kept])
            if kept
            else torch.zeros(0, dtype=torch.long)
        )
        rows = rows.to(p.wq.device)
        new.in_proj_weight.copy_(torch.cat([p.wq[rows], p.wk[rows], p.wv[rows]]))
        biases = [b[rows] if b is not None else torch.zeros(len(rows), device=p.wq.device) for b in (p.bq, p.bk, p.bv)]
        new.in_proj_bias.copy_(torch.cat(biases))
        new.out_proj.weight.copy_(p.wo[:, rows])
        new.out_proj.bias.copy_(p.bo if p.bo is not None else torch.zeros_like(new.out_proj.bias))
        block.attn = new.to(p.wo.device, p.wo.dtype).train(block.attn.training)
        kept_by_layer[layer] = kept
    return kept_by_layer


def _pruned_like(attn: nn.Module, n_kept: int, p: AttentionParams) -> PrunedAttention:
    if getattr(attn, "logit_scale", None) is not None or getattr(attn, "head_scale", None) is not None:
        raise InvalidInput("hard pruning of scaled-cosine or head-scaled attention is not supported; use --mode zero")
    qk_norm = None
    if not isinstance(getattr(attn, "ln_q", nn.Identity()), nn.Identity):
        qk_norm = (attn.ln_q, attn.ln_k)
    width = p.wo.shape[0]
    return PrunedAttention(width, n_kept, p.head_dim, isinstance(attn, nn.MultiheadAttention), qk_norm)


def rebuild_pruned(model: nn.Module, record: dict) -> nn.Module:
    """Give a freshly built model the narrower attention recorded by hard pruning, before a strict load."""
    for tower, layers in (record.get("heads_kept") or {}).items():
        blocks = _blocks(model, tower)[0][1]
        for layer, kept in layers.items():
            block = blocks[int(layer)]
            p = AttentionParams.of(block.attn)
            block.attn = _pruned_like(block.attn, len(kept), p)
    return model


@dataclass
class SurgeryRequest:
    heads: list[HeadRef]
    mode: str = "zero"
    tower: str = "vision"
    reference_means: Callable[[nn.ModuleList, list[HeadRef]], dict[HeadRef, torch.Tensor]] | None = None


SURGERIES: Registry = Registry("surgery mode")


@SURGERIES.register("zero")
def _zero(model: nn.Module, request: SurgeryRequest) -> dict:
    for _, blocks in _blocks(model, request.tower):
        zero_heads(blocks, request.heads)
    return {}


@SURGERIES.register("mean")
def _mean(model: nn.Module, request: SurgeryRequest) -> dict:
    if request.reference_means is None:
        raise InvalidInput("mean ablation needs a reference image set")
    for _, blocks in _blocks(model, request.tower):
        fold_means(blocks, request.reference_means(blocks, request.heads))
    return {}


@SURGERIES.register("hard")
def _hard(model: nn.Module, request: SurgeryRequest) -> dict:
    kept = {
        tower: {str(k): v for k, v in remove_heads(blocks, request.heads).items()}
        for tower, blocks in _blocks(model, request.tower)
    }
    return {"heads_kept": kept}


def apply_surgery(model: nn.Module, request: SurgeryRequest) -> dict:
    """Operate in place; returns the record to store with the checkpoint (empty for soft modes)."""
    check_heads(model, request.heads, request.tower)
    record = SURGERIES.get(request.mode)(model, request)
    return {"mode": request.mode, "tower": request.tower, "heads": [h.name for h in request.heads], **record}
