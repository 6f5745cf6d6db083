"""Stage 6: surgery on attention heads (docs/METHOD.md §2).

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
from torch import nn

from surgeon.core.errors import InvalidInput
from surgeon.core.registry import Registry
from surgeon.model.decompose import AttentionParams
from surgeon.model.heads import HeadRef
from surgeon.model.hooks import set_attention, tower_blocks
from surgeon.model.pruned import pruned_like


def check_heads(model: nn.Module, heads: Iterable[HeadRef], tower: str = "vision") -> None:
    for name, blocks in tower_blocks(model, tower):
        for ref in heads:
            if not 0 <= ref.layer < len(blocks):
                raise InvalidInput(f"{ref.name}: the {name} tower has layers 0..{len(blocks) - 1}")
            n = AttentionParams.of_block(blocks[ref.layer]).n_heads
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
        p = AttentionParams.of_block(blocks[layer])
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
        p = AttentionParams.of_block(blocks[ref.layer])
        if p.bo is None:
            raise InvalidInput("mean ablation folds into the out_proj bias, which this model lacks; use --mode zero")
        cols = slice(ref.head * p.head_dim, (ref.head + 1) * p.head_dim)
        p.bo.add_(p.wo[:, cols] @ z_mean.to(p.wo))
    zero_heads(blocks, means)


@torch.no_grad()
def remove_heads(blocks: nn.ModuleList, heads: Iterable[HeadRef]) -> dict[int, list[int]]:
    """Replace each touched layer's attention by a narrower PrunedAttention; returns the kept heads."""
    kept_by_layer = {}
    for layer, head_ids in _by_layer(heads).items():
        block = blocks[layer]
        p = AttentionParams.of_block(block)
        kept = [h for h in range(p.n_heads) if h not in head_ids]
        new = pruned_like(p.module, len(kept), p)
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
        set_attention(block, new.to(p.wo.device, p.wo.dtype).train(p.module.training))
        kept_by_layer[layer] = kept
    return kept_by_layer


@dataclass
class SurgeryRequest:
    heads: list[HeadRef]
    mode: str = "zero"
    tower: str = "vision"
    reference_means: Callable[[nn.ModuleList, list[HeadRef]], dict[HeadRef, torch.Tensor]] | None = None


SURGERIES: Registry = Registry("surgery mode")


@SURGERIES.register("zero")
def _zero(model: nn.Module, request: SurgeryRequest) -> dict:
    for _, blocks in tower_blocks(model, request.tower):
        zero_heads(blocks, request.heads)
    return {}


@SURGERIES.register("mean")
def _mean(model: nn.Module, request: SurgeryRequest) -> dict:
    if request.reference_means is None:
        raise InvalidInput("mean ablation needs a reference image set")
    for _, blocks in tower_blocks(model, request.tower):
        fold_means(blocks, request.reference_means(blocks, request.heads))
    return {}


@SURGERIES.register("hard")
def _hard(model: nn.Module, request: SurgeryRequest) -> dict:
    kept = {
        tower: {str(k): v for k, v in remove_heads(blocks, request.heads).items()}
        for tower, blocks in tower_blocks(model, request.tower)
    }
    return {"heads_kept": kept}


def apply_surgery(model: nn.Module, request: SurgeryRequest) -> dict:
    """Operate in place; returns the record to store with the checkpoint (empty for soft modes)."""
    check_heads(model, request.heads, request.tower)
    record = SURGERIES.get(request.mode)(model, request)
    return {"mode": request.mode, "tower": request.tower, "heads": [h.name for h in request.heads], **record}
