"""The one adapter to open_clip's architecture: named hook points on a vision tower (TransformerLens style;
read internals during an ordinary forward pass instead of forking the model code), each tower's residual
blocks, and the vision tower's entry and exit around them (for re-running only the later layers)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from surgeon.errors import InvalidInput

TOWERS = ("vision", "text", "both")


def hook_points(visual: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """name -> (module, "in" | "out"). `blocks.{l}.attn_in` is ln_1's output (the attention input),
    `blocks.{l}.attn_out` / `mlp_out` are what the block adds to the residual stream (after LayerScale),
    `resid_pre` is the first block's input and `resid_final` the input of ln_post."""
    blocks = visual.transformer.resblocks
    points: dict[str, tuple[nn.Module, str]] = {
        "resid_pre": (blocks[0], "in"),
        "resid_final": (visual.ln_post, "in"),
    }
    for i, block in enumerate(blocks):
        points[f"blocks.{i}.attn_in"] = (block.ln_1, "out")
        points[f"blocks.{i}.attn_out"] = (block.ls_1, "out")
        points[f"blocks.{i}.mlp_out"] = (block.ls_2, "out")
    return points


@contextmanager
def record(visual: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the named activations of the next forward passes into the yielded dict."""
    points = hook_points(visual)
    unknown = [n for n in names if n not in points]
    if unknown:
        raise KeyError(f"unknown hook points {unknown}; known: {sorted(points)}")
    cache: dict[str, torch.Tensor] = {}
    handles = []
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


def _store_input(cache: dict, name: str):
    def hook(_module, args):
        cache[name] = args[0]

    return hook


def _store_output(cache: dict, name: str):
    def hook(_module, _args, output):
        cache[name] = output

    return hook


def tower_blocks(model: nn.Module, tower: str) -> list[tuple[str, nn.ModuleList]]:
    """(tower name, its residual blocks) for "vision", "text" or "both": where surgery finds the heads."""
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


def residual_in(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The residual stream entering the first block (patch + class embeddings, positions, ln_pre)."""
    return visual._embeds(pixels)


def image_embeds(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (unnormalised) image embedding from the residual stream after the last block: ln_post, pooling, proj."""
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj
