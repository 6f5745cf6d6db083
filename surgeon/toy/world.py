"""A procedurally generated toy world with ground truth, for running and checking surgeon without real
CLIP weights or image data sets.

Every image shows one object on a plain background. Its factors are known: color, shape, size, position,
background and texture. A protected attribute, the "group", is drawn as a 3 px dark or light outline
around the object: visible in the image, never named in a caption, and in the training stream spuriously
correlated with the shape (most stars are outlined dark...), while it is independent of everything in
the held-out splits. Everything is seeded and rendered from precomputed numpy masks (no files, no PIL
drawing per image), fast enough to feed a training loop on one core.

Splits: ``"train"`` (biased, captioned, infinite via :func:`iter_batches`), ``"test"`` (the fixed
held-out split used by the zero-shot tasks), ``"val"`` (unbiased, disjoint from test: for ranking heads,
mean ablation...). A split of n images is the first n images of that split's seeded stream, so a larger
request extends a smaller one.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from surgeon.errors import InvalidInput
from surgeon.paths import atomic_dir

# --------------------------------------------------------------------------------------------------
# Vocabularies and palettes
# --------------------------------------------------------------------------------------------------

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

#: bump whenever rendering or captions change, so caches keyed on toy images are invalidated
WORLD_VERSION = "3"

SPLITS = {"train": 0, "test": 1, "val": 2, "probe": 3}
_CHUNK = 512  # images per seeded chunk of a held-out split (so prefixes are stable)


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


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def _shape_alpha(shape: str, side: int, ss: int = 8) -> np.ndarray:
    """Anti-aliased coverage (side x side, float32 in [0, 1]) of a shape filling a side x side box."""
    n = side * ss
    c = (np.arange(n) + 0.5) / n * 2.0 - 1.0  # [-1, 1], y grows downwards
    u, v = np.meshgrid(c, c)
    if shape == "circle":
        m = u**2 + v**2 <= 1.0
    elif shape == "square":
        m = (np.abs(u) <= 0.86) & (np.abs(v) <= 0.86)
    elif shape == "diamond":
        m = np.abs(u) + np.abs(v) <= 1.0
    elif shape == "triangle":
        m = (v <= 0.85) & (np.abs(u) <= (v + 1.0) / 1.85)
    elif shape == "cross":
        a = 0.34
        m = ((np.abs(u) <= a) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= a) & (np.abs(u) <= 1.0))
    elif shape == "star":
        r = np.hypot(u, v)
        th = np.arctan2(u, -v)  # angle from "up", clockwise
        k = 2 * np.pi / 5
        phi = np.abs(((th + k / 2) % k) - k / 2)  # angle to the nearest point, in [0, k/2]
        ro, ri = 1.0, 0.42
        # the edge from the point (ro, 0) to the inner corner (ri, k/2), in polar form
        p0 = np.array([0.0, ro])
        p1 = np.array([ri * np.sin(k / 2), ri * np.cos(k / 2)])
        # inside when the point is on the centre's side of the line p0-p1
        x, y = r * np.sin(phi), r * np.cos(phi)
        cross = (p1[0] - p0[0]) * (y - p0[1]) - (p1[1] - p0[1]) * (x - p0[0])
        m = cross <= 0
        m |= r <= ri * 0.999
    elif shape == "heart":
        x = u * 1.25
        y = -v * 1.25 + 0.15
        m = (x**2 + y**2 - 1.0) ** 3 - x**2 * y**3 <= 0.0
    elif shape == "moon":
        m = (u**2 + v**2 <= 1.0) & ((u - 0.45) ** 2 + (v + 0.15) ** 2 > 0.62)
    else:  # pragma: no cover - guarded by WorldConfig
        raise InvalidInput(f"unknown shape {shape!r}")
    return m.reshape(side, ss, side, ss).mean(axis=(1, 3)).astype(np.float32)


def _dilate(a: np.ndarray, r: int) -> np.ndarray:
    """Grey-level dilation by a (2r+1)^2 square (max filter), same shape."""
    out = a.copy()
    h, w = a.shape
    p = np.pad(a, r)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            np.maximum(out, p[r + dy : r + dy + h, r + dx : r + dx + w], out=out)
    return out


def _texture_mask(texture: str, side: int) -> np.ndarray:
    """Where the object's darker secondary shade goes (side x side bool)."""
    y, x = np.mgrid[0:side, 0:side]
    if texture == "solid":
        return np.zeros((side, side), bool)
    if texture == "striped":
        return ((x + y) // 2) % 2 == 1
    if texture == "dotted":
        return ((x % 4) < 2) & ((y % 4) < 2)
    raise InvalidInput(f"unknown texture {texture!r}")  # pragma: no cover


@dataclass
class _Sprite:
    alpha: np.ndarray  # (B, B) object coverage
    ring: np.ndarray  # (B, B) outline coverage, alpha + ring <= 1
    box: int  # B


class _Renderer:
    """Precomputed sprites per (shape, size, size variant) and texture masks per box side."""

    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        s = cfg.image_size
        t = cfg.outline_px
        self.variants = tuple(range(-cfg.size_jitter, cfg.size_jitter + 1))  # object side jitter, px
        self.sprites: dict[tuple[int, int, int], _Sprite] = {}
        for si, shape in enumerate(cfg.shapes):
            for zi, frac in enumerate(cfg.size_fractions):
                for vi, dv in enumerate(self.variants):
                    side = max(5, int(round(frac * s)) + dv)
                    box = side + 2 * t + 2
                    alpha = np.zeros((box, box), np.float32)
                    o = t + 1
                    alpha[o : o + side, o : o + side] = _shape_alpha(shape, side)
                    ring = np.clip(_dilate(alpha, t) - alpha, 0.0, 1.0) if t > 0 else np.zeros_like(alpha)
                    self.sprites[si, zi, vi] = _Sprite(alpha, ring, box)
        self.textures: dict[tuple[int, int], np.ndarray] = {}
        for sp in self.sprites.values():
            for ti, tex in enumerate(cfg.textures):
                self.textures[ti, sp.box] = _texture_mask(tex, sp.box)
        self.color_rgb = np.array([COLOR_RGB[c] for c in cfg.colors], np.float32)
        self.bg_rgb = np.array([BACKGROUND_RGB[b] for b in cfg.backgrounds], np.float32)
        self.group_rgb = np.array([GROUP_RGB[g] for g in cfg.groups], np.float32)
        # object centres per position (x, y), as fractions of the image side
        centres = {"left": (0.29, 0.5), "right": (0.71, 0.5), "top": (0.5, 0.29), "bottom": (0.5, 0.71)}
        self.centres = np.array([centres[p] for p in cfg.positions], np.float32) * s

    def _place(self, sc: Scenes, i: int) -> tuple[_Sprite, int, int]:
        s = self.cfg.image_size
        sp = self.sprites[sc.shape[i], sc.size[i], sc.variant[i]]
        cx, cy = self.centres[sc.position[i]]
        x0 = int(np.clip(round(cx - sp.box / 2 + sc.dx[i]), 0, s - sp.box))
        y0 = int(np.clip(round(cy - sp.box / 2 + sc.dy[i]), 0, s - sp.box))
        return sp, x0, y0

    def masks(self, sc: Scenes) -> tuple[np.ndarray, np.ndarray]:
        """Per scene, where the object (alpha > 0) and the group marker (outline > 0) are: 2 x (N, H, W) bool."""
        s = self.cfg.image_size
        obj = np.zeros((len(sc), s, s), bool)
        mark = np.zeros((len(sc), s, s), bool)
        for i in range(len(sc)):
            sp, x0, y0 = self._place(sc, i)
            b = sp.box
            obj[i, y0 : y0 + b, x0 : x0 + b] = sp.alpha > 0
            mark[i, y0 : y0 + b, x0 : x0 + b] = sp.ring > 0
        return obj, mark

    def render(self, sc: Scenes) -> np.ndarray:
        cfg = self.cfg
        n = len(sc)
        s = cfg.image_size
        bg = np.clip(self.bg_rgb[sc.background] + sc.bg_jitter, 0, 255)
        out = np.empty((n, s, s, 3), np.float32)
        out[:] = bg[:, None, None, :]
        col = np.clip(self.color_rgb[sc.color] + sc.obj_jitter, 0, 255)
        shade = col * cfg.pattern_shade
        outline = self.group_rgb[sc.group]
        for i in range(n):
            sp, x0, y0 = self._place(sc, i)
            b = sp.box
            tex = self.textures[sc.texture[i], b]
            obj = np.where(tex[:, :, None], shade[i], col[i])
            a = sp.alpha[:, :, None]
            r = sp.ring[:, :, None]
            reg = out[i, y0 : y0 + b, x0 : x0 + b]
            reg *= 1.0 - a - r
            reg += a * obj + r * outline[i]
        return np.rint(out).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------


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


def _draw_scenes(cfg: WorldConfig, n: int, rng: np.random.Generator, biased: bool) -> Scenes:
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


def _draw_grouped(
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
    sc = _draw_scenes(cfg, n_groups, rng, biased=False).take(gid)
    fresh = _draw_scenes(cfg, n, rng, biased=False)
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


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
_TEXTURE_ADJ = {"solid": ("solid", "plain"), "striped": ("striped",), "dotted": ("dotted", "spotted")}
_TEXTURE_WITH = {"striped": ("with stripes",), "dotted": ("with dots", "with spots")}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side", "in the left part of the image"),
    "right": ("on the right", "at the right", "on the right side", "in the right part of the image"),
    "top": ("at the top", "near the top", "on the top side", "in the upper part of the image"),
    "bottom": ("at the bottom", "near the bottom", "on the bottom side", "in the lower part of the image"),
}
_BACKGROUND_PHRASES = (
    "on a {} background",
    "against a {} background",
    "with a {} background",
    "on a {} backdrop",
)
_NOUNS = ("object", "shape", "thing")
_PREFIXES = ("a photo of ", "a picture of ", "an image of ", "a drawing of ")


def _pick(options: tuple[str, ...], u: float) -> str:
    """The first (plainest) phrasing half of the time, the others evenly otherwise."""
    if len(options) == 1 or u < 0.5:
        return options[0]
    return options[1 + min(len(options) - 2, int((u - 0.5) * 2 * (len(options) - 1)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _free_named(cfg: WorldConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """Which factors each caption names (n x 6 bool), independently of the other scenes."""
    u = rng.random((n, 8))
    named = np.zeros((n, len(FACTORS)), bool)
    p_full, p_single = cfg.caption_mix
    for i in range(n):
        if u[i, 0] < p_full:  # everything
            named[i] = True
        elif u[i, 0] < p_full + p_single:  # exactly one factor
            named[i, int(u[i, 1] * len(FACTORS))] = True
        else:  # two or three factors
            named[i, np.argsort(u[i, 2:8])[: 2 + int(u[i, 1] < 0.5)]] = True
    return named


def _unique_named(
    sc: Scenes, rng: np.random.Generator, extra: float = 0.1, allowed: np.ndarray | None = None
) -> np.ndarray:
    """Which factors each caption names so that it describes its own scene and no other scene of the
    batch (a referring expression): factors are added in random order among those that still rule out
    some other scene, then each unnamed factor is added with probability `extra`. With these captions
    the contrastive targets are exact (no false negatives), and every factor is needed whenever the
    batch holds a scene differing from another only in that factor. Scenes identical in every factor
    stay indistinguishable (so do scenes differing only in factors outside `allowed`, a bool mask
    over FACTORS of the factors that may be named)."""
    F = np.stack([getattr(sc, f) for f in FACTORS], axis=1)
    n, k = F.shape
    u = rng.random((n, k + 1))
    named = np.zeros((n, k), bool)
    ok = np.ones(k, bool) if allowed is None else np.asarray(allowed, bool)
    for i in range(n):
        eq = F == F[i]
        left = np.ones(n, bool)
        left[i] = False
        order = np.argsort(u[i, :k])
        while left.any():
            useful = [f for f in order if ok[f] and not named[i, f] and (left & ~eq[:, f]).any()]
            if not useful:
                break
            f = useful[0]
            named[i, f] = True
            left &= eq[:, f]
    named |= (rng.random((n, k)) < extra) & ok
    return named


def _captions(
    cfg: WorldConfig,
    sc: Scenes,
    rng: np.random.Generator,
    named: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> list[str]:
    """Varied captions naming some factors (never the group): those in `named` (n x 6 bool, in FACTORS
    order) or, if None, a random choice per cfg.caption_mix."""
    n = len(sc)
    if named is None:
        named = _free_named(cfg, n, rng)
    if allowed is not None:
        named = named & allowed
    u = rng.random((n, 24))
    k = rng.integers(0, 1 << 30, (n, 12))
    out = []
    for i in range(n):
        uu, kk = u[i], k[i]
        inc = named[i]
        if not inc.any():
            inc = inc.copy()
            choices = np.flatnonzero(allowed) if allowed is not None else np.arange(len(FACTORS))
            inc[choices[int(kk[0] % len(choices))]] = True
        has_color, has_shape, has_size, has_pos, has_bg, has_tex = inc
        adj = []
        if has_size:
            w = _SIZE_WORDS[cfg.sizes[sc.size[i]]]
            adj.append(_pick(w, uu[13]))
        if has_color:
            adj.append(cfg.colors[sc.color[i]])
        tex_with = None
        if has_tex:
            t = cfg.textures[sc.texture[i]]
            if t in _TEXTURE_WITH and uu[16] < 0.3:
                w = _TEXTURE_WITH[t]
                tex_with = _pick(w, uu[14])
            else:
                w = _TEXTURE_ADJ[t]
                adj.append(_pick(w, uu[14]))
        if len(adj) > 1 and uu[8] < 0.2:
            rng_perm = kk[3] % len(adj)
            adj = adj[rng_perm:] + adj[:rng_perm]
        noun = cfg.shapes[sc.shape[i]] if has_shape else _NOUNS[kk[4] % len(_NOUNS)]
        phrase = " ".join(adj + [noun])
        a = uu[9]
        if a < 0.7:
            phrase = f"{_article(phrase)} {phrase}"
        elif a < 0.85:
            phrase = f"the {phrase}"
        if tex_with:
            phrase = f"{phrase} {tex_with}"
        pos = None
        if has_pos:
            w = _POSITION_PHRASES[cfg.positions[sc.position[i]]]
            pos = _pick(w, uu[15])
        bg = None
        if has_bg:
            b = cfg.backgrounds[sc.background[i]]
            if uu[10] < 0.25:
                bg = f"{b} background"
            else:
                bg = _BACKGROUND_PHRASES[kk[6] % len(_BACKGROUND_PHRASES)].format(b)
        if uu[11] < 0.25:
            prefix = _PREFIXES[kk[7] % len(_PREFIXES)]
            if phrase.startswith(("a ", "an ", "the ")):
                phrase = phrase.split(" ", 1)[1]
            phrase = prefix + f"{_article(phrase)} {phrase}"
        parts = [phrase]
        if pos and uu[12] < 0.15:
            parts = [pos + ","] + parts
            pos = None
        if pos:
            parts.append(pos)
        if bg:
            if bg.endswith(" background") and not bg.startswith(("on ", "against ", "with ")):
                parts[-1] = parts[-1] + ","
            parts.append(bg)
        out.append(" ".join(parts))
    return out


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


@dataclass
class ToyBatch:
    """Images (uint8, N x H x W x 3), factor labels (index into the config's vocabularies), groups."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    groups: np.ndarray
    captions: list[str] | None = None
    scenes: Scenes | None = field(default=None, repr=False)

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

    `queries` maps each shape to its neutral prompts (METHOD.md §3: averaged into one query)."""

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


def _fix_articles(text: str) -> str:
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


class ToyWorld:
    """The seeded generator. Cheap to construct (masks are precomputed once)."""

    def __init__(self, config: WorldConfig | None = None):
        self.cfg = config or WorldConfig()
        self._renderer = _Renderer(self.cfg)

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
            yield b.images, b.captions

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
                sc = _draw_scenes(self.cfg, batch_size, rng, biased=True)
            else:
                sc = _draw_grouped(self.cfg, batch_size, rng, group_size, changes, change_weights)
            named = _unique_named(sc, rng, extra, allowed) if captions == "unique" else None
            yield self._batch(sc, _captions(self.cfg, sc, rng, named, allowed))
            i += 1

    def scenes(self, n: int, split: str = "test", seed: int = 0) -> Scenes:
        if split not in SPLITS or split == "probe":
            raise InvalidInput(f"unknown split {split!r}", hint="choose one of: train, test, val")
        if n < 0:
            raise InvalidInput(f"n must be non-negative, got {n}")
        parts = []
        for c in range(max(1, -(-n // _CHUNK))):
            rng = self._rng(SPLITS[split], seed, 1_000_000 + c)
            parts.append(_draw_scenes(self.cfg, _CHUNK, rng, biased=split == "train"))
        return Scenes.concat(parts).take(slice(0, n))

    def sample(self, n: int, split: str = "test", seed: int = 0, captions: bool = False) -> ToyBatch:
        """n images of a split with labels; the first n of that split's stream (prefix-stable)."""
        sc = self.scenes(n, split, seed)
        caps = _captions(self.cfg, sc, self._rng(SPLITS[split], seed, 2_000_000)) if captions else None
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
        return _draw_scenes(self.cfg, n, self._rng(SPLITS["probe"], seed), biased=False)

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
        queries = {s: [_fix_articles(t.format(s)) for t in NEUTRAL_TEMPLATES] for s in self.cfg.shapes}
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

        if n < 1:
            raise InvalidInput(f"n must be positive, got {n}")
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
                    [c for p in parts for c in p.captions][:n],
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
# TextSpan pool and taxonomy
# --------------------------------------------------------------------------------------------------

#: lexicon of every concept the toy pool uses (a text is about every concept whose term occurs in it:
#: "on a blue background" is about backgrounds and colors; terms are lowercase word sequences, plurals folded)
_TAXONOMY_TERMS: dict[str, tuple[str, list[str]]] = {
    "colors": (
        "the color of the object",
        [
            "red",
            "green",
            "blue",
            "yellow",
            "purple",
            "orange",
            "black",
            "white",
            "gray",
            "grey",
            "pink",
            "teal",
            "brown",
            "violet",
            "crimson",
            "scarlet",
            "golden",
            "lime",
            "colored",
            "colour",
        ],
    ),
    "shapes": (
        "the shape of the object",
        [
            "circle",
            "round",
            "disc",
            "square",
            "box",
            "triangle",
            "triangular",
            "cross",
            "star",
            "heart",
            "diamond",
            "moon",
            "crescent",
            "hexagon",
            "oval",
            "arrow",
            "rectangle",
        ],
    ),
    "sizes": (
        "how big the object is",
        ["small", "large", "big", "tiny", "little", "huge", "giant", "miniature", "enormous", "medium", "size"],
    ),
    "positions": (
        "where the object is in the image",
        [
            "left",
            "right",
            "top",
            "bottom",
            "upper",
            "lower",
            "center",
            "centre",
            "middle",
            "corner",
            "edge",
            "above",
            "below",
        ],
    ),
    "backgrounds": (
        "the background behind the object",
        ["background", "backdrop", "behind"],
    ),
    "textures": (
        "the surface pattern of the object",
        [
            "striped",
            "stripe",
            "stripy",
            "dotted",
            "dot",
            "spotted",
            "spot",
            "polka",
            "solid",
            "plain",
            "pattern",
            "checkered",
            "textured",
            "texture",
            "speckled",
        ],
    ),
}

_POOL: dict[str, list[str]] = {
    "colors": [
        "a red object",
        "something red",
        "bright red",
        "the color red",
        "crimson and scarlet",
        "a green object",
        "something green",
        "lime green",
        "a blue object",
        "something blue",
        "deep blue",
        "a yellow object",
        "something yellow",
        "golden yellow",
        "a purple object",
        "violet",
        "an orange object",
        "bright orange",
        "a black object",
        "white colored",
    ],
    "shapes": [
        "a circle",
        "a round disc",
        "a photo of a circle",
        "a square",
        "a box",
        "a photo of a square",
        "a triangle",
        "a triangular thing",
        "a cross",
        "a cross sign",
        "a star",
        "a photo of a star",
        "a heart",
        "a photo of a heart",
        "a diamond",
        "a crescent moon",
        "a hexagon",
        "an oval",
        "an arrow",
        "a rectangle",
    ],
    "sizes": [
        "a small object",
        "something small",
        "a tiny thing",
        "little",
        "a miniature",
        "small size",
        "a large object",
        "something large",
        "a big thing",
        "huge",
        "giant",
        "an enormous object",
        "a medium size object",
        "very small",
        "very big",
        "a little thing",
        "a large thing",
        "big size",
        "tiny",
        "a huge object",
    ],
    "positions": [
        "on the left",
        "on the left side",
        "at the left of the image",
        "on the right",
        "on the right side",
        "at the right of the image",
        "at the top",
        "near the top of the image",
        "in the upper part",
        "at the bottom",
        "near the bottom of the image",
        "in the lower part",
        "in the center",
        "in the middle of the image",
        "in the corner",
        "near the edge",
        "above",
        "below",
        "top of the picture",
        "bottom of the picture",
    ],
    "backgrounds": [
        "a gray background",
        "on a gray background",
        "a teal background",
        "on a teal background",
        "a brown background",
        "on a brown backdrop",
        "a pink background",
        "against a pink backdrop",
        "a white background",
        "a black background",
        "a plain background",
        "a dark background",
        "a bright background",
        "on a green background",
        "against a blue background",
        "behind the object",
        "the background",
        "a backdrop",
        "a colorful background",
        "a simple background",
    ],
    "textures": [
        "a striped object",
        "with stripes",
        "a stripy pattern",
        "a dotted object",
        "with dots",
        "a spotted object",
        "polka dots",
        "a solid object",
        "plain with no pattern",
        "a checkered pattern",
        "a textured surface",
        "a speckled thing",
        "a striped thing",
        "a dotted thing",
        "with spots",
        "a solid fill",
        "a pattern",
        "a plain thing",
        "thin stripes",
        "many dots",
    ],
    "distractors": [
        "a photo",
        "an image",
        "a picture of something",
        "a drawing",
        "a blurry photo",
        "a cartoon",
        "a sketch",
        "a close-up photo",
        "a photo of a dog",
        "a photo of a car",
        "a tree",
        "a person walking",
        "a cup of coffee",
        "a sunny day",
        "an old photograph",
        "a painting",
        "a low resolution image",
        "a computer graphic",
        "a clip art",
        "a toy",
    ],
}


def toy_taxonomy() -> dict:
    """The taxonomy (JudgeContext format) whose concepts are the toy world's factors."""
    return {
        "concepts": {
            name: {"description": desc, "terms": list(terms)} for name, (desc, terms) in _TAXONOMY_TERMS.items()
        }
    }


def toy_pool() -> list[str]:
    """The TextSpan text pool: phrasings of every factor value (each factor ≥ 10% of the lines) and
    distractors that name no factor."""
    return [line for lines in _POOL.values() for line in lines]


def toy_pool_concepts() -> dict[str, str | None]:
    """Ground truth of the pool: line -> the concept it was written for (None for distractors)."""
    return {line: (None if c == "distractors" else c) for c, lines in _POOL.items() for line in lines}
