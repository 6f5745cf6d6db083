"""What a toy image shows: the vocabularies and palettes, the world's configuration, and scenes (factor
indices and nuisance parameters) drawn from seeded generators, before any pixel is rendered."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from surgeon.core.errors import InvalidInput

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 185, 60),
    "blue": (45, 95, 235),
    "yellow": (240, 215, 30),
    "purple": (150, 55, 205),
    "orange": (250, 140, 25),
}
#: muted, similar-brightness backgrounds: a loud background (most of the pixels) dominates a random-init
#: ViT's embedding and kept the contrastive training from learning position (see NOTES.md)
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "gray": (120, 120, 120),
    "teal": (75, 128, 128),
    "brown": (128, 98, 72),
    "pink": (168, 124, 144),
}
GROUP_RGB: dict[str, tuple[int, int, int]] = {"dark": (15, 15, 15), "light": (250, 250, 250)}
KNOWN_SHAPES = ("circle", "square", "triangle", "cross", "star", "heart", "diamond", "moon")
KNOWN_TEXTURES = ("solid", "striped", "dotted")
KNOWN_SIZES = ("small", "large")
KNOWN_POSITIONS = ("left", "right", "top", "bottom")

#: factor name (singular, as in labels.csv) -> concept name (plural, as in the taxonomy and judges)
FACTOR_CONCEPTS: dict[str, str] = {
    "color": "colors",
    "shape": "shapes",
    "size": "sizes",
    "position": "positions",
    "background": "backgrounds",
    "texture": "textures",
}
FACTORS: tuple[str, ...] = tuple(FACTOR_CONCEPTS)


@dataclass(frozen=True)
class WorldConfig:
    """What the world looks like. Vocabularies are chosen from the known palettes above."""

    image_size: int = 48
    seed: int = 0
    colors: tuple[str, ...] = tuple(COLOR_RGB)
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "heart")
    sizes: tuple[str, ...] = KNOWN_SIZES
    positions: tuple[str, ...] = KNOWN_POSITIONS
    backgrounds: tuple[str, ...] = tuple(BACKGROUND_RGB)
    textures: tuple[str, ...] = KNOWN_TEXTURES
    groups: tuple[str, ...] = ("dark", "light")
    #: in the training stream P(majority group | shape); shapes at even index lean to groups[0], odd
    #: ones to groups[1]. 0.5 means no bias. Held-out splits are always unbiased.
    bias_strength: float = 0.95
    #: object side as a fraction of the image side, per size value
    size_fractions: tuple[float, ...] = (0.3, 0.5)
    #: width of the group marker (the outline); 2 px was mostly ignored once shapes were learned (NOTES.md)
    outline_px: int = 3
    test_size: int = 2000
    probe_scenes: int = 600
    #: per-image uniform color jitter (per channel, in 0..255 units) of object and background
    color_jitter: int = 12
    #: "free" captions (held-out splits, captions="free" streams): P(every factor named), P(one
    #: factor named); the rest name 2 or 3 factors
    caption_mix: tuple[float, float] = (0.35, 0.2)
    #: brightness of the stripes / dots relative to the object's colour
    pattern_shade: float = 0.35
    #: object centre jitter (± fraction of the image side) and object side jitter (± pixels)
    position_jitter: float = 0.0
    size_jitter: int = 0
    #: captions naming the outline drawn ("... with a dark outline"), so the text tower learns the word and
    #: TextSpan can label a head `outlines` (issue 24 item 4): free captions name it in this share; unique
    #: (training) captions take it as a candidate in this share (captions.unique_named). The shape-outline
    #: correlation itself stays in the images only. 0 keeps every caption as it was
    outline_caption_rate: float = 0.0

    def __post_init__(self):
        if not 24 <= self.image_size <= 128:
            raise InvalidInput(f"image_size must be in 24..128, got {self.image_size}")
        checks = [
            ("colors", self.colors, COLOR_RGB),
            ("shapes", self.shapes, KNOWN_SHAPES),
            ("sizes", self.sizes, KNOWN_SIZES),
            ("positions", self.positions, KNOWN_POSITIONS),
            ("backgrounds", self.backgrounds, BACKGROUND_RGB),
            ("textures", self.textures, KNOWN_TEXTURES),
            ("groups", self.groups, GROUP_RGB),
        ]
        for name, values, known in checks:
            if len(values) < 2 or len(set(values)) != len(values) or any(v not in known for v in values):
                raise InvalidInput(f"{name} must be ≥ 2 distinct values from {', '.join(known)}; got {values}")
        if len(self.size_fractions) != len(self.sizes):
            raise InvalidInput("size_fractions needs one fraction per size")
        if len(self.caption_mix) != 2 or min(self.caption_mix) < 0 or sum(self.caption_mix) > 1:
            raise InvalidInput(f"caption_mix must be two probabilities summing to ≤ 1, got {self.caption_mix}")
        if not 0.0 <= self.outline_caption_rate <= 1.0:
            raise InvalidInput(f"outline_caption_rate must be in [0, 1], got {self.outline_caption_rate}")
        if not 0.0 <= self.bias_strength <= 1.0:
            raise InvalidInput(f"bias_strength must be in [0, 1], got {self.bias_strength}")
        if self.test_size < 1 or self.probe_scenes < 1:
            raise InvalidInput("test_size and probe_scenes must be positive")

    def values(self, factor: str) -> tuple[str, ...]:
        return getattr(self, FACTOR_CONCEPTS[factor])

    def majority_group(self, shape: str) -> int:
        """Index of the group that a shape leans to in the training stream."""
        return self.shapes.index(shape) % 2

    def p_group(self, shape: str) -> np.ndarray:
        """Training-stream distribution over groups given the shape (two groups)."""
        p = np.full(len(self.groups), (1.0 - self.bias_strength) / (len(self.groups) - 1))
        p[self.majority_group(shape)] = self.bias_strength
        return p


@dataclass
class Scenes:
    """Factor indices (into the config's vocabularies) and nuisance parameters of n scenes."""

    color: np.ndarray
    shape: np.ndarray
    size: np.ndarray
    position: np.ndarray
    background: np.ndarray
    texture: np.ndarray
    group: np.ndarray
    variant: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    obj_jitter: np.ndarray
    bg_jitter: np.ndarray

    def __len__(self) -> int:
        return len(self.color)

    def take(self, idx) -> Scenes:
        return Scenes(**{k: v[idx] for k, v in self.__dict__.items()})

    @staticmethod
    def concat(parts: list[Scenes]) -> Scenes:
        return Scenes(**{k: np.concatenate([p.__dict__[k] for p in parts]) for k in parts[0].__dict__})


def draw_scenes(cfg: WorldConfig, n: int, rng: np.random.Generator, biased: bool) -> Scenes:
    def pick(k):
        return rng.integers(0, k, n).astype(np.int64)

    shape = pick(len(cfg.shapes))
    if biased and len(cfg.groups) == 2:
        lean = shape % 2  # majority group per shape
        flip = rng.random(n) >= cfg.bias_strength
        group = np.where(flip, 1 - lean, lean)
    else:
        group = pick(len(cfg.groups))
    j = int(round(cfg.position_jitter * cfg.image_size))
    return Scenes(
        color=pick(len(cfg.colors)),
        shape=shape,
        size=pick(len(cfg.sizes)),
        position=pick(len(cfg.positions)),
        background=pick(len(cfg.backgrounds)),
        texture=pick(len(cfg.textures)),
        group=group.astype(np.int64),
        variant=pick(2 * cfg.size_jitter + 1),
        dx=rng.integers(-j, j + 1, n),
        dy=rng.integers(-j, j + 1, n),
        obj_jitter=rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, (n, 3)).astype(np.float32),
        bg_jitter=rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, (n, 3)).astype(np.float32),
    )


def draw_grouped(
    cfg: WorldConfig,
    n: int,
    rng: np.random.Generator,
    group_size: int,
    changes: int,
    weights: tuple[float, ...] | None = None,
) -> Scenes:
    """Biased scenes in groups of `group_size`: a base scene and variants of it, each with `changes`
    factors changed to another value (minimal pairs when changes == 1), chosen with probability
    proportional to `weights` (one per factor, in FACTORS order; default uniform). Each scene's
    factors stay uniform; the group attribute follows the final shape with the configured bias."""
    n_groups = -(-n // group_size)
    gid = np.repeat(np.arange(n_groups), group_size)[:n]
    is_base = np.r_[True, gid[1:] != gid[:-1]]
    sc = draw_scenes(cfg, n_groups, rng, biased=False).take(gid)
    fresh = draw_scenes(cfg, n, rng, biased=False)
    for name in ("variant", "dx", "dy", "obj_jitter", "bg_jitter"):
        setattr(sc, name, getattr(fresh, name))
    k = len(FACTORS)
    w = np.ones(k) if weights is None else np.asarray(weights, float)
    # weighted choice of the changed factors without replacement (Efraimidis-Spirakis keys)
    keys = rng.random((n, k)) ** (1.0 / w)
    changed = np.argsort(-keys, axis=1)[:, : min(changes, k)]
    for fi, f in enumerate(FACTORS):
        m = (changed == fi).any(axis=1) & ~is_base
        nv = len(cfg.values(f))
        vals = getattr(sc, f).copy()
        vals[m] = (vals[m] + rng.integers(1, nv, m.sum())) % nv  # another value, uniformly
        setattr(sc, f, vals)
    if len(cfg.groups) == 2:
        # the group follows the final shape with the configured bias; a variant whose shape was kept
        # keeps its base's group (same marginals), so within a group the marker only changes with the
        # shape, as it does in the data at large
        lean = sc.shape % 2
        drawn = np.where(rng.random(n) >= cfg.bias_strength, 1 - lean, lean).astype(np.int64)
        base_of = np.flatnonzero(is_base)[gid]
        same_shape = sc.shape == sc.shape[base_of]
        sc.group = np.where(same_shape & ~is_base, drawn[base_of], drawn)
    return sc
