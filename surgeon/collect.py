"""Stage 2: stream images through the tower once and accumulate per-head statistics, cached on disk
under a key of (weights, image set, preprocessing, layers), so a second ranking with another pool or
judge skips the forward passes."""

from __future__ import annotations

import hashlib
import json

from surgeon.decompose import check_supported, decompose, vision_layout
from surgeon.errors import InvalidInput
from surgeon.images import ImageSet
from surgeon.load import LoadedModel
from surgeon.paths import cache_dir
from surgeon.progress import progress_bar
from surgeon.stats import HeadStats

DECOMPOSITION_VERSION = 1


def stats_key(loaded: LoadedModel, images: ImageSet, layers: tuple[int, ...]) -> str:
    payload = {
        "v": DECOMPOSITION_VERSION,
        "weights": loaded.weights_hash,
        "images": images.identity,
        "preprocess": loaded.preprocess_cfg,
        "layers": list(layers),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def accumulate(
    loaded: LoadedModel,
    images: ImageSet,
    layers: tuple[int, ...],
    batch_size: int = 64,
    quiet: bool = False,
    start: int = 0,
    stop: int | None = None,
) -> HeadStats:
    """Statistics of images [start, stop) — no caching; shards of one set merge into the whole."""
    visual = loaded.model.visual
    check_supported(visual)
    _, heads = vision_layout(visual)
    if len({heads[i] for i in layers}) != 1:
        raise InvalidInput("layers with different head counts cannot be analysed together")
    stats = HeadStats.empty(layers, heads[layers[0]], loaded.embed_dim, device=loaded.device)
    stop = images.count if stop is None else stop
    with progress_bar("head statistics", stop - start, quiet) as advance:
        for batch in images.batches(loaded.preprocess, batch_size, start, stop):
            stats.update(decompose(visual, batch.to(loaded.device), layers).heads)
            advance(batch.shape[0])
    return stats


def collect_stats(
    loaded: LoadedModel,
    images: ImageSet,
    layers: tuple[int, ...],
    batch_size: int = 64,
    quiet: bool = False,
    use_cache: bool = True,
) -> tuple[HeadStats, bool]:
    """(statistics, whether they came from the cache)."""
    path = cache_dir() / "stats" / f"{stats_key(loaded, images, layers)}.safetensors"
    if use_cache and path.is_file():
        return HeadStats.load(path), True
    stats = accumulate(loaded, images, layers, batch_size, quiet)
    if stats.count < 2:
        raise InvalidInput(
            f"only {stats.count} readable image(s) in {images.description} ({len(images.skipped)} unreadable)",
            hint="ranking needs at least 2 readable images",
        )
    if use_cache:
        stats.save(path, {"images": images.identity, "model": loaded.identity})
    return stats, False
