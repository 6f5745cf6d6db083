"""Toy retrieval sets: captioned images (image <-> text) and short captioned videos written as real MP4
files (text -> video), drawn deterministically from the toy world.

A toy video is one scene whose object glides from one position to another over its frames (rendered at
whole-pixel offsets between the two positions' centres); every third video's object also changes colour
half-way. Its first caption (the paper's query) names the scene's constant factors and what happens:
"a small red striped circle on a gray background, moving from the left to the right"; a second caption is
one of the world's free captions of the first frame."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from surgeon.core import limits
from surgeon.core.paths import atomic_dir
from surgeon.inputs.toy.captions import caption_scenes
from surgeon.inputs.toy.scenes import FACTORS, Scenes, draw_scenes
from surgeon.inputs.toy.world import SPLITS, ToyWorld, get_world

Encoder = Callable[[Path, np.ndarray, int], None]  # (path, frames, fps)
VIDEOS_VERSION = "1"  # bump when the videos or their captions change: cached copies are keyed on it
VIDEO_STREAM = 5  # the seeded stream of toy videos (after the world's splits)
FRAMES_PER_VIDEO = 24  # 3 s at 8 fps
FPS = 8
CAPTION_FILE = "captions.csv"


def caption_set(n: int, seed: int = 0, world: ToyWorld | None = None) -> tuple[np.ndarray, list[list[str]]]:
    """n held-out test images, two captions each: the world's free caption and a second, independent one."""
    limits.count("n (toy images)", n, 1, limits.MAX_TOY_IMAGES)
    world = world or get_world()
    batch = world.sample(n, "test", seed, captions=True)
    assert batch.scenes is not None  # sample keeps its scenes
    second = caption_scenes(world.cfg, batch.scenes, world._rng(SPLITS["test"], seed, 3_000_000))
    return batch.images, [[a, b] for a, b in zip(batch.drawn_captions(), second, strict=True)]


def _video_scenes(world: ToyWorld, base: Scenes, index: int, rng: np.random.Generator) -> tuple[Scenes, list[str]]:
    """One video's per-frame scenes (`base`, one scene, moving and changing) and its two captions."""
    cfg = world.cfg
    start, end = rng.choice(len(cfg.positions), 2, replace=False)
    frames = base.take(np.zeros(FRAMES_PER_VIDEO, dtype=np.int64))
    frames.position[:] = start
    shift = (world._renderer.centres[end] - world._renderer.centres[start])[None, :]
    offsets = np.rint(shift * np.linspace(0.0, 1.0, FRAMES_PER_VIDEO)[:, None]).astype(np.int64)
    frames.dx, frames.dy = frames.dx + offsets[:, 0], frames.dy + offsets[:, 1]
    constant = np.array([f != "position" for f in FACTORS])
    (described,) = caption_scenes(cfg, base, rng, named=constant[None, :].copy())
    happens = f"moving from the {cfg.positions[start]} to the {cfg.positions[end]}"
    if index % 3 == 0:
        new_color = (int(base.color[0]) + 1 + int(rng.integers(len(cfg.colors) - 1))) % len(cfg.colors)
        frames.color[FRAMES_PER_VIDEO // 2 :] = new_color
        happens += f" and turning {cfg.colors[new_color]}"
    (free,) = caption_scenes(cfg, frames.take([0]), rng)  # the first frame's factors, its position included
    return frames, [f"{described}, {happens}", free]


def write_videos(
    out_dir: Path, n: int, encode: Encoder, seed: int = 0, force: bool = False, world: ToyWorld | None = None
) -> Path:
    """n toy videos (NNNNN.mp4, written by `encode`: surgeon.inputs.video.write_video, handed in so that the toy world
    needs only numpy and PIL) and captions.csv (path,caption; the query first), written atomically (n is bounded
    by the caller: defaults.MAX_TOY_VIDEOS)."""
    world = world or get_world()
    rng = world._rng(VIDEO_STREAM, seed)
    bases = draw_scenes(world.cfg, n, rng, biased=False)  # unbiased, as the held-out splits
    with atomic_dir(out_dir, force) as tmp:
        rows = []
        for i in range(n):
            frames, captions = _video_scenes(world, bases.take([i]), i, rng)
            name = f"{i:05d}.mp4"
            encode(tmp / name, world.render(frames), FPS)
            rows += [(name, caption) for caption in captions]
        with open(tmp / CAPTION_FILE, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "caption"])
            writer.writerows(rows)
    return out_dir / CAPTION_FILE
