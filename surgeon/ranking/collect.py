"""Stage 2: stream images through the tower once and accumulate per-head statistics.

Results are cached on disk under a key of (model forward identity, image set, layers), so a second ranking
with another pool or judge skips the forward passes. Under torchrun each rank takes a contiguous shard and
one all-reduce merges them. Progress is checkpointed per shard every N batches, so an interrupted run
resumes without recomputing finished batches."""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from pathlib import Path

from surgeon.core.distributed import World, agree, all_reduce, shard, world
from surgeon.core.errors import CorruptInput, InvalidInput
from surgeon.core.paths import cache_dir
from surgeon.core.progress import progress_bar, stop_point
from surgeon.core.stats import HeadStats
from surgeon.inputs.images import ImageSet
from surgeon.model.decompose import decompose, vision_layout
from surgeon.model.hooks import check_supported, vision_tower
from surgeon.model.load import LoadedModel

DECOMPOSITION_VERSION = 1


def stats_key(loaded: LoadedModel, images: ImageSet, layers: tuple[int, ...]) -> str:
    payload = {
        "v": DECOMPOSITION_VERSION,
        "model": loaded.forward_identity,  # weights + architecture config + preprocessing + precision
        "images": images.identity,
        "layers": list(layers),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def empty_stats(loaded: LoadedModel, layers: tuple[int, ...]) -> HeadStats:
    visual = vision_tower(loaded.model)
    check_supported(visual)
    _, heads = vision_layout(visual)
    if len({heads[i] for i in layers}) != 1:
        raise InvalidInput("layers with different head counts cannot be analysed together")
    return HeadStats.empty(layers, heads[layers[0]], loaded.embed_dim, device=loaded.device)


def accumulate(
    loaded: LoadedModel,
    images: ImageSet,
    layers: tuple[int, ...],
    batch_size: int,
    quiet: bool = False,
    start: int = 0,
    stop: int | None = None,
    stats: HeadStats | None = None,
    on_chunk=None,
    chunk_batches: int | None = None,
) -> HeadStats:
    """Add images [start, stop) to `stats` (new when None). With `chunk_batches`, `on_chunk(stats, next_index)`
    runs after every that many batches (checkpointing)."""
    visual = vision_tower(loaded.model)
    stats = stats if stats is not None else empty_stats(loaded, layers)
    stop = images.count if stop is None else stop
    chunk = (chunk_batches or 0) * batch_size or (stop - start)
    with progress_bar("head statistics", stop - start, quiet) as advance:
        for chunk_start in range(start, stop, max(chunk, 1)):
            chunk_stop = min(chunk_start + chunk, stop)
            done = chunk_start
            for batch in images.batches(loaded.preprocess, batch_size, chunk_start, chunk_stop):
                stop_point()
                stats.update(decompose(visual, batch.to(loaded.device), layers).heads)
                advance(len(batch))  # per batch: a bar that moved once per checkpoint chunk looked stuck
                done += len(batch)
            advance(chunk_stop - done)  # unreadable images skipped in this chunk
            if on_chunk is not None:
                on_chunk(stats, chunk_stop)
    return stats


def _partial_path(key: str, w: World) -> Path:
    return cache_dir() / "partial" / f"{key}-rank{w.rank}of{w.size}.safetensors"


def _load_or_warn(path: Path) -> HeadStats | None:
    """A cache entry, or None (with a warning) when it is truncated or corrupt: it is then recomputed."""
    try:
        return HeadStats.load(path)
    except CorruptInput as err:
        warnings.warn(f"{err}; recomputing it", stacklevel=3)
        return None


def collect_stats(
    loaded: LoadedModel,
    images: ImageSet,
    layers: tuple[int, ...],
    batch_size: int,
    quiet: bool = False,
    use_cache: bool = True,
    checkpoint_every: int | None = None,
) -> tuple[HeadStats, bool]:
    """(statistics over the whole image set, whether they came from the cache). Every rank returns the total."""
    key = stats_key(loaded, images, layers)
    with _key_lock(key):  # a second job of the same key waits for the first and reads its cache entry
        return _collect_stats(loaded, images, layers, key, batch_size, quiet, use_cache, checkpoint_every)


_key_locks: dict[str, threading.Lock] = {}
_key_locks_guard = threading.Lock()


def _key_lock(key: str) -> threading.Lock:
    with _key_locks_guard:
        return _key_locks.setdefault(key, threading.Lock())


def _collect_stats(
    loaded: LoadedModel,
    images: ImageSet,
    layers: tuple[int, ...],
    key: str,
    batch_size: int,
    quiet: bool,
    use_cache: bool,
    checkpoint_every: int | None,
) -> tuple[HeadStats, bool]:
    w = world()
    path = cache_dir() / "stats" / f"{key}.safetensors"
    if use_cache and agree(path.is_file(), w):
        cached = _load_or_warn(path)
        if agree(cached is not None, w) and cached is not None:  # agreed: every rank has it
            return cached.to(loaded.device), True
    start, stop = shard(images.count, w, batch_size)
    if start == stop:
        warnings.warn(
            f"rank {w.rank} of {w.size} has no images: {images.count} image(s) in batches of {batch_size} "
            f"give fewer batches than ranks; lower --batch-size or start fewer processes",
            stacklevel=2,
        )
    partial = _partial_path(key, w)
    stats, resume_at = None, start
    saved = _load_or_warn(partial) if checkpoint_every and partial.is_file() else None
    if saved is not None:
        if saved.meta.get("shard") == [start, stop]:  # another batch size or world size cuts other shards
            stats, resume_at = saved.to(loaded.device), int(saved.meta.get("next", start))

    def checkpoint(current: HeadStats, next_index: int) -> None:
        current.save(partial, {"next": next_index, "shard": [start, stop]})

    stats = accumulate(
        loaded,
        images,
        layers,
        batch_size,
        quiet or not w.is_main,
        resume_at,
        stop,
        stats,
        checkpoint if checkpoint_every else None,
        checkpoint_every,
    )
    stats = all_reduce(stats, w)
    if stats.count < 2:
        raise InvalidInput(
            f"only {stats.count} readable image(s) in {images.description} ({len(images.skipped)} unreadable)",
            hint="ranking needs at least 2 readable images",
        )
    if (use_cache or path.is_file()) and w.is_main:  # --no-cache still replaces a stale or corrupt entry
        try:
            stats.save(path, {"images": images.identity, "model": loaded.identity})
        except OSError as err:  # the cache is an optimisation: the ranking still stands
            warnings.warn(f"could not cache the statistics in {path.parent}: {err}", stacklevel=2)
    partial.unlink(missing_ok=True)
    return stats, False
