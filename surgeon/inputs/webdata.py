"""clip_benchmark's webdataset layout as a validation set, streamed shard by shard.

The layout (clip_benchmark's `build_wds_dataset` and `clip_benchmark_export_wds`): DIR/test/0.tar, 1.tar ...
(with test/nshards.txt), DIR/classnames.txt and DIR/zeroshot_classification_templates.txt (templates with
{c}). Each sample holds an image (webp, png, jpg or jpeg) and a `cls` member, its class index. A retrieval set
(DIR/dataset_type.txt says "retrieval") holds a `txt` member instead: the image's captions, one per line.

Shards are read with the standard library's tarfile and every member is bounded from its header before it is
read: sparse members (a 10 KB file may declare 6 GB) and members over limits.MAX_SHARD_MEMBER_BYTES are
refused, and a shard must end with tar's end-of-archive marker, so a truncated one is an error, not fewer
samples. Members are grouped into samples by the `webdataset` library's own rule (group_by_keys). Its shard
readers are not used: they read every member whole, whatever its size, and its decoders would unpickle
`.pyd`/`.pickle` members. Images are decoded here with the guarded decoder used for image files (bombs
refused, every mode converted to RGB), labels as integers. Labels are read in a first pass that skips the
image members and counts each shard's samples; the image pass, one batch at a time while the shards stream
by (memory does not grow with the set), must find the same counts. Every error names the shard."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from surgeon.core.errors import CorruptInput, InvalidInput, NotFound
from surgeon.core.limits import MAX_SHARD_HEADER_BYTES, MAX_SHARD_MEMBER_BYTES, MAX_WEBDATASET_SHARDS
from surgeon.core.progress import progress_bar
from surgeon.inputs.preprocess import decode_image

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


def _shard_count(count_file: Path) -> int:
    """nshards.txt's number, within 1..MAX_WEBDATASET_SHARDS, read before any shard path is built."""
    try:
        with open(count_file, "rb") as handle:
            raw = handle.read(65)  # a number of shards is a few digits: a bigger file is no count
        text = raw.decode("utf-8").strip()
        if len(raw) > 64 or not text.isdigit():
            raise ValueError(text)
    except (ValueError, UnicodeDecodeError, OSError):
        raise CorruptInput(f"{count_file} does not hold a number of shards") from None
    count = int(text)
    if not 1 <= count <= MAX_WEBDATASET_SHARDS:
        raise CorruptInput(f"{count_file} says {count} shards; a split has 1..{MAX_WEBDATASET_SHARDS:,}")
    return count


def shard_paths(folder: Path, split: str = "test") -> list[Path]:
    """The split's shards in order: {0..n-1}.tar as nshards.txt says, else every .tar (numbers sorted as such)."""
    directory = folder / split
    count_file = directory / "nshards.txt"
    if count_file.is_file():
        count = _shard_count(count_file)
        shards = [directory / f"{i}.tar" for i in range(count)]
        missing = next((p for p in shards if not p.is_file()), None)
        if missing is not None:
            raise NotFound(f"shard {missing} is missing ({count_file} says {count})")
        return shards
    shards = sorted(directory.glob("*.tar"), key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.name))
    if not shards:
        raise NotFound(f"no .tar shards in {directory}")
    if len(shards) > MAX_WEBDATASET_SHARDS:
        raise CorruptInput(f"{directory} holds {len(shards):,} shards; a split has at most {MAX_WEBDATASET_SHARDS:,}")
    return shards


_EXTENDED_HEADERS = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _BoundedHeaders(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header whole, at the size its block declares (a 10 KB shard can
    declare 8 GB there): bounded before that read. (_proc_member is where TarInfo.fromtarfile dispatches.)"""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED_HEADERS and self.size > MAX_SHARD_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(  # type: ignore[attr-defined]  # a ReadError wherever it stands
                f"an extended header declares {self.size:,} bytes, more than {MAX_SHARD_HEADER_BYTES >> 10} KiB"
            )
        return super()._proc_member(tar)  # type: ignore[misc]  # not in typeshed


def _shard_members(shard: Path, wanted: Callable[[str], bool] | None) -> Iterator[dict]:
    """The regular members of one shard as webdataset's {fname, data, __url__} records, each bounded from its
    header before it is read; the shard must end with the end-of-archive marker (else it was truncated)."""
    if not shard.is_file():  # opening a FIFO would block
        raise CorruptInput(f"webdataset shard {shard} is not a regular file")
    with open(shard, "rb") as handle, tarfile.open(fileobj=handle, mode="r:", tarinfo=_BoundedHeaders) as tar:
        while (info := tar.next()) is not None:
            # a stream: keep no member list (webdataset's reader does the same); the attribute is not in typeshed
            tar.members.clear()  # type: ignore[attr-defined]
            if info.issparse():
                raise CorruptInput(f"webdataset shard {shard}: member {info.name} is a sparse file, refused")
            if not info.isreg() or info.name.startswith("__") or (wanted is not None and not wanted(info.name)):
                continue
            if info.size > MAX_SHARD_MEMBER_BYTES:
                raise CorruptInput(
                    f"webdataset shard {shard}: member {info.name} declares {info.size:,} bytes, more than the "
                    f"{MAX_SHARD_MEMBER_BYTES >> 20} MiB a member may hold"
                )
            member = tar.extractfile(info)
            assert member is not None  # a regular member
            yield {"fname": info.name, "data": member.read(), "__url__": str(shard)}
        handle.seek(tar.offset)
        if handle.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise CorruptInput(
                f"webdataset shard {shard} is truncated or corrupt: it ends without tar's end-of-archive marker"
            )


def _shard_samples(shard: Path, wanted: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """One shard's samples (members grouped by key, as webdataset does); any read error names the shard."""
    from webdataset.tariterators import group_by_keys

    try:
        yield from group_by_keys(_shard_members(shard, wanted))
    except CorruptInput:
        raise
    except (tarfile.TarError, OSError, ValueError, EOFError) as err:
        raise CorruptInput(f"unreadable webdataset shard {shard}: {err}") from None


def _label(sample: dict) -> int:
    raw = sample.get("cls")
    where = f"sample {sample['__key__']} in {sample['__url__']}"
    if raw is None:
        raise CorruptInput(f"{where} has no cls member (its class index)")
    try:
        label = int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise CorruptInput(f"{where}: cls is not an integer") from None
    if label < 0:
        raise CorruptInput(f"{where}: cls is {label}, a negative class index (indices start at 0)")
    return label


def _captions(sample: dict) -> list[str]:
    where = f"sample {sample['__key__']} in {sample['__url__']}"
    raw = sample.get("txt")
    if raw is None:
        raise CorruptInput(f"{where} has no txt member (its captions)")
    try:
        captions = [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise CorruptInput(f"{where}: txt is not UTF-8") from None
    if not captions:
        raise CorruptInput(f"{where} has an empty caption list")
    return captions


#: what a counted sample carries besides its image, and how it is read: a class index or a retrieval caption list
MEMBER_READERS: dict[str, Callable[[dict], object]] = {"cls": _label, "txt": _captions}


def _image_bytes(sample: dict) -> bytes:
    extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if extension is None:
        raise CorruptInput(
            f"sample {sample['__key__']} in {sample['__url__']} has no image ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return sample[extension]


@dataclass(frozen=True)
class ShardPass:
    """What the first pass found: every sample's member (class index or captions) in order, and how many samples
    each shard holds (what the image pass must find again)."""

    values: list
    per_shard: list[int]


def read_members(shards: list[Path], member: str = "cls") -> ShardPass:
    """Every sample's `member` (MEMBER_READERS), in order, without reading the images, and each shard's count."""
    read = MEMBER_READERS[member]
    values: list = []
    per_shard: list[int] = []
    for shard in shards:
        found = [read(s) for s in _shard_samples(shard, wanted=lambda name: name.endswith(f".{member}"))]
        values += found
        per_shard.append(len(found))
    return ShardPass(values, per_shard)


class ShardImages:
    """The first `count` images of webdataset shards, decoded while streaming; `per_shard`: the first pass's
    sample count of each shard, checked again as the images are read. `member` is what each counted sample
    carries besides its image (`cls`, or `txt` for a retrieval export)."""

    def __init__(self, shards: list[Path], count: int, description: str, per_shard: list[int], member: str = "cls"):
        self.shards, self.count, self.description, self.per_shard = shards, count, description, per_shard
        self.member = member

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: slice) -> ShardImages:
        """Only prefixes ([:n]) are offered: a stream has no random access."""
        if not isinstance(index, slice) or index.start not in (None, 0) or index.step not in (None, 1):
            raise TypeError("ShardImages supports only prefix slices [:n]")
        stop = self.count if index.stop is None else min(index.stop, self.count)
        return ShardImages(self.shards, stop, self.description, self.per_shard, self.member)

    def _samples(self) -> Iterator[dict]:
        """The first `count` samples; a shard holding other than the first pass's count is an error."""
        read = 0
        for shard, expected in zip(self.shards, self.per_shard, strict=True):
            if read == self.count:
                return
            found = 0
            for sample in _shard_samples(shard):
                # a sample without its member was not counted by the first pass: stop, never misalign
                MEMBER_READERS[self.member](sample)
                if found == expected:
                    raise CorruptInput(
                        f"webdataset shard {shard} holds more than the {expected} samples counted when its "
                        f"{self.member} members were read: it changed while being read"
                    )
                found += 1
                yield sample
                read += 1
                if read == self.count:
                    return
            if found != expected:
                raise CorruptInput(
                    f"webdataset shard {shard} holds {found} samples, but {expected} when its {self.member} members "
                    "were read: it changed while being read"
                )

    def batches(self, preprocess: Callable, batch_size: int) -> Iterator[torch.Tensor]:
        batch: list[torch.Tensor] = []
        with progress_bar(f"reading {self.description}", self.count) as advance:
            for sample in self._samples():
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
    return _split(folder, split, "cls")


def retrieval_webdataset(folder: Path, split: str = "test") -> tuple[ShardImages, list[list[str]]]:
    """(images, each image's captions) of a retrieval export's split; an empty split is an error."""
    return _split(folder, split, "txt")


def _split(folder: Path, split: str, member: str) -> tuple[ShardImages, list]:
    shards = shard_paths(folder, split)
    found = read_members(shards, member)
    if not found.values:
        raise InvalidInput(f"the webdataset {folder} has no samples in {split}/")
    description = f"{folder.name}/{split} ({len(found.values):,} samples in {len(shards):,} shards)"
    return ShardImages(shards, len(found.values), description, found.per_shard, member), found.values
