"""Stage 6: surgery on attention heads (zero / mean ablation folded into weights, or hard removal)."""

from __future__ import annotations

from torch import nn


def rebuild_pruned(model: nn.Module, record: dict) -> nn.Module:
    """Rebuild the narrower attention of a hard-pruned model from its recorded layout before loading."""
    if not record.get("heads_kept"):
        return model
    raise NotImplementedError
