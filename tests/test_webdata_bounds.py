"""webdataset readers bounded from headers before they read: the shard count (nshards.txt), every member's size
(sparse members refused), a truncated shard an error naming it, and the image pass checking the sample count
of every shard against the label pass."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import surgeon.inputs.webdata as webdata
from surgeon.core.errors import CorruptInput
from surgeon.validation.validate import classification_set
from tests.conftest import run_cli


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)  # ~800 bytes as PNG
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(path: Path, samples: int, first: int = 0) -> None:
    import webdataset

    with webdataset.TarWriter(str(path)) as sink:
        for i in range(first, first + samples):
            sink.write({"__key__": f"s{i:07d}", "png": _png(i), "cls": i % 2})


def _dataset(root: Path, shards: int = 2, samples: int = 4) -> Path:
    (root / "test").mkdir(parents=True)
    for n in range(shards):
        _shard(root / "test" / f"{n}.tar", samples, first=n * samples)
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    (root / "classnames.txt").write_text("red\nblack\n")
    return root


def _all_images(task) -> int:
    return sum(len(b) for b in task.images.batches(lambda image: torch.zeros(1), batch_size=3))


def test_a_whole_dataset_reads_every_sample(tmp_path):
    task = classification_set(_dataset(tmp_path / "wds"))
    assert list(task.labels) == [0, 1] * 4 and _all_images(task) == 8
    assert "8 samples in 2 shards" in task.images.description


@pytest.mark.parametrize("count", ["2000000000", "0", "-5", "2.5", "9" * 100])
def test_the_shard_count_is_bounded_before_any_path_is_built(tmp_path, count):
    data = _dataset(tmp_path / "wds")
    (data / "test" / "nshards.txt").write_text(count + "\n")
    with pytest.raises(CorruptInput, match="nshards.txt"):
        classification_set(data)
    done = run_cli("validate", "--data", str(data))
    code, err = done.returncode, done.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 4 and "nshards.txt" in lines[0] and "Traceback" not in err


def _gnu_sparse_member(name: str, declared: int) -> bytes:
    """A GNU sparse header (type 'S') declaring `declared` bytes with one 512-byte stored block: a few KB on disk."""
    info = tarfile.TarInfo(name)
    info.size = 512
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:398] = b"%011o\0" % 0  # sparse map entry 0: offset 0 ...
    header[398:410] = b"%011o\0" % 512  # ... 512 bytes
    header[483:495] = b"%011o\0" % declared  # the real size the member claims
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + b"\xff" * 512


def test_a_gnu_sparse_member_is_refused_from_its_header(tmp_path):
    data = _dataset(tmp_path / "wds", shards=1)
    shard = data / "test" / "0.tar"
    body = _gnu_sparse_member("s9999999.cls", 6 << 30)  # a 6 GB member in a 1 KB header
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("s0000000.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"0"))
    raw = shard.read_bytes()
    end = raw.index(bytes(1024), 1024)  # where the end-of-archive marker starts
    shard.write_bytes(raw[:end] + body + bytes(10240))
    assert shard.stat().st_size < 16_000
    with pytest.raises(CorruptInput, match=r"0\.tar: member s9999999\.cls is a sparse file"):
        classification_set(data)


def test_an_oversized_member_is_refused_before_it_is_read(tmp_path, monkeypatch):
    data = _dataset(tmp_path / "wds", shards=1)
    monkeypatch.setattr(webdata, "MAX_SHARD_MEMBER_BYTES", 100)  # every PNG here is larger
    task = classification_set(data)  # the label pass reads only the 1-byte cls members
    with pytest.raises(CorruptInput, match=r"0\.tar: member s0000000\.png declares \d+ bytes"):
        _all_images(task)


@pytest.mark.parametrize("where", ["mid-member", "member-boundary"])
def test_a_truncated_shard_is_an_error_naming_it(tmp_path, where):
    data = _dataset(tmp_path / "wds", shards=2)
    shard = data / "test" / "1.tar"
    raw = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    if where == "mid-member":
        cut = members[len(members) // 2].offset_data + 100
    else:  # right after a member's data: tarfile alone takes this for the end of the archive
        middle = members[len(members) // 2]
        cut = middle.offset_data + -(-middle.size // 512) * 512
    shard.write_bytes(raw[:cut])
    with pytest.raises(CorruptInput, match=r"1\.tar"):
        classification_set(data)


def test_a_shard_that_changes_between_the_passes_is_an_error(tmp_path):
    data = _dataset(tmp_path / "wds", shards=2)
    task = classification_set(data)
    assert _all_images(task) == 8
    _shard(data / "test" / "0.tar", 3)  # one sample fewer than the label pass counted
    with pytest.raises(CorruptInput, match=r"0\.tar holds 3 samples, but 4"):
        _all_images(task)
    _shard(data / "test" / "0.tar", 5)  # one more: the labels would no longer line up with the images
    with pytest.raises(CorruptInput, match=r"0\.tar holds more than the 4 samples"):
        _all_images(task)
    assert sum(len(b) for b in task.images[:3].batches(lambda image: torch.zeros(1), 2)) == 3  # a prefix is fine


def test_a_negative_class_index_names_the_sample(tmp_path):
    import webdataset

    data = _dataset(tmp_path / "wds", shards=1)
    with webdataset.TarWriter(str(data / "test" / "0.tar")) as sink:
        sink.write({"__key__": "s0000000", "png": _png(0), "cls": 1})
        sink.write({"__key__": "s0000001", "png": _png(1), "cls": -1})
    with pytest.raises(CorruptInput, match=r"s0000001 in .*0\.tar: cls is -1, a negative class index"):
        classification_set(data)


def test_a_fifo_shard_is_refused_without_blocking(tmp_path):
    data = _dataset(tmp_path / "wds", shards=1)
    fifo = data / "test" / "0.tar"
    fifo.unlink()
    os.mkfifo(fifo)
    (data / "test" / "nshards.txt").unlink()  # found by the glob, as any *.tar
    errors: list[BaseException] = []

    def read() -> None:
        try:
            classification_set(data)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            errors.append(err)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)
    if reader.is_alive():  # opened the FIFO: unblock it, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO shard blocked")
    assert isinstance(errors[0], CorruptInput) and "0.tar is not a regular file" in str(errors[0])


@pytest.mark.parametrize(
    ("header", "layout"), [(tarfile.XHDTYPE, tarfile.USTAR_FORMAT), (tarfile.GNUTYPE_LONGNAME, tarfile.GNU_FORMAT)]
)
def test_a_pax_or_long_name_header_is_bounded_before_tarfile_reads_it(tmp_path, header, layout):
    """tarfile reads these headers whole at their declared size: a 10 KB shard declaring 8 GB allocated 8 GB
    (a MemoryError traceback under a memory limit)."""
    root = _dataset(tmp_path / "wds", shards=1)
    shard = root / "test" / "0.tar"
    with tarfile.open(shard) as tar:
        tar.getmembers()
        end = tar.offset  # where the end-of-archive blocks start
    huge = tarfile.TarInfo("././@LongLink" if header == tarfile.GNUTYPE_LONGNAME else "pax")
    huge.type, huge.size = header, 8 * 10**9
    with shard.open("r+b") as handle:
        handle.truncate(end)
        handle.seek(end)
        handle.write(huge.tobuf(layout) + bytes(2 * tarfile.BLOCKSIZE))
    with pytest.raises(CorruptInput, match="an extended header declares 8,000,000,000 bytes"):
        _all_images(classification_set(root))  # the samples are counted when the set is read
