"""Rendering scenes to pixels from precomputed numpy masks (no PIL drawing per image): fast enough to feed a
training loop on one core. The bundled model was trained on these pixels, so any change here is a new world
(bump WORLD_VERSION)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from surgeon.core.errors import InvalidInput
from surgeon.inputs.toy.scenes import BACKGROUND_RGB, COLOR_RGB, GROUP_RGB, Scenes, WorldConfig


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


class Renderer:
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
