"""A procedurally generated toy world with ground truth, for running and checking surgeon without real
CLIP weights or image data sets.

Every image shows one object on a plain background. Its factors are known: color, shape, size, position,
background and texture. A protected attribute, the "group", is drawn as a 3 px dark or light outline
around the object: visible in the image, never named in a caption, and in the training stream spuriously
correlated with the shape (most stars are outlined dark...), while it is independent of everything in
the held-out splits. Scenes are drawn seeded (surgeon.inputs.toy.scenes), rendered from precomputed masks
(surgeon.inputs.toy.render) and captioned (surgeon.inputs.toy.captions); the TextSpan pool and taxonomy are data files
(surgeon/data/pools/toy.json, surgeon/data/taxonomies/toy.json).

Splits: ``"train"`` (biased, captioned, infinite via :func:`iter_batches`), ``"test"`` (the fixed
held-out split used by the zero-shot tasks), ``"val"`` (unbiased, disjoint from test: for ranking heads,
mean ablation...). A split of n images is the first n images of that split's seeded stream, so a larger
request extends a smaller one.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from surgeon.core import limits
from surgeon.core.errors import InvalidInput
from surgeon.core.paths import PACKAGE_DATA, atomic_dir, read_json_object
from surgeon.inputs.toy.captions import caption_scenes, fix_articles, unique_named
from surgeon.inputs.toy.render import Renderer
from surgeon.inputs.toy.scenes import (
    FACTOR_CONCEPTS as FACTOR_CONCEPTS,  # the world's public names stay importable here
)
from surgeon.inputs.toy.scenes import FACTORS, Scenes, WorldConfig, draw_grouped, draw_scenes

#: bump whenever rendering or captions change, so caches keyed on toy images are invalidated
WORLD_VERSION = "3"

SPLITS = {"train": 0, "test": 1, "val": 2, "probe": 3}
_CHUNK = 512  # images per seeded chunk of a held-out split (so prefixes are stable)
DATA = PACKAGE_DATA


@dataclass
class ToyBatch:
    """Images (uint8, N x H x W x 3), factor labels (index into the config's vocabularies), groups."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    groups: np.ndarray
    captions: list[str] | None = None
    scenes: Scenes | None = field(default=None, repr=False)

    def drawn_captions(self) -> list[str]:
        """The captions of a batch drawn with them (training batches always are)."""
        if self.captions is None:
            raise ValueError("this batch was drawn without captions")
        return self.captions

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class ZeroShotTask:
    """A classification benchmark as a user would run on CIFAR: class names, templates, labelled images."""

    name: str
    classnames: list[str]
    templates: list[str]
    images: np.ndarray
    labels: np.ndarray


@dataclass
class BiasProbe:
    """Every scene rendered once per group (images[g * n_scenes + i] is scene i in group g).

    `queries` maps each shape to its neutral prompts (docs/METHOD.md §3: averaged into one query)."""

    images: np.ndarray
    groups: np.ndarray
    scene_ids: np.ndarray
    labels: dict[str, np.ndarray]
    group_names: tuple[str, ...]
    queries: dict[str, list[str]]
    #: shape -> index of the group that shape leans to in training
    majority_group: dict[str, int]


ZEROSHOT_TEMPLATES: dict[str, list[str]] = {
    "color": ["the {} object", "a photo of the {} shape", "a {} thing", "an image of the {} object"],
    "shape": ["a {}", "a photo of a {}", "a picture of a {}", "an image of a {}"],
    "size": ["a {} object", "a {} shape", "a photo of a {} thing", "the {} object"],
    "position": ["an object at the {}", "a shape at the {}", "a photo of an object at the {}", "the thing at the {}"],
    "background": [
        "an object on a {} background",
        "a {} background",
        "a photo of a shape on a {} background",
        "a thing against a {} background",
    ],
    "texture": ["a {} object", "a {} shape", "a photo of a {} thing", "the {} object"],
}
#: neutral query templates for the bias probe (the CCS paper's four)
NEUTRAL_TEMPLATES = ["a {}", "a photo of a {}", "a picture of a {}", "an image of a {}"]


class ToyWorld:
    """The seeded generator. Cheap to construct (masks are precomputed once)."""

    def __init__(self, config: WorldConfig | None = None):
        self.cfg = config or WorldConfig()
        self._renderer = Renderer(self.cfg)

    # ---- low level -----------------------------------------------------------------------------
    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.cfg.seed, *key]))

    def render(self, scenes: Scenes) -> np.ndarray:
        return self._renderer.render(scenes)

    def masks(self, scenes: Scenes) -> tuple[np.ndarray, np.ndarray]:
        """(object mask, group-marker mask), each N x H x W bool, of rendered scenes."""
        return self._renderer.masks(scenes)

    def _batch(self, sc: Scenes, captions: list[str] | None = None) -> ToyBatch:
        labels = {f: getattr(sc, f).copy() for f in FACTORS}
        return ToyBatch(self.render(sc), labels, sc.group.copy(), captions, sc)

    # ---- splits --------------------------------------------------------------------------------
    def iter_batches(self, batch_size: int, seed: int = 0, **stream) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Infinite biased training stream of (uint8 images N x H x W x 3, captions); `stream` takes the
        options of :meth:`iter_train`."""
        for b in self.iter_train(batch_size, seed, **stream):
            yield b.images, b.drawn_captions()

    def iter_train(
        self,
        batch_size: int,
        seed: int = 0,
        group_size: int = 1,
        changes: int = 1,
        captions: str = "unique",
        change_weights: tuple[float, ...] | None = None,
        caption_factors: tuple[str, ...] | None = None,
        extra: float = 0.1,
    ) -> Iterator[ToyBatch]:
        """Infinite biased training stream of whole batches (:class:`ToyBatch`: labels and groups too).

        group_size > 1 builds each batch from groups of that many scenes: a base scene and variants
        with `changes` factors changed (minimal pairs for changes=1), so that in-batch negatives
        differing in a single factor make the contrastive loss need every factor. Each scene's
        marginal distribution (uniform factors, group biased by shape) is unchanged.

        captions="unique" names, per scene, factors until no other scene of the batch fits the caption
        (exact contrastive targets); "free" names a random subset per WorldConfig.caption_mix.
        caption_factors restricts which factors captions may name (None: all); with "unique" captions
        each factor not needed is still named with probability `extra`."""
        if captions not in ("unique", "free"):
            raise InvalidInput(f"captions must be 'unique' or 'free', got {captions!r}")
        if batch_size < 1:
            raise InvalidInput(f"batch_size must be positive, got {batch_size}")
        if group_size < 1:
            raise InvalidInput(f"group_size must be positive, got {group_size}")
        if changes < 1:
            raise InvalidInput(f"changes must be positive, got {changes}")
        if change_weights is not None and (len(change_weights) != len(FACTORS) or min(change_weights) <= 0):
            raise InvalidInput(f"change_weights needs {len(FACTORS)} positive weights, got {change_weights}")
        allowed = None
        if caption_factors is not None:
            unknown = set(caption_factors) - set(FACTORS)
            if unknown or not caption_factors:
                raise InvalidInput(f"caption_factors must be a non-empty subset of {FACTORS}, got {caption_factors}")
            allowed = np.array([f in caption_factors for f in FACTORS])
        i = 0
        while True:
            rng = self._rng(SPLITS["train"], seed, i)
            if group_size == 1:
                sc = draw_scenes(self.cfg, batch_size, rng, biased=True)
            else:
                sc = draw_grouped(self.cfg, batch_size, rng, group_size, changes, change_weights)
            rate = self.cfg.outline_caption_rate
            named = unique_named(sc, rng, extra, allowed, rate) if captions == "unique" else None
            yield self._batch(sc, caption_scenes(self.cfg, sc, rng, named, allowed))
            i += 1

    def scenes(self, n: int, split: str = "test", seed: int = 0) -> Scenes:
        if split not in SPLITS or split == "probe":
            raise InvalidInput(f"unknown split {split!r}", hint="choose one of: train, test, val")
        if n < 0:
            raise InvalidInput(f"n must be non-negative, got {n}")
        parts = []
        for c in range(max(1, -(-n // _CHUNK))):
            rng = self._rng(SPLITS[split], seed, 1_000_000 + c)
            parts.append(draw_scenes(self.cfg, _CHUNK, rng, biased=split == "train"))
        return Scenes.concat(parts).take(slice(0, n))

    def sample(self, n: int, split: str = "test", seed: int = 0, captions: bool = False) -> ToyBatch:
        """n images of a split with labels; the first n of that split's stream (prefix-stable)."""
        sc = self.scenes(n, split, seed)
        caps = caption_scenes(self.cfg, sc, self._rng(SPLITS[split], seed, 2_000_000)) if captions else None
        return self._batch(sc, caps)

    def images(self, n: int, split: str = "val", seed: int = 0) -> np.ndarray:
        """Image source for ranking: n uint8 images (N x H x W x 3); apply the model's preprocessing."""
        return self.sample(n, split, seed).images

    def test_split(self) -> ToyBatch:
        """The fixed held-out split (cfg.test_size images, unbiased)."""
        return self.sample(self.cfg.test_size, "test", 0)

    def zeroshot_tasks(self, n: int | None = None, split: str = "test") -> list[ZeroShotTask]:
        """One classification task per factor on a held-out split (test: what validation reports on)."""
        b = self.sample(n or self.cfg.test_size, split, 0)
        return [
            ZeroShotTask(
                name=f,
                classnames=list(self.cfg.values(f)),
                templates=list(ZEROSHOT_TEMPLATES[f]),
                images=b.images,
                labels=b.labels[f],
            )
            for f in FACTORS
        ]

    def probe_scenes(self, n_scenes: int | None = None, seed: int = 0) -> Scenes:
        """The probe's scenes (before rendering each once per group)."""
        n = n_scenes or self.cfg.probe_scenes
        return draw_scenes(self.cfg, n, self._rng(SPLITS["probe"], seed), biased=False)

    def bias_probe(self, n_scenes: int | None = None, seed: int = 0) -> BiasProbe:
        """Counterfactual, balanced probe: each scene rendered once per group."""
        sc = self.probe_scenes(n_scenes, seed)
        n = len(sc)
        g = len(self.cfg.groups)
        parts = []
        for gi in range(g):
            p = sc.take(slice(None))
            p.group = np.full(n, gi, np.int64)
            parts.append(p)
        allsc = Scenes.concat(parts)
        b = self._batch(allsc)
        queries = {s: [fix_articles(t.format(s)) for t in NEUTRAL_TEMPLATES] for s in self.cfg.shapes}
        return BiasProbe(
            images=b.images,
            groups=allsc.group,
            scene_ids=np.tile(np.arange(n), g),
            labels=b.labels,
            group_names=self.cfg.groups,
            queries=queries,
            majority_group={s: self.cfg.majority_group(s) for s in self.cfg.shapes},
        )

    # ---- files ---------------------------------------------------------------------------------
    def write_png_folder(
        self, out_dir: str | os.PathLike, n: int, split: str = "test", seed: int = 0, force: bool = False
    ) -> Path:
        """Write n PNGs and labels.csv (path, every factor, group, caption) atomically."""
        from PIL import Image

        limits.count("n (images)", n, 1, limits.MAX_TOY_IMAGES)
        out = Path(out_dir).expanduser().absolute()
        with atomic_dir(out, force) as tmp:
            if split == "probe":
                pr = self.bias_probe(n_scenes=max(1, n // len(self.cfg.groups)), seed=seed)
                b = ToyBatch(pr.images, pr.labels, pr.groups)
            elif split == "train":
                it = self.iter_train(min(n, 256), seed)
                parts = [next(it) for _ in range(-(-n // 256))]
                b = ToyBatch(
                    np.concatenate([p.images for p in parts])[:n],
                    {f: np.concatenate([p.labels[f] for p in parts])[:n] for f in FACTORS},
                    np.concatenate([p.groups for p in parts])[:n],
                    [c for p in parts for c in p.drawn_captions()][:n],
                )
            else:
                b = self.sample(n, split, seed, captions=True)
            width = max(5, len(str(len(b) - 1)))
            with open(tmp / "labels.csv", "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["path", *FACTORS, "group", "caption"])
                for i in range(len(b)):
                    name = f"{i:0{width}d}.png"
                    Image.fromarray(b.images[i]).save(tmp / name)
                    row = [self.cfg.values(f)[b.labels[f][i]] for f in FACTORS]
                    cap = b.captions[i] if b.captions else ""
                    w.writerow([name, *row, self.cfg.groups[b.groups[i]], cap])
        return out


# --------------------------------------------------------------------------------------------------
# Module-level conveniences (default world)
# --------------------------------------------------------------------------------------------------
_DEFAULT: dict[WorldConfig, ToyWorld] = {}


def get_world(config: WorldConfig | None = None) -> ToyWorld:
    cfg = config or WorldConfig()
    if cfg not in _DEFAULT:
        _DEFAULT[cfg] = ToyWorld(cfg)
    return _DEFAULT[cfg]


def iter_batches(batch_size: int, seed: int = 0, config: WorldConfig | None = None, **stream):
    """The default (or `config`'s) world's training stream; `stream` takes ToyWorld.iter_train's options."""
    return get_world(config).iter_batches(batch_size, seed, **stream)


def toy_images(n: int, split: str = "val", seed: int = 0, config: WorldConfig | None = None) -> np.ndarray:
    return get_world(config).images(n, split, seed)


def zeroshot_tasks(config: WorldConfig | None = None, n: int | None = None, split: str = "test") -> list[ZeroShotTask]:
    return get_world(config).zeroshot_tasks(n, split)


def bias_probe(config: WorldConfig | None = None, n_scenes: int | None = None, seed: int = 0) -> BiasProbe:
    return get_world(config).bias_probe(n_scenes, seed)


def write_png_folder(
    out_dir, n: int, split: str = "test", seed: int = 0, force: bool = False, config: WorldConfig | None = None
) -> Path:
    return get_world(config).write_png_folder(out_dir, n, split, seed, force)


# --------------------------------------------------------------------------------------------------
# TextSpan pool and taxonomy (data files)
# --------------------------------------------------------------------------------------------------


@cache
def _pool_by_concept() -> dict[str, list[str]]:
    """concept -> the pool's lines written for it ("distractors": lines that name no factor)."""
    return read_json_object(DATA / "pools" / "toy.json", "toy text pool")


def toy_taxonomy() -> dict:
    """The taxonomy (JudgeContext format) whose concepts are the toy world's factors."""
    return read_json_object(DATA / "taxonomies" / "toy.json", "taxonomy")


def toy_pool() -> list[str]:
    """The TextSpan text pool: phrasings of every factor value (each factor ≥ 10% of the lines) and
    distractors that name no factor."""
    return [line for lines in _pool_by_concept().values() for line in lines]


def toy_pool_concepts() -> dict[str, str | None]:
    """Ground truth of the pool: line -> the concept it was written for (None for distractors)."""
    return {line: (None if c == "distractors" else c) for c, lines in _pool_by_concept().items() for line in lines}
