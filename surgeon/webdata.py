"""clip_benchmark's webdataset layout as a validation set, streamed with the `webdataset` library.

The layout (clip_benchmark's `build_wds_dataset` and `clip_benchmark_export_wds`): DIR/test/0.tar, 1.tar ...
(with test/nshards.txt), DIR/classnames.txt and DIR/zeroshot_classification_templates.txt (templates with
{c}). Each sample holds an image (webp, png, jpg or jpeg) and a `cls` member, its class index. A retrieval set
(DIR/dataset_type.txt says "retrieval") holds a `txt` member instead: the image's captions, one per line.

Members are read as bytes and decoded here: images with the guarded decoder used for image files (bombs
refused, every mode converted to RGB), labels as integers. webdataset's own decoders are not used, since
they would unpickle `.pyd`/`.pickle` members. Labels are read in a first pass that skips the image members;
images are decoded one batch at a time while the shards stream by, so memory does not grow with the set."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from surgeon.errors import CorruptInput, InvalidInput, NotFound
from surgeon.progress import progress_bar
from surgeon.runtime.preprocess import decode_image

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
CLASSNAMES_FILE = "classnames.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


def is_webdataset(folder: Path, split: str = "test") -> bool:
    return (folder / split).is_dir() and any((folder / split).glob("*.tar"))


def is_retrieval_webdataset(folder: Path) -> bool:
    """clip_benchmark's marker of a retrieval export: dataset_type.txt holding "retrieval"."""
    marker = folder / DATASET_TYPE_FILE
    try:
        return is_webdataset(folder) and marker.is_file() and marker.read_text(encoding="utf-8").strip() == "retrieval"
    except (OSError, UnicodeDecodeError):
        raise CorruptInput(f"{marker} is unreadable") from None


def shard_paths(folder: Path, split: str = "test") -> list[Path]:
    """The split's shards in order: {0..n-1}.tar as nshards.txt says, else every .tar (numbers sorted as such)."""
    directory = folder / split
    count_file = directory / "nshards.txt"
    if count_file.is_file():
        try:
            count = int(count_file.read_text(encoding="utf-8").strip())
        except (ValueError, UnicodeDecodeError):
            raise CorruptInput(f"{count_file} does not hold a number of shards") from None
        shards = [directory / f"{i}.tar" for i in range(count)]
        missing = next((p for p in shards if not p.is_file()), None)
        if missing is not None:
            raise NotFound(f"shard {missing} is missing ({count_file} says {count})")
        return shards
    shards = sorted(directory.glob("*.tar"), key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.name))
    if not shards:
        raise NotFound(f"no .tar shards in {directory}")
    return shards


def _samples(shards: list[Path], select: Callable[[str], bool] | None = None) -> Iterator[dict]:
    import webdataset as wds

    dataset = wds.WebDataset(
        [str(p) for p in shards], shardshuffle=False, nodesplitter=None, empty_check=False, select_files=select
    )
    try:
        yield from dataset
    except (tarfile.TarError, OSError, ValueError, EOFError) as err:
        raise CorruptInput(f"unreadable webdataset shard: {err}") from None


def _label(sample: dict) -> int:
    raw = sample.get("cls")
    if raw is None:
        raise CorruptInput(f"sample {sample['__key__']} in {sample['__url__']} has no cls member (its class index)")
    try:
        return int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise CorruptInput(f"sample {sample['__key__']} in {sample['__url__']}: cls is not an integer") from None


def _captions(sample: dict) -> list[str]:
    raw = sample.get("txt")
    if raw is None:
        raise CorruptInput(f"sample {sample['__key__']} in {sample['__url__']} has no txt member (its captions)")
    try:
        captions = [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise CorruptInput(f"sample {sample['__key__']} in {sample['__url__']}: txt is not UTF-8") from None
    if not captions:
        raise CorruptInput(f"sample {sample['__key__']} in {sample['__url__']} has an empty caption list")
    return captions


def _image_bytes(sample: dict) -> bytes:
    extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if extension is None:
        raise CorruptInput(
            f"sample {sample['__key__']} in {sample['__url__']} has no image ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return sample[extension]


def read_labels(shards: list[Path]) -> list[int]:
    """Every sample's class index, in order, without reading the images."""
    return [_label(s) for s in _samples(shards, select=lambda name: name.endswith(".cls"))]


def read_captions(shards: list[Path]) -> list[list[str]]:
    """Every sample's captions (a retrieval export's `txt` members), in order, without reading the images."""
    return [_captions(s) for s in _samples(shards, select=lambda name: name.endswith(".txt"))]


class ShardImages:
    """The first `count` images of webdataset shards, decoded while streaming. `member` is what each counted
    sample carries besides its image (`cls`, or `txt` for a retrieval export)."""

    def __init__(self, shards: list[Path], count: int, description: str, member: str = "cls"):
        self.shards, self.count, self.description, self.member = shards, count, description, member

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: slice) -> ShardImages:
        """Only prefixes ([:n]) are offered: a stream has no random access."""
        if not isinstance(index, slice) or index.start not in (None, 0) or index.step not in (None, 1):
            raise TypeError("ShardImages supports only prefix slices [:n]")
        stop = self.count if index.stop is None else min(index.stop, self.count)
        return ShardImages(self.shards, stop, self.description, self.member)

    def batches(self, preprocess: Callable, batch_size: int) -> Iterator[torch.Tensor]:
        batch: list[torch.Tensor] = []
        with progress_bar(f"reading {self.description}", self.count) as advance:
            for index, sample in enumerate(_samples(self.shards)):
                if index == self.count:
                    break
                # a sample without its member was not counted by the first pass: stop, never misalign
                _captions(sample) if self.member == "txt" else _label(sample)
                name = f"{sample['__url__']}:{sample['__key__']}"
                batch.append(preprocess(decode_image(io.BytesIO(_image_bytes(sample)), name)))
                if len(batch) == batch_size:
                    yield torch.stack(batch)
                    advance(len(batch))
                    batch = []
            if batch:
                yield torch.stack(batch)
                advance(len(batch))


def webdataset_set(folder: Path, split: str = "test") -> tuple[ShardImages, list[int]]:
    """(images, labels) of the split; an empty split is an error."""
    shards = shard_paths(folder, split)
    labels = read_labels(shards)
    if not labels:
        raise InvalidInput(f"the webdataset {folder} has no samples in {split}/")
    return ShardImages(shards, len(labels), f"{folder.name}/{split}"), labels


def retrieval_webdataset(folder: Path, split: str = "test") -> tuple[ShardImages, list[list[str]]]:
    """(images, each image's captions) of a retrieval export's split; an empty split is an error."""
    shards = shard_paths(folder, split)
    captions = read_captions(shards)
    if not captions:
        raise InvalidInput(f"the webdataset {folder} has no samples in {split}/")
    return ShardImages(shards, len(captions), f"{folder.name}/{split}", member="txt"), captions
