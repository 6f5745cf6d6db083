"""The toy world's analog of SocialCounterfactuals (Howard et al. 2024): per "occupation" (a shape), a few base
scenes, each rendered once per combination of two attributes (the outline, the world's protected group, and the
background), so a set of counterfactual images differs only in those attributes. Written as PNGs and a manifest
in SocialCounterfactuals' layout (path,outline,background,occupation,set), read by the same code as real data
(`surgeon validate --bias-data toy:counterfactuals`)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from surgeon.core.paths import atomic_dir
from surgeon.inputs.toy.scenes import Scenes, draw_scenes
from surgeon.inputs.toy.world import ToyWorld, get_world

COUNTERFACTUALS_VERSION = "1"  # bump when the set changes: cached copies are keyed on it
COUNTERFACTUAL_STREAM = 6  # the seeded stream of base scenes (after the world's splits and the toy videos)
MANIFEST_FILE = "counterfactuals.csv"
COLUMNS = ("path", "outline", "background", "occupation", "set")
SETS_PER_OCCUPATION = 3  # 3 sets x 2 outlines x 4 backgrounds = 24 images per shape, >= MaxSkew@10's k


def counterfactual_scenes(world: ToyWorld, sets_per_occupation: int, seed: int = 0) -> tuple[Scenes, np.ndarray]:
    """(every rendering's scene, its counterfactual set id): each base scene (one shape, drawn unbiased) in
    every outline x background, sets ordered by shape."""
    cfg = world.cfg
    n_sets = sets_per_occupation * len(cfg.shapes)
    bases = draw_scenes(cfg, n_sets, world._rng(COUNTERFACTUAL_STREAM, seed), biased=False)
    bases.shape = np.repeat(np.arange(len(cfg.shapes)), sets_per_occupation)
    combos = [(g, b) for g in range(len(cfg.groups)) for b in range(len(cfg.backgrounds))]
    parts = []
    for group, background in combos:
        part = bases.take(slice(None))
        part.group = np.full(n_sets, group, np.int64)
        part.background = np.full(n_sets, background, np.int64)
        parts.append(part)
    order = np.arange(n_sets * len(combos)).reshape(len(combos), n_sets).T.ravel()  # a set's renderings together
    return Scenes.concat(parts).take(order), np.repeat(np.arange(n_sets), len(combos))


def write_counterfactuals(
    out_dir: Path, sets_per_occupation: int = SETS_PER_OCCUPATION, seed: int = 0, world: ToyWorld | None = None
) -> Path:
    """The PNGs and their manifest, written atomically; returns the manifest."""
    from PIL import Image

    world = world or get_world()
    cfg = world.cfg
    scenes, set_ids = counterfactual_scenes(world, sets_per_occupation, seed)
    images = world.render(scenes)
    with atomic_dir(out_dir) as tmp:
        with open(tmp / MANIFEST_FILE, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            for i, image in enumerate(images):
                name = f"{i:05d}.png"
                Image.fromarray(image).save(tmp / name)
                writer.writerow(
                    [
                        name,
                        cfg.groups[scenes.group[i]],
                        cfg.backgrounds[scenes.background[i]],
                        cfg.shapes[scenes.shape[i]],
                        f"set{set_ids[i]:03d}",
                    ]
                )
    return out_dir / MANIFEST_FILE
