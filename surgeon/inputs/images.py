"""Image sources for ranking and validation: the toy world, a folder of images, or tensors (tests).

Every source has an identity string (part of the statistics cache key) and yields preprocessed batches.
Unreadable files are skipped and counted; a set with no readable image is an error."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from surgeon.core import fallback, limits
from surgeon.core.errors import CorruptInput, InvalidInput, NotFound
from surgeon.inputs import defaults
from surgeon.inputs.preprocess import load_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSet:
    """A finite, ordered set of images with a stable identity."""

    identity: str
    description: str
    count: int
    load: Callable[[int], Image.Image]  # index -> RGB image (raises CorruptInput when unreadable)
    skipped: list[str] = field(default_factory=list)

    def batches(
        self, preprocess: Callable, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Preprocessed batches of images [start, stop); unreadable ones are skipped and recorded."""
        stop = self.count if stop is None else stop
        batch: list[torch.Tensor] = []
        for index in range(start, stop):
            try:
                batch.append(preprocess(self.load(index)))
            except CorruptInput as err:
                self.skipped.append(str(err))
                continue
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)


def open_image(path: Path) -> Image.Image:
    """Decode one image safely as RGB (bombs refused, CMYK/16-bit/alpha converted): the torch-free
    runtime's loader, so training-time and serving-time decoding cannot drift apart."""
    return load_image(path)


def folder_images(folder: Path, limit: int | None = None) -> ImageSet:
    if not folder.is_dir():
        raise NotFound(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        paths = paths[:limit]
    if not paths:
        raise InvalidInput(f"no images in {folder}", hint=f"expected files ending in {sorted(IMAGE_SUFFIXES)}")
    identity = f"folder:{files_digest(paths, folder)[:24]}"
    return ImageSet(identity, str(folder), len(paths), lambda i: open_image(paths[i]))


def files_digest(paths: list[Path], root: Path | None = None) -> str:
    """Identity of image files without reading them: each path (relative to `root` when given), size and
    modification time."""
    digest = hashlib.sha256()
    for p in paths:
        stat = p.stat()
        digest.update(f"{p.relative_to(root) if root else p}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def toy_images(n: int, split: str = "val", seed: int = 0) -> ImageSet:
    """Toy-world images (held-out 'val' split by default: validation uses 'test'); identity = pixel hash."""
    arrays = defaults.toy_images(n, split=split, seed=seed)
    identity = f"toy:{split}:{hashlib.sha256(arrays.tobytes()).hexdigest()[:24]}"
    return ImageSet(identity, f"toy world ({split}, {n} images)", len(arrays), lambda i: Image.fromarray(arrays[i]))


def resolve_images(spec: str | None, n_images: int | None, model: str | None = None) -> ImageSet:
    """`"toy"` -> the toy world's held-out images, anything else a folder; `None`: fallback.data_for."""
    hint = "pass --images FOLDER (your photos, any image files), or --images toy for the toy world"
    spec = fallback.data_for(model, spec, "images to rank it on", hint)
    limits.count(
        "n_images", n_images, *limits.images(spec == fallback.TOY)
    )  # 0 is not "the default"; a huge count must not allocate
    if spec == fallback.TOY:
        return toy_images(n_images or 2000)
    return folder_images(Path(spec), n_images)
