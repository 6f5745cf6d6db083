"""The one adapter to open_clip's architecture: named hook points on a vision tower (TransformerLens style;
read internals during an ordinary forward pass instead of forking the model code), each tower's residual
blocks, the vision tower's entry and exit around them (for re-running only the later layers), and typed
accessors for every part the other modules touch, so that open_clip's attribute names live here only.

Accessors raise InvalidInput when a part is missing: the model is not an architecture surgeon supports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from surgeon.core.errors import InvalidInput

TOWERS = ("vision", "text", "both")

_Part = TypeVar("_Part")


def _part(owner: nn.Module, name: str, kind: type[_Part]) -> _Part:
    """`owner.name`, checked to be a `kind`."""
    value = getattr(owner, name, None)
    if not isinstance(value, kind):
        raise InvalidInput(
            f"{type(owner).__name__}.{name} is not a {kind.__name__}: not an open_clip architecture surgeon supports"
        )
    return value


def _optional(owner: nn.Module, name: str, kind: type[_Part]) -> _Part | None:
    """`owner.name` when the architecture variant has it (None when absent or None)."""
    return _part(owner, name, kind) if getattr(owner, name, None) is not None else None


def _method(owner: nn.Module, name: str) -> Callable[..., Any]:
    method = getattr(owner, name, None)
    if not callable(method):
        raise InvalidInput(f"{type(owner).__name__} has no {name}(): not an open_clip architecture surgeon supports")
    return method


def vision_tower(model: nn.Module) -> nn.Module:
    return _part(model, "visual", nn.Module)


def vision_blocks(visual: nn.Module) -> nn.ModuleList:
    """The residual blocks of a vision tower, in order."""
    return _part(_part(visual, "transformer", nn.Module), "resblocks", nn.ModuleList)


def text_blocks(model: nn.Module) -> nn.ModuleList:
    """The residual blocks of the text tower (open_clip keeps it at the model's top level)."""
    transformer = getattr(model, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise InvalidInput("this model's text tower is not an open_clip transformer; prune the vision tower")
    return _part(transformer, "resblocks", nn.ModuleList)


def attention(block: nn.Module) -> nn.Module:
    """A block's attention: nn.MultiheadAttention, open_clip's Attention or surgeon's PrunedAttention."""
    return _part(block, "attn", nn.Module)


def set_attention(block: nn.Module, attn: nn.Module) -> None:
    block.attn = attn


def attention_layout(attn: nn.Module) -> tuple[int, int]:
    """(number of heads, head width)."""
    return _part(attn, "num_heads", int), _part(attn, "head_dim", int)


def in_projection(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The packed q/k/v weight (3 x inner, width) and its bias."""
    return _part(attn, "in_proj_weight", torch.Tensor), _optional(attn, "in_proj_bias", torch.Tensor)


def out_projection(attn: nn.Module) -> nn.Linear:
    return _part(attn, "out_proj", nn.Linear)


def qk_norms(attn: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The per-head query and key norms of qk-normalised attention; None without them."""
    ln_q = getattr(attn, "ln_q", None)
    if ln_q is None or isinstance(ln_q, nn.Identity):
        return None
    return _part(attn, "ln_q", nn.Module), _part(attn, "ln_k", nn.Module)


def cosine_scale(attn: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(learned log scale, its clamp) of scaled-cosine attention; None for dot-product attention."""
    scale = _optional(attn, "logit_scale", torch.Tensor)
    return None if scale is None else (scale, _part(attn, "logit_scale_max", float))


def head_scale(attn: nn.Module) -> torch.Tensor | None:
    """The per-head output gains of head-scaled attention (n_heads, 1, 1); None without them."""
    return _optional(attn, "head_scale", torch.Tensor)


def layer_scale(block: nn.Module) -> torch.Tensor | None:
    """The LayerScale gains on a block's attention output; None when the block has no LayerScale."""
    return _optional(_part(block, "ls_1", nn.Module), "gamma", torch.Tensor)


def norms_across_heads(block: nn.Module) -> bool:
    """Whether the block normalises the concatenated head outputs (scale_attn / scale_heads' inner norm)."""
    parts = [getattr(block, "ln_attn", None), getattr(attention(block), "ln_inner", None)]
    return any(part is not None and not isinstance(part, nn.Identity) for part in parts)


def final_norm(visual: nn.Module) -> nn.LayerNorm:
    """ln_post: the norm between the last block and the projection."""
    return _part(visual, "ln_post", nn.LayerNorm)


def projection(visual: nn.Module) -> torch.Tensor:
    """The (width, embed_dim) map from the pooled token into the joint space."""
    return _part(visual, "proj", torch.Tensor)


def embed_dim(model: nn.Module) -> int:
    """The joint embedding's width."""
    return _part(vision_tower(model), "output_dim", int)


def image_size(model: nn.Module) -> tuple[int, int]:
    """The (height, width) the vision tower takes."""
    height, width = _part(vision_tower(model), "image_size", tuple)
    return int(height), int(width)


def logit_scale(model: nn.Module) -> torch.Tensor:
    """The CLIP temperature's learned log (a parameter: clamping it in place trains it)."""
    return _part(model, "logit_scale", torch.Tensor)


def encode_image(model: nn.Module, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    return _method(model, "encode_image")(pixels, normalize=normalize)


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    return _method(model, "encode_text")(tokens, normalize=normalize)


def hook_points(visual: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """name -> (module, "in" | "out"). `blocks.{l}.attn_in` is ln_1's output (the attention input),
    `blocks.{l}.attn_out` / `mlp_out` are what the block adds to the residual stream (after LayerScale),
    `resid_pre` is the first block's input and `resid_final` the input of ln_post."""
    blocks = vision_blocks(visual)
    points: dict[str, tuple[nn.Module, str]] = {
        "resid_pre": (blocks[0], "in"),
        "resid_final": (final_norm(visual), "in"),
    }
    for i, block in enumerate(blocks):
        points[f"blocks.{i}.attn_in"] = (_part(block, "ln_1", nn.Module), "out")
        points[f"blocks.{i}.attn_out"] = (_part(block, "ls_1", nn.Module), "out")
        points[f"blocks.{i}.mlp_out"] = (_part(block, "ls_2", nn.Module), "out")
    return points


@contextmanager
def record(visual: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the named activations of the next forward passes into the yielded dict."""
    points = hook_points(visual)
    unknown = [n for n in names if n not in points]
    if unknown:
        raise KeyError(f"unknown hook points {unknown}; known: {sorted(points)}")
    cache: dict[str, torch.Tensor] = {}
    handles: list[RemovableHandle] = []
    for name in names:
        module, kind = points[name]
        if kind == "in":
            handles.append(module.register_forward_pre_hook(_store_input(cache, name)))
        else:
            handles.append(module.register_forward_hook(_store_output(cache, name)))
    try:
        yield cache
    finally:
        for handle in handles:
            handle.remove()


def _store_input(cache: dict[str, torch.Tensor], name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        cache[name] = args[0]

    return hook


def _store_output(cache: dict[str, torch.Tensor], name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
    def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        cache[name] = output

    return hook


def tower_blocks(model: nn.Module, tower: str) -> list[tuple[str, nn.ModuleList]]:
    """(tower name, its residual blocks) for "vision", "text" or "both": where surgery finds the heads."""
    if tower not in TOWERS:
        raise InvalidInput(f"unknown tower {tower!r}", hint=f"choose one of {', '.join(TOWERS)}")
    towers = []
    if tower in ("vision", "both"):
        towers.append(("vision", vision_blocks(vision_tower(model))))
    if tower in ("text", "both"):
        towers.append(("text", text_blocks(model)))
    return towers


def residual_in(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The residual stream entering the first block (patch + class embeddings, positions, ln_pre)."""
    return _method(visual, "_embeds")(pixels)


def plain_block(block: nn.Module) -> bool:
    """Whether `block` is one of open_clip's self-attention residual blocks, x + ls_1(attn(ln_1(x))) then
    + ls_2(mlp(ln_2(.))) (and ln_attn, which norms_across_heads reports): the form after_attention finishes."""
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    if type(block) is ResidualAttentionBlock:
        return not hasattr(block, "ln_1_kv")  # cross-attention reads its keys from another input
    return type(block) is CustomResidualAttentionBlock


def packed_attention(attn: nn.Module) -> bool:
    """Whether `attn` is open_clip's self-attention in the packed q/k/v form decompose.head_z reads:
    nn.MultiheadAttention batch-first with one width and no added key/value biases or zero attention, or
    open_clip's Attention."""
    from open_clip.transformer import Attention

    if type(attn) is nn.MultiheadAttention:
        return attn.batch_first and attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
    return type(attn) is Attention


def attention_input(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ln_1 of the residual stream: what a block's attention reads."""
    return _part(block, "ln_1", nn.Module)(x)


def after_attention(block: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The rest of a plain block, token by token: LayerScale and the residual add of the attention output
    (out_proj applied), then the MLP's."""
    x = x + _part(block, "ls_1", nn.Module)(attn_out)
    return x + _part(block, "ls_2", nn.Module)(_part(block, "mlp", nn.Module)(_part(block, "ln_2", nn.Module)(x)))


def image_embeds(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (unnormalised) image embedding from the residual stream after the last block: ln_post, pooling, proj.
    The stream may hold the CLS token alone (cls_token.block_at_cls): check_supported's towers pool it."""
    pooled, _ = _method(visual, "_pool")(x)
    return pooled @ projection(visual)


def check_supported(visual: nn.Module) -> None:
    """Refuse towers whose output is not a sum of per-head terms read at the CLS token."""
    if not hasattr(visual, "transformer") or not hasattr(visual, "ln_post"):
        raise InvalidInput("surgeon needs an open_clip VisionTransformer image tower")
    if getattr(visual, "attn_pool", None) is not None:
        raise InvalidInput("attention-pooled towers (CoCa) are not supported: heads do not write to one token")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise InvalidInput(f"pool_type {visual.pool_type!r} is not supported: the method reads the CLS token")
    for i, block in enumerate(vision_blocks(visual)):
        if norms_across_heads(block):
            raise InvalidInput(f"block {i} normalises across heads (scale_attn/inner_norm): not decomposable")
