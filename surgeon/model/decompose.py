"""Stage 2a: the direct contribution of every vision head to the image embedding (docs/METHOD.md §1.1).

ln_post's per-image mean and std are read off the real final residual and held constant, so ln_post is
affine and every residual term (embedding, MLP outputs, head outputs with their share of the out_proj
bias) maps linearly into the joint space; divided by the embedding norm, the terms sum exactly to the
normalised image embedding. Head outputs at the CLS query are recomputed from the recorded attention
input (cheap: one query), so both open_clip block types and surgeon's pruned attention work unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.core.errors import InvalidInput
from surgeon.core.limits import echo
from surgeon.model.heads import HeadRef
from surgeon.model.hooks import (
    attention,
    attention_layout,
    cosine_scale,
    final_norm,
    head_scale,
    in_projection,
    layer_scale,
    out_projection,
    projection,
    qk_norms,
    record,
    vision_blocks,
)


@dataclass(frozen=True)
class AttentionParams:
    """The weights of one attention layer in one shape, whatever module holds them."""

    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    wo: torch.Tensor  # (width, n_heads * head_dim)
    bo: torch.Tensor | None
    n_heads: int
    head_dim: int
    module: nn.Module

    @classmethod
    def of(cls, attn: nn.Module) -> AttentionParams:
        if isinstance(attn, nn.MultiheadAttention) and not attn._qkv_same_embed_dim:
            raise InvalidInput("attention with separate k/v dimensions is not supported")
        n_heads, head_dim = attention_layout(attn)
        weight, bias = in_projection(attn)
        wq, wk, wv = weight.split(n_heads * head_dim, dim=0)
        bq, bk, bv = bias.split(n_heads * head_dim) if bias is not None else (None, None, None)
        out = out_projection(attn)
        return cls(wq, wk, wv, bq, bk, bv, out.weight, out.bias, n_heads, head_dim, attn)

    @classmethod
    def of_block(cls, block: nn.Module) -> AttentionParams:
        return cls.of(attention(block))


def head_z(block: nn.Module, attn_in: torch.Tensor) -> torch.Tensor:
    """Each head's attention-weighted values at the CLS query, before out_proj: (B, H, head_dim).

    For plain dot-product attention the keys and values of all tokens are never formed: the logit of token t
    is (W_K,h^T q_h) . x_t (the key bias shifts every logit equally and cancels in the softmax), and since the
    weights sum to one, z_h = (sum_t a_t x_t) W_V,h^T + b_V,h. That is head_dim times cheaper than
    recomputing K and V, which keeps statistics collection close to plain encode_image speed."""
    p = AttentionParams.of_block(block)
    a = attn_in.float()
    batch, tokens, _ = a.shape
    h, d = p.n_heads, p.head_dim
    cosine, norms = cosine_scale(p.module), qk_norms(p.module)
    q = F.linear(a[:, 0], p.wq.float(), None if p.bq is None else p.bq.float()).view(batch, h, d)
    if cosine is None and norms is None:  # plain scaled dot product: keys and values are folded (above)
        wk, wv = p.wk.float().view(h, d, -1), p.wv.float().view(h, d, -1)
        q_tilde = torch.einsum("bhd,hdw->bhw", q, wk) * d**-0.5
        weights = torch.einsum("bhw,btw->bht", q_tilde, a).softmax(dim=-1)
        z = torch.einsum("bhw,hdw->bhd", torch.einsum("bht,btw->bhw", weights, a), wv)
        if p.bv is not None:
            z = z + p.bv.float().view(h, d)
    else:
        k = F.linear(a, p.wk.float(), None if p.bk is None else p.bk.float()).view(batch, tokens, h, d).transpose(1, 2)
        v = F.linear(a, p.wv.float(), None if p.bv is None else p.bv.float()).view(batch, tokens, h, d).transpose(1, 2)
        q = q.unsqueeze(2)
        if norms is not None:  # open_clip refuses q/k norms together with scaled cosine
            q, k = norms[0](q), norms[1](k)
        if cosine is not None:
            log_scale, scale_max = cosine
            scale = torch.clamp(log_scale.float(), max=scale_max).exp()
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2) * scale
        else:
            logits = (q @ k.transpose(-1, -2)) * d**-0.5
        z = (logits.softmax(dim=-1) @ v).squeeze(2)
    gains = head_scale(p.module)
    if gains is not None:
        z = z * gains.float().view(1, h, 1)
    return z


def head_terms(block: nn.Module, attn_in: torch.Tensor, linear_map: torch.Tensor) -> torch.Tensor:
    """Each head's CLS output (with its share of the out_proj bias and LayerScale) mapped by `linear_map`
    (width x D) — W_O is folded into the map per head, so the width-sized output is never formed: (B, H, D)."""
    p = AttentionParams.of_block(block)
    if p.n_heads == 0:
        raise InvalidInput("a layer with every head removed cannot be decomposed per head")
    gamma = layer_scale(block)
    scaled_map = linear_map * gamma.float()[:, None] if gamma is not None else linear_map
    per_head = torch.einsum("whd,wD->hdD", p.wo.float().view(-1, p.n_heads, p.head_dim), scaled_map)
    out = torch.einsum("bhd,hdD->bhD", head_z(block, attn_in), per_head)
    if p.bo is not None:
        out = out + (p.bo.float() / p.n_heads) @ scaled_map
    return out


@dataclass
class Decomposition:
    """Joint-space terms of the normalised image embedding, per image."""

    layers: tuple[int, ...]
    heads: torch.Tensor  # (B, len(layers), H, D)
    embedding: torch.Tensor  # (B, D), normalised
    rest: dict[str, torch.Tensor] | None = None  # "embed": (B, D), "mlp": (B, L, D) when asked for


def decompose(
    visual: nn.Module, images: torch.Tensor, layers: tuple[int, ...], *, with_rest: bool = False
) -> Decomposition:
    """Run the tower once on `images` and return each analysed head's normalised joint-space term."""
    blocks = vision_blocks(visual)
    n_layers = len(blocks)
    names = ["resid_final"] + [f"blocks.{i}.attn_in" for i in layers]
    if with_rest:
        names += ["resid_pre"] + [f"blocks.{i}.mlp_out" for i in range(n_layers)]
    with torch.no_grad(), record(visual, names) as cache:
        pooled = visual(images)
        if isinstance(pooled, tuple):
            pooled = pooled[0]
        resid = cache["resid_final"]
        resid = (resid[:, 0] if resid.ndim == 3 else resid).float()
        n_heads = [AttentionParams.of_block(b).n_heads for b in blocks]
        n_terms = 1 + n_layers + sum(n_heads)
        ln = final_norm(visual)
        mu = resid.mean(-1, keepdim=True)
        sigma = (resid.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
        gamma = ln.weight.float() if ln.weight is not None else torch.ones_like(resid[0])
        beta = ln.bias.float() if ln.bias is not None else torch.zeros_like(resid[0])
        proj = projection(visual).float()
        norm = pooled.float().norm(dim=-1)

        # ln_post with frozen statistics is affine: term t -> (gamma*t @ proj - mu/K gamma@proj) / sigma + beta@proj / K
        gamma_proj = gamma[:, None] * proj
        shift = (beta @ proj) / n_terms
        offset = mu / n_terms * (gamma @ proj)

        def finish(mapped: torch.Tensor) -> torch.Tensor:
            """From (gamma * t) @ proj to the normalised joint-space term."""
            shape = (-1,) + (1,) * (mapped.ndim - 2) + (mapped.shape[-1],)
            view = (-1,) + (1,) * (mapped.ndim - 1)
            return ((mapped - offset.view(shape)) / sigma.view(view) + shift) / norm.view(view)

        heads = torch.stack([head_terms(blocks[i], cache[f"blocks.{i}.attn_in"], gamma_proj) for i in layers], dim=1)
        out = Decomposition(layers=tuple(layers), heads=finish(heads), embedding=pooled.float() / norm[:, None])
        if with_rest:
            mlp = torch.stack([cache[f"blocks.{i}.mlp_out"][:, 0].float() for i in range(n_layers)], dim=1)
            out.rest = {"embed": finish(cache["resid_pre"][:, 0].float() @ gamma_proj), "mlp": finish(mlp @ gamma_proj)}
    return out


def vision_layout(visual: nn.Module) -> tuple[int, list[int]]:
    """(number of layers, heads per layer)."""
    blocks = vision_blocks(visual)
    return len(blocks), [AttentionParams.of_block(b).n_heads for b in blocks]


def parse_layers(spec: str | None, n_layers: int) -> tuple[int, ...]:
    """`None`/"last4" -> the last 4 layers (the paper's choice); "all"; "8-11"; "3,5,7"; negative indices."""
    if spec is None:
        return tuple(range(max(0, n_layers - 4), n_layers))
    spec = spec.strip().lower()
    if spec == "all":
        return tuple(range(n_layers))
    if spec.startswith("last"):
        count = spec.removeprefix("last") or "4"
        if not count.isdigit() or not 0 < int(count) <= n_layers:
            raise InvalidInput(f"bad layer spec {echo(spec)}: the model has {n_layers} layers")
        return tuple(range(n_layers - int(count), n_layers))
    layers: set[int] = set()
    try:
        for part in (p.strip() for p in spec.split(",")):
            span = re.fullmatch(r"(\d+)-(\d+)", part)
            if span:  # checked before the range is built: "0-999999999999" must not allocate
                if not int(span[1]) <= int(span[2]) < n_layers:
                    raise InvalidInput(f"layers {echo(part)} out of range: the model has layers 0..{n_layers - 1}")
                layers.update(range(int(span[1]), int(span[2]) + 1))
            else:
                idx = int(part)
                layers.add(idx + n_layers if idx < 0 else idx)
    except ValueError:
        raise InvalidInput(f"bad layer spec {echo(spec)}", hint="use e.g. 8-11, 3,5,7, last4 or all") from None
    bad = sorted(i for i in layers if not 0 <= i < n_layers)
    if bad or not layers:
        raise InvalidInput(f"layers {echo(bad or spec)} out of range: the model has layers 0..{n_layers - 1}")
    return tuple(sorted(layers))


def head_means(
    visual: nn.Module, batches: Iterable[torch.Tensor], heads: Collection[HeadRef]
) -> dict[HeadRef, torch.Tensor]:
    """Mean of each listed head's CLS value vector z over reference images (for mean ablation)."""
    blocks = vision_blocks(visual)
    layers = sorted({ref.layer for ref in heads})
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for batch in batches:
        with torch.no_grad(), record(visual, [f"blocks.{i}.attn_in" for i in layers]) as cache:
            visual(batch)
            for layer in layers:
                z_sum = head_z(blocks[layer], cache[f"blocks.{layer}.attn_in"]).double().sum(0)
                sums[layer] = sums[layer] + z_sum if layer in sums else z_sum
        count += batch.shape[0]
    if count == 0:
        raise InvalidInput("the reference image set for mean ablation is empty")
    return {ref: (sums[ref.layer][ref.head] / count).float() for ref in heads}
