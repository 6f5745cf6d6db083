"""Zero-shot classification as in CLIP / clip_benchmark (docs/METHOD.md §4).

Class embedding = normalised mean of the normalised embeddings of every template filled with the class
name; logits = 100 * image_emb . class_emb; metrics top-1, top-5 and mean per-class recall. Works for any
open_clip model (anything with ``encode_image`` / ``encode_text``) and tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from surgeon.core.errors import InvalidInput
from surgeon.inputs.templates import check_templates, fill


def _device_of(model: torch.nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def build_classifier(
    model,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str],
    device=None,
    batch_size: int = 256,
) -> torch.Tensor:
    """(C x D) class embeddings: normalised mean of normalised template embeddings per class."""
    if not classnames:
        raise InvalidInput("no class names given")
    if not templates:
        raise InvalidInput("no prompt templates given")
    dev = _device_of(model, device)
    texts = [fill(t, c) for c in classnames for t in check_templates(templates)]
    feats = []
    for i in range(0, len(texts), batch_size):
        tok = tokenizer(texts[i : i + batch_size]).to(dev)
        feats.append(F.normalize(model.encode_text(tok).float(), dim=-1))
    emb = torch.cat(feats).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def uint8_to_tensor(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float, as ToTensor + Normalize (no resizing)."""
    arr = np.ascontiguousarray(images)
    if not arr.flags.writeable:
        arr = arr.copy()
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """acc1, acc5 (top-min(5, C)), mean per-class recall (over classes present), as fractions in [0, 1]."""
    labels = labels.long().view(-1)
    if len(labels) != len(logits):
        raise InvalidInput(f"{len(logits)} images but {len(labels)} labels")
    n, c = logits.shape
    if labels.numel() and (labels.min() < 0 or labels.max() >= c):
        raise InvalidInput(f"labels must be in 0..{c - 1}")
    k = min(5, c)
    topk = logits.topk(k, dim=1).indices
    correct = topk == labels[:, None]
    pred = topk[:, 0]
    recalls = [(pred[labels == j] == j).float().mean().item() for j in range(c) if (labels == j).any()]
    return {
        "acc1": correct[:, 0].float().mean().item(),
        "acc5": correct.any(dim=1).float().mean().item(),
        "mean_per_class_recall": float(np.mean(recalls)) if recalls else float("nan"),
        "n": int(n),
    }
