"""The embedded defaults: the one place a stage asks for the toy world's data (images, text pool, zero-shot
tasks, bias probe) when the user names none; when it may is surgeon.core.fallback's rule. The world is imported
only when asked, so stages that never fall back to it do not load it; it needs only numpy and PIL, so the
torch-free runtime asks here too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from surgeon.core import limits
from surgeon.core.errors import PreconditionFailed

if TYPE_CHECKING:
    import numpy as np

    from surgeon.inputs.toy.world import BiasProbe, ZeroShotTask


def toy_images(n: int, split: str = "val", seed: int = 0) -> np.ndarray:
    """n rendered images (uint8, N x H x W x 3) of a split."""
    from surgeon.inputs.toy import world

    return world.toy_images(n, split=split, seed=seed)


def toy_pool() -> tuple[list[str], dict]:
    """The toy text pool and its taxonomy."""
    from surgeon.inputs.toy import world

    return world.toy_pool(), world.toy_taxonomy()


def toy_zeroshot_tasks(n: int | None = None, split: str = "test") -> list[ZeroShotTask]:
    from surgeon.inputs.toy import world

    return world.zeroshot_tasks(n=n, split=split)


def toy_bias_probe(n_scenes: int | None = None, seed: int = 0) -> BiasProbe:
    from surgeon.inputs.toy import world

    return world.bias_probe(n_scenes=n_scenes, seed=seed)


def toy_shapes_sample(n: int) -> tuple[np.ndarray, list[int], list[str]]:
    """(n held-out test images, each one's shape index, the shape names): images classified by shape."""
    from surgeon.inputs.toy.world import get_world

    world = get_world()
    batch = world.sample(n, "test")
    return batch.images, list(batch.labels["shape"]), list(world.cfg.shapes)


MAX_TOY_VIDEOS = 2000  # written as files into the cache: ~4 kB each


def toy_caption_set(n: int, seed: int = 0) -> tuple[np.ndarray, list[list[str]]]:
    """n held-out images with two captions each (image <-> text retrieval)."""
    from surgeon.inputs.toy import videos

    return videos.caption_set(n, seed)


def toy_videos(n: int, encode: Callable[[Path, np.ndarray, int], None], seed: int = 0) -> Path:
    """The manifest (path,caption) of n toy videos, written once into the cache (`toy-videos/`) as MP4 files by
    `encode` (surgeon.inputs.video.write_video)."""
    from surgeon.core.paths import cache_dir
    from surgeon.inputs.toy import videos
    from surgeon.inputs.toy.world import WORLD_VERSION

    limits.count("n (toy videos)", n, 1, MAX_TOY_VIDEOS)
    folder = cache_dir() / "toy-videos" / f"world{WORLD_VERSION}-v{videos.VIDEOS_VERSION}-n{n}-seed{seed}"
    manifest = folder / videos.CAPTION_FILE
    if not manifest.is_file():
        try:
            videos.write_videos(folder, n, encode, seed)
        except PreconditionFailed:  # another process wrote it meanwhile
            pass
    return manifest


def toy_counterfactuals(seed: int = 0) -> Path:
    """The manifest (path,outline,background,occupation,set) of the toy world's SocialCounterfactuals analog,
    written once into the cache (`toy-counterfactuals/`) as PNG files."""
    from surgeon.core.paths import cache_dir
    from surgeon.inputs.toy import counterfactuals
    from surgeon.inputs.toy.world import WORLD_VERSION

    version = f"world{WORLD_VERSION}-v{counterfactuals.COUNTERFACTUALS_VERSION}-seed{seed}"
    manifest = cache_dir() / "toy-counterfactuals" / version / counterfactuals.MANIFEST_FILE
    if not manifest.is_file():
        try:
            counterfactuals.write_counterfactuals(manifest.parent, seed=seed)
        except PreconditionFailed:  # another process wrote it meanwhile
            pass
    return manifest
