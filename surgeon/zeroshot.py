"""Zero-shot classification as in CLIP / clip_benchmark (docs/METHOD.md §4).

Class embedding = normalised mean of the normalised embeddings of every template filled with the class
name; logits = 100 * image_emb . class_emb; metrics top-1, top-5 and mean per-class recall. Works for any
open_clip model (anything with ``encode_image`` / ``encode_text``) and tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from surgeon.errors import InvalidInput
from surgeon.templates import check_templates, fill

ImageInput = torch.Tensor | np.ndarray | Iterable


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def _batches(images: ImageInput, labels, preprocess, batch_size: int):
    """Yield (image tensor batch, label tensor batch or None)."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InvalidInput(f"expected N x H x W x 3 images, got shape {images.shape}")
        if preprocess is None:
            raise InvalidInput("numpy images need a preprocess transform (the model's)")
        from PIL import Image

        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            x = torch.stack([preprocess(Image.fromarray(im)) for im in chunk])
            y = None if labels is None else torch.as_tensor(labels[i : i + batch_size])
            yield x, y
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise InvalidInput(f"expected an N x C x H x W tensor, got shape {tuple(images.shape)}")
        for i in range(0, len(images), batch_size):
            y = None if labels is None else torch.as_tensor(labels[i : i + batch_size])
            yield images[i : i + batch_size], y
    else:  # a loader of (images, labels) batches
        for batch in images:
            if isinstance(batch, (tuple, list)):
                x, y = batch[0], batch[1]
            else:
                x, y = batch, None
            if preprocess is not None and not isinstance(x, torch.Tensor):
                from PIL import Image

                x = torch.stack([preprocess(Image.fromarray(np.asarray(im))) for im in x])
            yield x, (None if y is None else torch.as_tensor(y))


@torch.no_grad()
def encode_images(
    model, images: ImageInput, preprocess=None, device=None, batch_size: int = 256, labels=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """L2-normalised image embeddings (N x D, on CPU) and the labels met along the way, if any."""
    dev = _device_of(model, device)
    feats, ys = [], []
    for x, y in _batches(images, labels, preprocess, batch_size):
        f = model.encode_image(x.to(dev, non_blocking=True)).float()
        feats.append(F.normalize(f, dim=-1).cpu())
        if y is not None:
            ys.append(y.cpu())
    if not feats:
        raise InvalidInput("no images to evaluate")
    return torch.cat(feats), (torch.cat(ys) if ys else None)


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


@torch.no_grad()
def evaluate(
    model,
    tokenizer: Callable,
    images: ImageInput,
    labels,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    preprocess=None,
    device=None,
    batch_size: int = 256,
    classifier: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
) -> dict:
    """Zero-shot top-1 / top-5 / mean per-class recall of `model` on labelled images.

    images: an N x C x H x W tensor already preprocessed, N x H x W x 3 uint8 numpy images with
    `preprocess` (the model's transform), or a loader of (images, labels) batches (then `labels` may
    be None). `classifier` / `image_features` reuse earlier results (e.g. several tasks, same images).
    """
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        if classifier is None:
            classifier = build_classifier(model, tokenizer, classnames, templates, device, batch_size)
        if image_features is None:
            image_features, seen = encode_images(model, images, preprocess, device, batch_size, labels)
            if labels is None:
                labels = seen
        if labels is None:
            raise InvalidInput("no labels given")
        logits = 100.0 * image_features.float() @ classifier.float().cpu().T
        return metrics_from_logits(logits, torch.as_tensor(np.asarray(labels)))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
