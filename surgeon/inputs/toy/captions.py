"""Captions of scenes: varied phrasings naming some factors, either a random subset or, for contrastive
training, just enough factors that no other scene of the batch fits the caption; the group (the outline) only
in a WorldConfig.outline_caption_rate share of them, never to single a scene out."""

from __future__ import annotations

import re

import numpy as np

from surgeon.inputs.toy.scenes import FACTORS, Scenes, WorldConfig

_SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
_TEXTURE_ADJ: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain"),
    "striped": ("striped",),
    "dotted": ("dotted", "spotted"),
}
_TEXTURE_WITH: dict[str, tuple[str, ...]] = {"striped": ("with stripes",), "dotted": ("with dots", "with spots")}
_POSITION_PHRASES: dict[str, tuple[str, ...]] = {
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
#: how a caption names the outline drawn ("{}" = its group: dark, light)
_OUTLINE_PHRASES = ("with a {} outline", "{}-outlined")
_NOUNS = ("object", "shape", "thing")
_PREFIXES = ("a photo of ", "a picture of ", "an image of ", "a drawing of ")


def _pick(options: tuple[str, ...], u: float) -> str:
    """The first (plainest) phrasing half of the time, the others evenly otherwise."""
    if len(options) == 1 or u < 0.5:
        return options[0]
    return options[1 + min(len(options) - 2, int((u - 0.5) * 2 * (len(options) - 1)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def free_named(cfg: WorldConfig, n: int, rng: np.random.Generator) -> np.ndarray:
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


def unique_named(
    sc: Scenes,
    rng: np.random.Generator,
    extra: float = 0.1,
    allowed: np.ndarray | None = None,
    outline_rate: float = 0.0,
) -> np.ndarray:
    """Which factors each caption names so that it describes its own scene and no other scene of the
    batch (a referring expression): factors are added in random order among those that still rule out
    some other scene, then each unnamed factor is added with probability `extra`. With these captions
    the contrastive targets are exact (no false negatives), and every factor is needed whenever the
    batch holds a scene differing from another only in that factor. Scenes identical in every factor
    stay indistinguishable (so do scenes differing only in factors outside `allowed`, a bool mask
    over FACTORS of the factors that may be named).

    The result has a column more than FACTORS: the outline, a candidate like the factors in an
    `outline_rate` share of the captions. A caption naming it gets no extra factors, so the outline is what
    rules out the batch's scenes wearing the other outline and the contrastive loss needs the word (named
    redundantly among extras, at 10%, the text tower never told dark from light: NOTES.md e34). Its place in
    the random order comes from the spare draw, so a rate of 0 leaves every caption's choice as it was."""
    F = np.stack([getattr(sc, f) for f in FACTORS] + [sc.group], axis=1)
    n, k = F.shape[0], len(FACTORS)
    u = rng.random((n, k + 1))
    named = np.zeros((n, k + 1), bool)
    ok = np.ones(k, bool) if allowed is None else np.asarray(allowed, bool)
    for i in range(n):
        eq = F == F[i]
        left = np.ones(n, bool)
        left[i] = False
        # u[i, k] < outline_rate: the outline is a candidate, its key u[i, k] / outline_rate uniform like the others'
        outline = u[i, k] < outline_rate
        keys = np.append(u[i, :k], u[i, k] / outline_rate if outline else np.inf)
        candidate = np.append(ok, outline)
        order = np.argsort(keys)
        while left.any():
            useful = [f for f in order if candidate[f] and not named[i, f] and (left & ~eq[:, f]).any()]
            if not useful:
                break
            f = useful[0]
            named[i, f] = True
            left &= eq[:, f]
    named[:, :k] |= (rng.random((n, k)) < extra) & ok & ~named[:, k:]
    return named


def caption_scenes(
    cfg: WorldConfig,
    sc: Scenes,
    rng: np.random.Generator,
    named: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> list[str]:
    """Varied captions naming some factors: those in `named` (n x 6 bool, in FACTORS order) or, if None, a
    random choice per cfg.caption_mix. The outline: as a 7th column of `named` says (unique_named's), else in a
    cfg.outline_caption_rate share of the captions, read from spare columns of the per-caption draws, so a
    rate of 0 gives the very captions of before."""
    n, k_factors = len(sc), len(FACTORS)
    if named is None:
        named = free_named(cfg, n, rng)
    outline_named = named[:, k_factors] if named.shape[1] > k_factors else None
    named = named[:, :k_factors]
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
        says = outline_named[i] if outline_named is not None else uu[17] < cfg.outline_caption_rate
        outline = cfg.groups[sc.group[i]] if says else None
        if outline and uu[18] < 0.3:
            adj.insert(0, _OUTLINE_PHRASES[1].format(outline))
            outline = None
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
        if outline:
            phrase = f"{phrase} {_OUTLINE_PHRASES[0].format(outline)}"
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


def fix_articles(text: str) -> str:
    return re.sub(r"\ba ([aeiou])", r"an \1", text)
