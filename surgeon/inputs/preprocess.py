"""open_clip's evaluation image transform, reproduced with numpy and PIL (no torch, no torchvision).

open_clip (`open_clip.transform.image_transform`, is_train=False) applies to a PIL image:
- resize_mode "shortest": square target -> torchvision Resize(size) (shortest side to `size`, the long
  side to int(size * long / short)); non-square target -> ResizeKeepRatio (both sides divided by the
  smaller of the two side ratios, rounded; always bicubic), then CenterCrop (zero padding if too small);
- "squash": Resize to exactly (H, W);
- "longest": ResizeKeepRatio on the larger ratio, then CenterCropOrPad with `fill_color`;
then convert("RGB"), ToTensor (uint8 / 255 as float32) and Normalize ((x - mean) / std in float32).
torchvision resizes PIL images with PIL's own `Image.resize`, so the same call here gives the same
pixels, and the float arithmetic is done in the same order and precision."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from surgeon.core.errors import CorruptInput, NotFound
from surgeon.core.limits import MAX_ASPECT_RATIO
from surgeon.core.paths import read_json

MAX_IMAGE_PIXELS = 64_000_000  # images larger than this are refused before decoding (decompression bombs)
MAX_RESIZED_PIXELS = MAX_IMAGE_PIXELS  # ... and images that preprocessing would resize beyond it

#: what PIL raises for a file that is no image, a truncated one or a bomb
_UNREADABLE = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESIZE_MODES = ("shortest", "squash", "longest")


def load_image(path: Path | str) -> Image.Image:
    """Decode one image file as 8-bit RGB. CMYK, greyscale, palette, 16-bit and alpha images are
    converted (transparency composited on white); decompression bombs, truncated or non-image files
    raise CorruptInput naming the file; a missing file raises NotFound."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"image not found: {path}")
    return decode_image(path, str(path))


def decode_image(source: Path | BinaryIO, name: str, reduce_for: tuple[int, int] | None = None) -> Image.Image:
    """`load_image` for a file or an open binary stream (a webdataset shard member); `name` says which.
    With `reduce_for` (a model's input (H, W)), an image at least twice that size on both sides is decoded smaller
    (JPEG draft mode) or reduced by an integer factor right after decoding (other formats), never below twice the
    input: the resize that follows then reads fewer pixels, for a few rounding differences from the full decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                check_dimensions(image.width, image.height, name)
                if reduce_for is not None:
                    image.draft(None, (2 * reduce_for[1], 2 * reduce_for[0]))  # JPEG only; others ignore it
                image.load()
                if reduce_for is None:
                    return to_rgb(image)
                factor = min(image.width // (2 * reduce_for[1]), image.height // (2 * reduce_for[0]))
                image = to_8bit(image)
                if factor >= 2 and image.mode in ("L", "RGB"):  # reducing L, then RGB = reducing the RGB copy
                    return to_rgb(image.reduce(factor))
                rgb = to_rgb(image)
                return rgb.reduce(factor) if factor >= 2 else rgb
    except CorruptInput:
        raise
    except _UNREADABLE as err:
        raise CorruptInput(f"unreadable image {name}: {err}") from None


def check_dimensions(width: int, height: int, name: str) -> None:
    """Refuse an image from its header's size: decompression bombs and strips too thin to resize."""
    if width * height > MAX_IMAGE_PIXELS:
        raise CorruptInput(
            f"image {name} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed (decompression bomb?)"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):  # 1x200000: 48 x 9.6 M after resizing
        raise CorruptInput(
            f"image {name} is {width}x{height} pixels, more elongated than the "
            f"{MAX_ASPECT_RATIO}:1 allowed (its shortest side would be resized to the model's input)"
        )


def header_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) of an encoded image from its header alone (nothing decoded), checked as decode_image does."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except _UNREADABLE as err:
        raise CorruptInput(f"unreadable image {name}: {err}") from None
    check_dimensions(width, height, name)
    return width, height


#: pixels converted at a time from 16/32-bit and float greyscale (float64 temporaries of 8 MB each)
STRIP_PIXELS = 1 << 20


def to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale ("I;16", "I", "F") -> "L", scaled from 0..65535 to 0..255 (other modes
    as they are). Converted a strip of rows at a time: the whole image in float64 took 8 bytes per pixel three times
    over (an 8000x8000 16-bit PNG of 124 KB took a server from 554 MB to 1,429 MB); the values are the same."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    grey = Image.new("L", image.size)
    rows = max(1, STRIP_PIXELS // max(1, image.width))
    for top in range(0, image.height, rows):
        strip = np.asarray(image.crop((0, top, image.width, min(top + rows, image.height))), dtype=np.float64)
        grey.paste(Image.fromarray(np.clip(strip / 256.0, 0, 255).astype(np.uint8)), (0, top))
    return grey


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16/32-bit integer and float greyscale are scaled from 0..65535 to
    0..255 (`to_8bit`), alpha (RGBA, LA, PA, palette transparency) is composited on white."""
    if image.mode == "RGB":
        return image
    image = to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


@dataclass(frozen=True)
class PreprocessConfig:
    """open_clip's PreprocessCfg for evaluation: target (H, W), per-channel mean and std, interpolation,
    resize mode and the padding colour of the "longest" mode."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self):
        if len(self.size) != 2 or min(self.size) < 1:
            raise CorruptInput(f"preprocess size must be [H, W] of positive integers, got {list(self.size)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise CorruptInput("preprocess mean and std need 3 values each (std > 0)")
        if self.interpolation not in ("bicubic", "bilinear", "random"):
            raise CorruptInput(f"unknown interpolation {self.interpolation!r} (bicubic or bilinear)")
        if self.resize_mode not in RESIZE_MODES:
            raise CorruptInput(f"unknown resize_mode {self.resize_mode!r} ({', '.join(RESIZE_MODES)})")

    @classmethod
    def from_dict(cls, cfg: dict) -> PreprocessConfig:
        """From open_clip's PreprocessCfg fields (`size` an int or [H, W]; missing keys: open_clip's defaults)."""
        try:
            size = cfg.get("size", 224)
            size = (int(size), int(size)) if isinstance(size, int | float) else tuple(int(v) for v in size)
            mean = cfg.get("mean", OPENAI_MEAN)
            std = cfg.get("std", OPENAI_STD)
            mean = (float(mean),) * 3 if isinstance(mean, int | float) else tuple(float(v) for v in mean)
            std = (float(std),) * 3 if isinstance(std, int | float) else tuple(float(v) for v in std)
            return cls(
                size=size,
                mean=mean,
                std=std,
                interpolation=str(cfg.get("interpolation") or "bicubic"),
                resize_mode=str(cfg.get("resize_mode") or "shortest"),
                fill_color=int(cfg.get("fill_color", 0) or 0),
            )
        except (TypeError, ValueError, AttributeError) as err:
            raise CorruptInput(f"invalid preprocessing settings {cfg!r}: {err}") from None

    @classmethod
    def from_file(cls, path: Path) -> PreprocessConfig:
        cfg = read_json(path, "preprocessing settings")
        if not isinstance(cfg, dict):
            raise CorruptInput(f"{path} must hold a JSON object")
        return cls.from_dict(cfg)

    @property
    def resample(self) -> Image.Resampling:
        # open_clip: "bilinear" -> BILINEAR, anything else ("bicubic", "random") -> BICUBIC
        return _RESAMPLE.get(self.interpolation, Image.Resampling.BICUBIC)

    def resize(self, image: Image.Image) -> Image.Image:
        """The geometric part: resize (and crop or pad) to exactly `size`, as open_clip does. An image the
        resize would blow up beyond MAX_RESIZED_PIXELS (a 1 px wide strip) is refused first."""
        height, width = self.size
        if max(image.size) * max(self.size) ** 2 > MAX_RESIZED_PIXELS * max(1, min(image.size)):
            raise CorruptInput(
                f"a {image.width}x{image.height} image would be resized beyond {MAX_RESIZED_PIXELS:,} pixels"
            )
        if self.resize_mode == "squash":
            return image.resize((width, height), self.resample)
        if self.resize_mode == "longest":
            image = image.resize(_keep_ratio(image, self.size, longest=True), Image.Resampling.BICUBIC)
            return _center_crop_or_pad(image, self.size, self.fill_color)
        if height == width:  # torchvision Resize(int): shortest side -> size, long side truncated
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(height * long / short)
            new_w, new_h = (height, new_long) if w <= h else (new_long, height)
            if (new_w, new_h) != (w, h):
                image = image.resize((new_w, new_h), self.resample)
        else:  # open_clip's ResizeKeepRatio(size) ignores the configured interpolation: bicubic
            image = image.resize(_keep_ratio(image, self.size, longest=False), Image.Resampling.BICUBIC)
        return _center_crop_or_pad(image, self.size, 0)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> float32 [3, H, W], normalised."""
        array = np.asarray(self.resize(to_rgb(image)), dtype=np.uint8)
        pixels = array.astype(np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> float32 [N, 3, H, W]."""
        if not images:
            return np.zeros((0, 3, *self.size), dtype=np.float32)
        return np.stack([self(image) for image in images])


def _keep_ratio(image: Image.Image, target: tuple[int, int], longest: bool) -> tuple[int, int]:
    """ResizeKeepRatio's output size as PIL (width, height)."""
    width, height = image.size
    ratio_h, ratio_w = height / target[0], width / target[1]
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return max(1, round(width / ratio)), max(1, round(height / ratio))


def _center_crop_or_pad(image: Image.Image, size: tuple[int, int], fill: int) -> Image.Image:
    """torchvision center_crop / open_clip center_crop_or_pad: pad with `fill` where the image is smaller,
    then crop at offsets int(round(excess / 2)) (Python's round: halves go to the even number)."""
    crop_h, crop_w = size
    width, height = image.size
    if crop_w > width or crop_h > height:
        left = (crop_w - width) // 2 if crop_w > width else 0
        top = (crop_h - height) // 2 if crop_h > height else 0
        padded = Image.new(image.mode, (max(width, crop_w), max(height, crop_h)), (fill,) * len(image.getbands()))
        padded.paste(image, (left, top))
        image = padded
        width, height = image.size
        if (width, height) == (crop_w, crop_h):
            return image
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))
