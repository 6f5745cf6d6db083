"""Named hook points on an open_clip vision tower (TransformerLens style): read internals during an
ordinary forward pass instead of forking the model code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


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
